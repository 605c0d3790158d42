"""The examples end to end, shortened: every recipe's script trains the embedded default for a few steps
and evaluates it before and after on tiny held-out sets (table, results.json, loss.png); every published
config passes --dry-run with data in place, and fails it (exit 2, naming the path or field) without."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfast.train.cli import train_main
from mmfast.train.default import default_data
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.synthetic import TRAIN_SUBSETS
from mmfast.train.default.teacher import default_teacher
from mmfast.train.encoder import Encoder
from mmfast.train.teacher_file import save_teacher

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).parents[2] / "examples"
CONFIGS = EXAMPLES / "configs"
SHORT = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "10",
         "--report_to", "none", "--heldout_size", "tiny"]  # fmt: skip


def _main(script: str):
    """The `main` of examples/<script>.py, loaded as a user would run it (not importable as a package)."""
    return runpy.run_path(str(EXAMPLES / f"{script}.py"), run_name="example")["main"]


IMAGE_SETS = {"mmeb", "retrieval", "sugarcrepe", "video", "visdoc"}
# The held-out sets matching each recipe: the text-only recipes (E5-V, UniME's stage 1) add the NLI set.
HELDOUT = {"train_llave": IMAGE_SETS, "train_vlm2vec": IMAGE_SETS, "train_e5v": IMAGE_SETS | {"nli"},
           "train_unime": IMAGE_SETS | {"nli"}}  # fmt: skip


def _check_outputs(out: Path, columns: list[str], tasks: set[str]):
    results = json.loads((out / "results.json").read_text())
    assert list(results) == columns
    for results_of_one in results.values():  # mmfast-eval's shape, every task of the tiny held-out sets
        assert set(results_of_one) == tasks
        assert 0 <= results_of_one["retrieval"]["flickr30k"]["t2i_R@1"] <= 100
        if "nli" in tasks:
            assert 0 <= results_of_one["nli"]["nli"]["p2e_R@1"] <= 100
        assert results_of_one["mmeb"]["meta_tasks"]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "mmfast_encoder.json").is_file()


@pytest.mark.parametrize("script", ["train_llave", "train_vlm2vec", "train_e5v"])
def test_example_trains_and_evaluates_before_and_after(script, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(script)(["--output_dir", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out
    assert "metric (%)" in printed and "flickr30k t2i R@1" in printed and "MMEB overall P@1" in printed
    assert "sugarcrepe accuracy" in printed and "documents NDCG@5" in printed
    _check_outputs(out, ["before", "after"], HELDOUT[script])
    if script == "train_e5v":
        assert "nli premise->entailment R@1" in printed
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]


def test_matryoshka_example_prints_each_prefix_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main("train_matryoshka")([*SHORT, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    (title,) = [i for i, line in enumerate(printed.splitlines()) if line.startswith("retrieval R@1 (%) at each")]
    header, *rows = printed.splitlines()[title + 1 : title + 5]
    assert header.split()[:6] == ["dim", "flickr30k", "t2i", "R@1", "before", "flickr30k"]
    assert [row.split()[0] for row in rows] == ["16", "32", "64"]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {f"{when} d{d}" for when in ("before", "after") for d in (16, 32, 64)}
    assert rows[2].split()[2] == f"{results['after d64']['retrieval']['flickr30k']['t2i_R@1']:.2f}"


def test_unime_example_runs_stage_2_from_stage_1(tmp_path, capsys, monkeypatch):
    default_teacher(default_data())
    loaded = []
    original = Encoder.from_pretrained.__func__

    def recording(cls, path, **overrides):
        loaded.append(str(path))
        return original(cls, path, **overrides)

    monkeypatch.setattr(Encoder, "from_pretrained", classmethod(recording))
    out = tmp_path / "run"
    assert _main("train_unime")(["--output_dir", str(out), *SHORT]) == 0
    assert "after stage 1" in capsys.readouterr().out
    _check_outputs(out, ["before", "after stage 1", "after"], HELDOUT["train_unime"])
    # stage 1 from the default backbone, stage 2 from stage 1's saved encoder
    assert len(loaded) == 2 and loaded[1] == str(out / "stage1")
    assert json.loads((out / "stage1" / "mmfast_encoder.json").read_text())["text_prompt"].endswith("in one word:")
    for stage in (out / "stage1", out):
        state = json.loads((stage / "checkpoint-2" / "trainer_state.json").read_text())
        assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]


# The text recipes trained long enough to learn (the range checks above run 2 steps): each script's own
# before/after evaluation on the full held-out NLI set (200 premises among 400 sentences none of which it
# trained on, chance 0.25%), text only, so it stays fast. The column after the text training: E5-V's only
# stage, UniME's stage 1 (its stage 2 trains image-text pairs: test_unime_example_stage_2_learns_the_heldout_t2i_set).
# Measured at 15 steps (2026-12-07): E5-V 0.5 -> 11.0%, UniME stage 1 0.5 -> 12.5%.
TEXT_TRAINING = {"train_e5v": "after", "train_unime": "after stage 1"}
TEXT_LEARNING_STEPS = 15


@pytest.mark.parametrize("script", sorted(TEXT_TRAINING))
def test_text_recipe_example_learns_the_heldout_nli_set(script, tmp_path):
    if script == "train_unime":
        default_teacher(default_data())
    out = tmp_path / "run"
    steps = ["--max_steps", str(TEXT_LEARNING_STEPS), "--logging_steps", "5", "--save_strategy", "no"]
    argv = ["--output_dir", str(out), *steps, "--report_to", "none", "--eval_strategy", "no", "--heldout_tasks", "nli"]
    assert _main(script)(argv) == 0
    results = json.loads((out / "results.json").read_text())
    before, after = (results[column]["nli"]["nli"] for column in ("before", TEXT_TRAINING[script]))
    assert before["num_rows"] == after["num_rows"] == Sizes().nli_heldout_rows  # the same held-out set both times
    assert after["p2e_R@1"] > before["p2e_R@1"] + 2, (before["p2e_R@1"], after["p2e_R@1"])
    assert after["p2e_MnR"] < before["p2e_MnR"], (before["p2e_MnR"], after["p2e_MnR"])


# VLM2Vec's example learns its held-out t2i set (the range checks above run 2 steps, inside the warm-up).
# Measured 2026-12-07: 60 steps move Flickr-style t2i R@1 0.47 -> 5.78 (chance 0.39), R@10 3.9 -> 39.9 and
# the mean rank 128.6 -> 20.0; the example's 400 steps reach 98.59.
VLM2VEC_LEARNING_STEPS = 60


def test_vlm2vec_example_learns_the_heldout_t2i_set(tmp_path):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", str(VLM2VEC_LEARNING_STEPS), "--save_strategy", "no",
            "--report_to", "none", "--eval_strategy", "no", "--heldout_tasks", "retrieval"]  # fmt: skip
    assert _main("train_vlm2vec")(argv) == 0
    results = json.loads((out / "results.json").read_text())
    before, after = (results[column]["retrieval"]["flickr30k"] for column in ("before", "after"))
    assert before["num_captions"] == after["num_captions"] == 1280  # the same held-out set both times
    assert after["t2i_R@1"] > before["t2i_R@1"] + 2.5, (before["t2i_R@1"], after["t2i_R@1"])
    assert after["t2i_R@10"] > before["t2i_R@10"] + 15, (before["t2i_R@10"], after["t2i_R@10"])
    assert after["t2i_MnR"] < before["t2i_MnR"] / 2, (before["t2i_MnR"], after["t2i_MnR"])


# UniME's stage 2 learns its held-out t2i set on the default: its default_run_loss, the margin without top-8
# (top-8 held it at ln 9: README, "UniME's stage 2"). Measured 2026-12-07, 50 + 50 steps: after stage 1 ->
# after stage 2, Flickr-style t2i R@1 0.86 -> 5.16, R@10 6.25 -> 38.91, mean rank 118.7 -> 21.9; with top-8
# 0.86 -> 1.33, 6.25 -> 14.77, 118.7 -> 74.1 (each check below fails).
UNIME_LEARNING_STEPS = 50


def test_unime_example_stage_2_learns_the_heldout_t2i_set(tmp_path):
    default_teacher(default_data())
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", str(UNIME_LEARNING_STEPS), "--save_strategy", "no",
            "--report_to", "none", "--eval_strategy", "no", "--heldout_tasks", "retrieval"]  # fmt: skip
    assert _main("train_unime")(argv) == 0
    results = json.loads((out / "results.json").read_text())
    before, after = (results[column]["retrieval"]["flickr30k"] for column in ("after stage 1", "after"))
    assert after["t2i_R@1"] > before["t2i_R@1"] + 2.5, (before["t2i_R@1"], after["t2i_R@1"])
    assert after["t2i_R@10"] > before["t2i_R@10"] + 20, (before["t2i_R@10"], after["t2i_R@10"])
    assert after["t2i_MnR"] < before["t2i_MnR"] / 2, (before["t2i_MnR"], after["t2i_MnR"])


# The multi-vector default learns (it sat at ln 2 before its page masks and loss were fixed: README,
# "Why the multi-vector default learns"). Measured 2026-12-07 on a quiet machine: 100 steps take 30 s
# and move held-out NDCG@5 3.44 -> 15.33 (50 steps: 8.10; the example's 400: 60.06).
COLPALI_LEARNING_STEPS = 100


def test_colpali_example_learns_the_visual_document_set(tmp_path):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", str(COLPALI_LEARNING_STEPS), "--save_strategy", "no",
            "--report_to", "none", "--eval_strategy", "no"]  # fmt: skip
    assert _main("train_colpali")(argv) == 0
    results = json.loads((out / "results.json").read_text())
    before, after = (results[column]["visdoc"]["documents"] for column in ("before", "after"))
    assert after["ndcg_linear@5"] > before["ndcg_linear@5"] + 6, (before["ndcg_linear@5"], after["ndcg_linear@5"])
    assert after["recall@10"] > before["recall@10"], (before["recall@10"], after["recall@10"])


def test_colpali_example_scores_the_visual_document_set_before_and_after(tmp_path, capsys):
    """The multi-vector example: the visual-document set only (MaxSim), before and after; its default
    evaluation during training is that set's NDCG@5 (the others rank single vectors)."""
    from mmfast.train.example import MULTI_VECTOR_CURVE_METRIC, Example

    training = Example("colpali", ["--output_dir", str(tmp_path / "args")]).arguments().training
    assert training.eval_strategy == "steps" and training.eval_tasks == ["visdoc"]
    out = tmp_path / "run"
    assert _main("train_colpali")(["--output_dir", str(out), *SHORT, "--eval_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "documents NDCG@5" in printed and "flickr30k" not in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["before", "after"] and all(set(r) == {"visdoc"} for r in results.values())
    assert 0 <= results["after"]["visdoc"]["documents"]["ndcg_linear@5"] <= 100
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if MULTI_VECTOR_CURVE_METRIC in e] == [2]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG") and (out / "mmfast_projection.safetensors").is_file()


def test_heldout_tasks_none_skips_the_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main("train_llave")(["--output_dir", str(out), *SHORT, "--heldout_tasks", "none"]) == 0
    assert "no held-out evaluation" in capsys.readouterr().out
    assert not (out / "results.json").exists() and (out / "loss.png").is_file()


# --- dry runs ---


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    """Stand-ins for the published data: the generated default's MMEB-train rows, NLI CSV and a teacher,
    enough rows for the configs' batches over 8 processes (the dry run cuts the epoch as training does)."""
    data = default_data()
    teacher = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    import torch

    rows = Sizes().nli_rows
    save_teacher(teacher, torch.randn(rows, 8), torch.randn(rows, 8))
    mmeb = ["--data", *map(str, data.train_files), "--image_dir", str(data.image_dir)]
    return {
        "mmeb": mmeb,
        "nli": ["--data", str(data.nli)],
        "teacher": ["--data", str(data.nli), "--teacher", str(teacher)],
    }


CONFIG_DATA = {
    "vlm2vec-qwen2-vl-2b": ("train_vlm2vec", "mmeb", "Qwen2VLForConditionalGeneration"),
    "colqwen2-qwen2-vl-2b": ("train_colpali", "mmeb", "Qwen2VLForConditionalGeneration"),
    "llave-llava-onevision-0.5b": ("train_llave", "mmeb", "LlavaOnevisionForConditionalGeneration"),
    "e5v-llama3-llava-next-8b": ("train_e5v", "nli", "LlavaNextForConditionalGeneration"),
    "unime-stage1-llava-v1.6-mistral-7b": (None, "teacher", "LlavaNextForConditionalGeneration"),
    "unime-stage2-llava-v1.6-mistral-7b": (None, "mmeb", "LlavaNextForConditionalGeneration"),
}


def test_every_config_has_a_dry_run_case():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(CONFIG_DATA)


@pytest.mark.parametrize("name", sorted(CONFIG_DATA))
def test_published_config_dry_run(name, local_data, capsys):
    script, kind, model_class = CONFIG_DATA[name]
    config = CONFIGS / f"{name}.yaml"
    argv = ["--config", str(config), "--dry-run", "--num_processes", "8", *local_data[kind]]
    status = _main(script)(argv) if script else train_main(argv)
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert model_class in printed.out and "dry run: valid" in printed.out
    per_device = yaml.safe_load(config.read_text())["per_device_train_batch_size"]
    assert f"contrastive batch: {per_device * 8} ({per_device} per device × 8 process(es)" in printed.out
    assert "GradCache mini-batch: " in printed.out
    assert ("distillation: " if "unime-stage1" in name else "negatives per query: ") in printed.out
    # Without the data on this machine, the same config fails and names what is missing.
    status = _main(script)(argv[:5]) if script else train_main(argv[:5])
    printed = capsys.readouterr()
    (error,) = [line for line in printed.err.splitlines() if "error:" in line]  # one line naming every path
    assert status == 2 and "does not exist" in error and "data/" in error


def test_unime_example_dry_runs_both_stages(local_data, capsys):
    argv = ["--config", str(CONFIGS / "unime-stage1-llava-v1.6-mistral-7b.yaml"), "--dry-run", *local_data["teacher"],
            "--stage2_config", str(CONFIGS / "unime-stage2-llava-v1.6-mistral-7b.yaml")]  # fmt: skip
    status = _main("train_unime")(argv)
    printed = capsys.readouterr()
    # stage 2's config still points at MMEB-train (not here): stage 1 is valid, stage 2 names the paths
    assert status == 2 and printed.out.count("dry run: valid") == 1 and "--- stage 2: unime-stage2" in printed.out
    assert "MMEB-train" in printed.err


def test_dry_run_of_a_broken_config_names_the_field_or_path(tmp_path, local_data, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("recipe: llave\nper_device_batch: 4\n")
    assert train_main(["--config", str(broken), "--dry-run"]) == 2
    assert "unknown argument(s) per_device_batch" in capsys.readouterr().err
    broken.write_text("recipe: llave\nmodel_name_or_path: someone/mystery-model\n")
    assert train_main(["--config", str(broken), "--dry-run", *local_data["mmeb"]]) == 2
    assert "someone/mystery-model" in capsys.readouterr().err
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert train_main(["--model_name_or_path", str(folder), "--dry-run", *local_data["mmeb"]]) == 2
    assert "unsupported model_type 'bert'" in capsys.readouterr().err
    assert train_main(["--recipe", "unime-stage1", "--dry-run", *local_data["nli"]]) == 2
    assert "--teacher" in capsys.readouterr().err
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert train_main(["--model_name_or_path", str(text_only), "--dry-run", *local_data["mmeb"]]) == 2
    assert "text-only" in capsys.readouterr().err


def test_dry_run_counts_rows_that_training_would_skip(tmp_path, capsys):
    from PIL import Image

    rows = [{"qry": "a red circle", "qry_image_path": "", "pos_text": "<|image_1|>", "pos_image_path": f"{i}.jpg"}
            for i in range(7)]  # fmt: skip
    for i in range(3, 7):  # rows 0-2 name images that are not there
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / f"{i}.jpg")
    data = tmp_path / f"{TRAIN_SUBSETS[0]}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_main(["--data", str(data), "--image_dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "missing image: 3" in out and "4 usable" in out
    # With no usable row left, training would stop: so does the dry run, naming the subset.
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert train_main(["--data", str(data), "--image_dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"subset '{TRAIN_SUBSETS[0]}' has no usable row" in err and "missing image: 3" in err


def test_example_flags_do_not_collide_with_training_arguments():
    from mmfast.train.arguments import known_fields

    assert (
        not {"heldout_tasks", "heldout_size", "stage2_config", "dry_run", "num_processes", "accelerate_config"}
        & known_fields()
    )


def test_published_config_with_an_accelerate_config(local_data, capsys, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)  # the accelerate config names its DeepSpeed file from the repository root
    argv = ["--config", str(CONFIGS / "llave-llava-onevision-0.5b.yaml"), "--dry-run", *local_data["mmeb"],
            "--accelerate_config", str(CONFIGS / "accelerate-zero3.yaml")]  # fmt: skip
    assert _main("train_llave")(argv) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 from examples/configs/deepspeed-zero3.json" in out
    assert "contrastive batch: 32 (4 per device × 8 process(es), gathered across devices)" in out
    assert "gradient_accumulation_steps=8 averages gradients" in out  # the published LLaVE run's, still warned


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    """Run as a user runs it: a missing data file is one line naming it, exit 2, no traceback."""
    missing = tmp_path / "nowhere.jsonl"
    argv = [sys.executable, str(EXAMPLES / "train_llave.py"), "--data", str(missing), "--output_dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"train_llave.py: error: --data: {missing} does not exist"


def test_the_default_evaluates_during_training_unless_told_otherwise(tmp_path):
    """Issue 22: the default run (make demo) evaluates held-out retrieval every 50 steps and draws its R@1
    beside the loss; a command line or config that says how to evaluate, or the user's own data, decides."""
    from mmfast.train.example import CURVE_METRIC, Example, plot_losses

    def training_args(*argv):
        return Example("llave", ["--output_dir", str(tmp_path), *argv]).arguments().training

    default = training_args()
    assert default.eval_strategy == "steps" and default.eval_steps == 50 and default.eval_tasks == ["retrieval"]
    assert training_args("--eval_strategy", "no").eval_strategy == "no"
    assert training_args("--eval_strategy", "steps", "--eval_tasks", "mmeb").eval_tasks == ["mmeb"]
    data = default_data()
    assert (
        training_args("--data", *map(str, data.train_files), "--image_dir", str(data.image_dir)).eval_strategy == "no"
    )
    history = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": 4, CURVE_METRIC: 12.5}]
    assert plot_losses({"training": history}, tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")


def test_the_loss_curve_names_stages_only_when_there_are_several(tmp_path, monkeypatch):
    """A one-stage run's legend says "training loss", not "stage 1: training loss"; a two-stage run's
    names each line's stage."""
    import matplotlib.pyplot as plt

    from mmfast.train.example import CURVE_METRIC, plot_losses

    legends, close = [], plt.close

    def keep_legend(figure):
        legends.append([text.get_text() for text in figure.axes[0].get_legend().get_texts()])
        close(figure)

    monkeypatch.setattr(plt, "close", keep_legend)
    history = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": 4, CURVE_METRIC: 12.5}]
    plot_losses({"stage 1": history}, tmp_path / "one.png")
    plot_losses({"stage 1": history, "stage 2": history}, tmp_path / "two.png")
    held_out = f"held-out {CURVE_METRIC}"
    assert legends == [
        ["training loss", held_out],
        ["stage 1: training loss", "stage 2: training loss", f"stage 1: {held_out}", f"stage 2: {held_out}"],
    ]

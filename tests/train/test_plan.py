"""The plan (the dry run's, and the start-of-run log) reads the run's resolved options, not the recipe's
defaults: the loss as overridden, the adapter, integer counts per query, the mean with its range where
rows hold different numbers of hard negatives, and cross-device counts that include hard negatives."""

import json
from pathlib import Path

from PIL import Image

from mmfast.train.arguments import parse_arguments
from mmfast.train.cli import train_main
from mmfast.train.plan import BatchPlan, HardNegatives
from mmfast.train.run import describe_run

REPOSITORY = Path(__file__).parents[2]


def _dry_run(capsys, *argv):
    status = train_main(["--dry-run", *argv])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def _section(out: str, label: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(label + " ")]
    return line


def test_overridden_loss_options_are_what_the_plan_says(capsys, tmp_path):
    status, out, err = _dry_run(capsys, "--recipe", "llave", "--symmetric", "False", "--hardness", "0",
                                "--output_dir", str(tmp_path))  # fmt: skip
    assert status == 0, err
    assert "symmetric" not in out and "α 9" not in out and "hardness" not in out
    assert "InfoNCE τ 0.02, query → target only" in _section(out, "recipe")
    status, out, err = _dry_run(capsys, "--recipe", "llave", "--temperature", "0.05", "--output_dir", str(tmp_path))
    assert status == 0, err
    recipe = _section(out, "recipe")
    assert "InfoNCE τ 0.05, hardness-weighted (α 9), symmetric" in recipe and "0.02" not in recipe
    assert "symmetric: each target is also contrasted with the other 63 queries" in out


def test_the_recipe_line_names_no_adapter_or_gradcache_the_run_does_not_use(capsys, tmp_path):
    status, out, err = _dry_run(capsys, "--recipe", "vlm2vec", "--output_dir", str(tmp_path))
    assert status == 0, err
    assert "LoRA" not in _section(out, "recipe") and "GradCache" not in _section(out, "recipe")
    assert _section(out, "adapter").endswith("full fine-tune")
    assert "GradCache mini-batch: off" in out


def test_the_adapter_line_gives_r_alpha_and_targets(capsys, tmp_path):
    status, out, err = _dry_run(capsys, "--lora", "True", "--lora_r", "8", "--lora_alpha", "24", "--use_dora", "True",
                                "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(tmp_path))  # fmt: skip
    assert status == 0, err
    assert _section(out, "adapter").endswith("DoRA r8 α24 dropout 0.1 on q_proj, v_proj")


def _rows(tmp_path: Path, negatives_per_row: list[int]) -> str:
    Image.new("RGB", (16, 16), (200, 20, 20)).save(tmp_path / "a.jpg")
    path = tmp_path / "Rows.jsonl"
    rows = [
        {"qry": f"query {i}", "qry_image_path": "", "pos_text": f"target {i}", "pos_image_path": "a.jpg",
         "neg_text": [f"negative {i}.{k}" for k in range(count)], "neg_image_path": [""] * count}
        for i, count in enumerate(negatives_per_row)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rows_with_different_hard_negatives_give_the_mean_and_its_range(capsys, tmp_path):
    # 15 rows with one hard negative, 17 with none; 8 rows per device on 2 processes: 16 per contrastive batch
    data = _rows(tmp_path, [1] * 15 + [0] * 17)
    status, out, err = _dry_run(capsys, "--data", data, "--image_dir", str(tmp_path), "--per_device_train_batch_size",
                                "8", "--num_processes", "2", "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 0, err
    assert (
        "negatives per query: 15 in-batch + 7.5 hard on average (0 to 15 by batch) "
        "(of which cross-device: 8 targets + 3.8 hard on average (0 to 8 by batch))"
    ) in out
    assert "the rows hold 0 to 1 hard negatives each, 0.47 on average" in out


def test_counts_per_query_are_integers_when_every_row_holds_the_same(capsys, tmp_path):
    data = _rows(tmp_path, [2] * 32)
    status, out, err = _dry_run(capsys, "--data", data, "--image_dir", str(tmp_path), "--per_device_train_batch_size",
                                "8", "--num_processes", "2", "--max_negatives", "1",
                                "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert status == 0, err
    assert "negatives per query: 15 in-batch + 16 hard (of which cross-device: 8 targets + 8 hard)" in out
    assert ".0" not in _section(out, "batches") and "the rows hold" not in out


def test_unread_data_still_counts_hard_negatives_among_the_cross_device_ones(capsys, tmp_path):
    status, out, _ = _dry_run(capsys, "--config", str(REPOSITORY / "examples/configs/vlm2vec-qwen2-vl-2b.yaml"),
                              "--num_processes", "8", "--output_dir", str(tmp_path))  # fmt: skip
    assert "negatives per query: 1023 in-batch + the hard negatives of its 1024 rows" in out
    assert "(of which cross-device: 896 targets + their rows' hard negatives)" in out
    assert _section(out, "adapter").endswith("DoRA r16 α64 dropout 0.1 on the language model's attention and MLP "
                                             "projections")  # fmt: skip
    assert "GradCache mini-batch: 32 (4 mini-batch(es) per device per step)" in out


def test_hard_negative_ranges_take_the_fewest_and_the_most_rows():
    hard = HardNegatives.of([0, 0, 1, 3, 5])
    assert hard.in_rows(2) == (0, 2 * 9 / 5, 8)
    assert hard.in_rows(5) == (9, 9.0, 9)
    assert HardNegatives.of([4]).in_rows(7) == (28, 28.0, 28)
    assert HardNegatives.of([1, 2]).in_rows(6) == (7, 9.0, 11)  # more rows than the data: rows repeat


def test_a_single_process_has_no_cross_device_negatives():
    run = parse_arguments(["--recipe", "vlm2vec", "--per_device_train_batch_size", "6",
                           "--gradcache_mini_batch_size", "0"], processes=1)  # fmt: skip
    plan = BatchPlan.of(run, HardNegatives.of([1, 2] * 6))
    assert "negatives per query: 5 in-batch + 9.0 hard on average (6 to 12 by batch)" in plan.lines()[1]
    assert "cross-device" not in "\n".join(plan.lines())


def test_the_start_of_run_log_reads_the_resolved_options_and_mentions_lora():
    run = parse_arguments(
        ["--recipe", "llave", "--symmetric", "False", "--hardness", "0", "--lora", "True", "--lora_r", "4"]
    )
    text = describe_run(run, HardNegatives.of([0]))
    assert "adapter LoRA r4 α32" in text and "symmetric" not in text and "α 9" not in text
    assert "recipe llave (LLaVE's defaults): InfoNCE τ 0.02, query → target only" in text
    assert "negatives per query: 3 in-batch + 0 hard" in text  # the recipe's 4 rows per device

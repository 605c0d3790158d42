"""HF's conventions at the end of a run, and mmfast's evaluation through the Trainer's eval machinery:
the real run path (`mmfast-train`) with the tiny default model, a few steps."""

import json

import pytest
import torch

from mmfast.train.cli import train_main
from mmfast.train.encoder import Encoder
from mmfast.train.evaluate.during_training import HeldOutEvaluation, RankShards, flat_metrics

SHORT = ["--per_device_train_batch_size", "12", "--logging_steps", "1", "--report_to", "none"]


def _state(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())


@pytest.mark.slow
def test_a_run_leaves_trainer_state_and_results_in_output_dir(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--output_dir", str(out), *SHORT, "--max_steps", "2", "--save_steps", "10"]) == 0
    state = _state(out)
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    train_results = json.loads((out / "train_results.json").read_text())
    final = state["log_history"][-1]  # the Trainer's end-of-training summary
    assert train_results["train_loss"] == pytest.approx(final["train_loss"])
    assert train_results["train_runtime"] > 0 and train_results["epoch"] == pytest.approx(final["epoch"])
    assert json.loads((out / "all_results.json").read_text()) == train_results


@pytest.mark.slow
def test_evaluation_every_two_steps_is_logged_and_the_best_checkpoint_is_reloaded(tmp_path):
    out = tmp_path / "run"
    # greater_is_better False on R@1: the best is the step that retrieved worst, the first unless a
    # later one is strictly lower, so the reload is of an earlier checkpoint than the last.
    argv = ["--output_dir", str(out), *SHORT, "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_steps", "2", "--eval_tasks", "retrieval", "--load_best_model_at_end", "True",
            "--metric_for_best_model", "flickr30k_t2i_R@1", "--greater_is_better", "False"]  # fmt: skip
    assert train_main(argv) == 0
    state = _state(out)
    evaluations = [entry for entry in state["log_history"] if "eval_flickr30k_t2i_R@1" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    for entry in evaluations:
        for name in ("flickr30k_t2i_R@1", "flickr30k_i2t_R@1", "flickr30k_t2i_R@10", "urban1k_t2i_R@1"):
            assert 0 <= entry[f"eval_{name}"] <= 100, (name, entry)
        assert entry["eval_flickr30k_t2i_R@1"] <= entry["eval_flickr30k_t2i_R@10"]
        assert entry["eval_runtime"] > 0
        assert not any(key.startswith("eval_flickr30k_num_") for key in entry)  # counts stay in results.json
        written = json.loads((out / "eval" / f"step-{entry['step']}" / "results.json").read_text())
        assert written["retrieval"]["flickr30k"]["t2i_R@1"] == pytest.approx(entry["eval_flickr30k_t2i_R@1"])

    scores = [entry["eval_flickr30k_t2i_R@1"] for entry in evaluations]
    best_step = 4 if scores[1] < scores[0] else 2  # the Trainer's rule: a strictly better score replaces the best
    assert state["best_metric"] == pytest.approx(min(scores))
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert best_step == 2, "this run should pick an earlier checkpoint than the last, to show the reload"

    texts = ["a red circle", "a small blue square"]
    final = Encoder.from_pretrained(out).encode(texts, show_progress=False)
    best = Encoder.from_pretrained(out / "checkpoint-2").encode(texts, show_progress=False)
    last = Encoder.from_pretrained(out / "checkpoint-4").encode(texts, show_progress=False)
    torch.testing.assert_close(final, best)
    assert not torch.allclose(final, last, atol=1e-4)


@pytest.mark.slow
def test_evaluation_on_the_users_data_with_its_image_root(tmp_path):
    from mmfast.train.default import default_data
    from mmfast.train.evaluate import evaluate_mmeb

    data, out = default_data(), tmp_path / "run"
    argv = ["--output_dir", str(out), *SHORT, "--max_steps", "2", "--save_steps", "10", "--eval_strategy", "steps",
            "--eval_steps", "2", "--eval_tasks", "mmeb", "--eval_data", str(data.mmeb_eval),
            "--eval_image_root", str(data.mmeb_eval_images)]  # fmt: skip
    assert train_main(argv) == 0
    (logged,) = [entry for entry in _state(out)["log_history"] if "eval_mmeb_overall_acc" in entry]
    # The evaluation at step 2 is of the final model: mmfast-eval's own entry gets the same scores.
    alone = flat_metrics(evaluate_mmeb(Encoder.from_pretrained(out), data.mmeb_eval, data.mmeb_eval_images,
                                       show_progress=False))  # fmt: skip
    assert {f"eval_{name}" for name in alone} <= set(logged)
    for name, value in alone.items():
        assert logged[f"eval_{name}"] == pytest.approx(value, abs=1e-6), name
    assert list((out / "eval" / "step-2").glob("*_score.json"))  # the subsets' VLM2Vec score files


def _run(argv, capsys):
    status = train_main(argv)
    return status, capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--eval_strategy steps: mmfast-train takes no eval dataset"),
        (["--eval_tasks", "retrieval", "retrieval"], "a task is named twice"),
        (["--eval_tasks", "nonsense"], "--eval_tasks nonsense: must be among mmeb, retrieval"),
        (["--eval_tasks", "retrieval", "--eval_data", "a", "b"], "--eval_data: give one per --eval_tasks entry"),
        (["--eval_tasks", "retrieval", "--eval_data", "/nonexistent/x.jsonl"], "--eval_data /nonexistent/x.jsonl"),
        (["--eval_tasks", "retrieval", "--load_best_model_at_end", "True", "--save_steps", "2"],
         "--load_best_model_at_end: name one of the evaluation's scores with --metric_for_best_model"),
    ],
)  # fmt: skip
def test_the_run_and_its_dry_run_refuse_bad_evaluation_settings(tmp_path, capsys, extra, message):
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--eval_strategy", "steps",
            "--eval_steps", "2", *extra]  # fmt: skip
    for command in (argv, [*argv, "--dry-run"]):
        status, captured = _run(command, capsys)
        assert status == 2
        assert message in captured.err, captured.err


def test_eval_tasks_without_a_strategy_is_an_error(tmp_path, capsys):
    status, captured = _run(["--output_dir", str(tmp_path), "--eval_tasks", "retrieval", "--dry-run"], capsys)
    assert status == 2 and "--eval_tasks: give --eval_strategy steps" in captured.err


def test_the_dry_run_accepts_an_eval_strategy_with_eval_tasks(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--report_to", "none", "--eval_strategy", "steps", "--eval_steps", "2",
            "--eval_tasks", "retrieval", "mmeb", "--load_best_model_at_end", "True", "--save_steps", "2",
            "--metric_for_best_model", "flickr30k_t2i_R@1", "--dry-run"]  # fmt: skip
    status, captured = _run(argv, capsys)
    assert status == 0, captured.err


def test_the_dry_run_checks_metric_for_best_model_against_the_evaluations_names(tmp_path, capsys):
    """A name the evaluation does not log fails the dry run (the Trainer would fail only after the first
    evaluation), naming the argument and the names there are; with or without HF's eval_ prefix it passes."""
    argv = ["--output_dir", str(tmp_path), "--report_to", "none", "--eval_strategy", "steps", "--eval_steps", "2",
            "--eval_tasks", "retrieval", "--dry-run", "--metric_for_best_model"]  # fmt: skip
    status, captured = _run([*argv, "flickr_t2i_R@1"], capsys)
    assert status == 2
    assert "--metric_for_best_model flickr_t2i_R@1: the evaluation (--eval_tasks retrieval) logs no such metric; " \
        "it logs eval_flickr30k_t2i_R@1, eval_flickr30k_t2i_R@5" in captured.err  # fmt: skip
    assert "eval_urban1k_i2t_R@1" in captured.err and "eval_runtime" in captured.err
    for name in ("urban1k_i2t_R@1", "eval_urban1k_i2t_R@1"):
        status, captured = _run([*argv, name], capsys)
        assert status == 0, captured.err


def test_the_metric_names_found_without_a_model_are_those_an_evaluation_logs():
    from mmfast.train.default import default_backbone
    from mmfast.train.evaluate.during_training import metric_names

    evaluation = HeldOutEvaluation(("retrieval", "nli"))
    logged = [f"eval_{name}" for name in flat_metrics(evaluation.run(Encoder.from_pretrained(default_backbone())))]
    assert metric_names(evaluation) == [*logged, "eval_runtime"]


def test_bare_mmfast_train_evaluates_as_it_trains_unless_told_otherwise(tmp_path, capsys):
    """The default run (no model, no data) evaluates held-out retrieval every 50 steps (a multi-vector recipe:
    the visual-document set), as the examples do; a command line or config that says how to evaluate, or a
    model or data of the user's, decides. The dry run's plan says so."""
    from mmfast.train.arguments import parse_arguments, with_default_evaluation
    from mmfast.train.default import PROFILE

    def evaluation(*argv):
        training = parse_arguments(with_default_evaluation(argv), profile=PROFILE).training
        return (
            getattr(training.eval_strategy, "value", training.eval_strategy),
            training.eval_steps,
            training.eval_tasks,
        )

    assert evaluation() == ("steps", 50, ["retrieval"])
    assert evaluation("--recipe", "colpali") == ("steps", 50, ["visdoc"])
    assert evaluation("--eval_strategy", "no") == ("no", None, None)
    assert evaluation("--eval_strategy", "steps", "--eval_tasks", "mmeb")[2] == ["mmeb"]
    assert evaluation("--data", "train.jsonl") == ("no", None, None)
    assert evaluation("--fsdp", "full_shard")[0] == "no"  # evaluation under FSDP is untested: not by default
    config = tmp_path / "run.yaml"
    config.write_text("eval_strategy: 'no'\n")
    assert evaluation("--config", str(config)) == ("no", None, None)
    status, captured = _run(["--output_dir", str(tmp_path / "out"), "--dry-run"], capsys)
    assert status == 0 and "evaluates retrieval on the held-out sets every 50 steps" in captured.out


def test_flat_metrics_name_each_score_by_set_and_metric():
    results = {
        "retrieval": {"flickr30k": {"t2i_R@1": 12.5, "i2t_R@1": 10, "num_images": 40}},
        "mmeb": {"datasets": {"ImageNet-1K": {"acc": 30.0, "num_pred": 5, "meta_task": "Classification"}},
                 "meta_tasks": {"Classification": {"acc": 30.0, "num_datasets": 1}}, "overall": {"acc": 30.0}},
    }  # fmt: skip
    assert flat_metrics(results) == {
        "flickr30k_t2i_R@1": 12.5,
        "flickr30k_i2t_R@1": 10.0,
        "mmeb_ImageNet-1K_acc": 30.0,
        "mmeb_Classification_acc": 30.0,
        "mmeb_overall_acc": 30.0,
    }
    with pytest.raises(ValueError, match="two evaluated sets give the metric 'x_acc'"):
        flat_metrics({"sugarcrepe": {"x": {"acc": 1.0}}, "video": {"x_acc": 2.0}})


def test_held_out_evaluation_pairs_data_and_image_roots_with_tasks(tmp_path):
    evaluation = HeldOutEvaluation.from_arguments(["retrieval", "mmeb"], [str(tmp_path)] * 2, None, 16)
    assert evaluation.data == (str(tmp_path), str(tmp_path)) and evaluation.image_roots is None
    with pytest.raises(ValueError, match="--eval_image_root goes with --eval_data"):
        HeldOutEvaluation.from_arguments(["retrieval"], None, [str(tmp_path)], 16)
    with pytest.raises(ValueError, match="--per_device_eval_batch_size must be a positive integer"):
        HeldOutEvaluation.from_arguments(["retrieval"], None, None, 0)


class LengthEncoder:
    """Embeds a text as [its length, the process's rank]: shows which rank embedded which input."""

    text_prompt = "{text}"

    def encode(self, texts, images=None, *, batch_size=32, show_progress=True):
        rank = torch.distributed.get_rank()
        return torch.tensor([[float(len(text)), float(rank)] for text in texts])


def _shard_worker(rank, world_size, init_file, texts, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sharded = RankShards(LengthEncoder(), rank, world_size)
        assert sharded.text_prompt == "{text}"  # the wrapped encoder's attributes show through
        results[rank] = sharded.encode(texts, batch_size=2).tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_rank_shards_embed_each_share_once_and_every_rank_gets_all_in_order(tmp_path):
    import torch.multiprocessing as mp

    texts = ["a", "bb", "ccc", "dddd", "eeeee"]  # 5 over 2 ranks: a share of 3 and one of 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_shard_worker, args=(2, str(tmp_path / "init"), texts, results), nprocs=2)
        expected = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 1.0], [5.0, 1.0]]
        assert results[0] == expected and results[1] == expected


class TokenLengthEncoder:
    """A multi-vector encoder: a text of n characters is n token vectors [n, rank] (zero-padded to the
    longest text of the call), so each rank's share has its own token count."""

    text_prompt = "{text}"

    def encode(self, texts, images=None, *, batch_size=32, show_progress=True):
        rank, longest = torch.distributed.get_rank(), max(len(text) for text in texts)
        out = torch.zeros(len(texts), longest, 2)
        for i, text in enumerate(texts):
            out[i, : len(text)] = torch.tensor([float(len(text)), float(rank)])
        return out


def _token_shard_worker(rank, world_size, init_file, texts, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = RankShards(TokenLengthEncoder(), rank, world_size).encode(texts).tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_rank_shards_pad_multi_vector_shares_to_the_longest(tmp_path):
    import torch.multiprocessing as mp

    texts = ["a", "bb", "ccc", "dddd", "eeeee"]  # rank 0 embeds 3 tokens at most, rank 1 5
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_token_shard_worker, args=(2, str(tmp_path / "init"), texts, results), nprocs=2)
        expected = torch.zeros(5, 5, 2)
        for i, text in enumerate(texts):
            expected[i, : len(text)] = torch.tensor([float(len(text)), float(i >= 3)])
        assert results[0] == expected.tolist() and results[1] == expected.tolist()


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_the_ranks_share_the_evaluation_and_rank_0_writes(tmp_path):
    from tests.train.torchrun import torchrun

    out = tmp_path / "run"
    torchrun("-m", "mmfast.train", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "10",
             "--per_device_train_batch_size", "8", "--logging_steps", "1", "--report_to", "none",
             "--eval_strategy", "steps", "--eval_steps", "2", "--eval_tasks", "retrieval", cwd=tmp_path)  # fmt: skip
    (logged,) = [entry for entry in _state(out)["log_history"] if "eval_flickr30k_t2i_R@1" in entry]
    assert logged["step"] == 2
    # The evaluation at step 2 is of the final model: one process evaluating it alone gets the same scores.
    alone = flat_metrics(HeldOutEvaluation(("retrieval",)).run(Encoder.from_pretrained(out)))
    for name, value in alone.items():
        assert logged[f"eval_{name}"] == pytest.approx(value, abs=1e-6), name
    assert sorted(path.name for path in (out / "eval").iterdir()) == ["step-2"]
    assert (out / "eval" / "step-2" / "results.json").is_file()

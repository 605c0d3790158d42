"""`--streaming`: batches read from the files as training goes keep the sampler's rules (seeded,
weighted, task-homogeneous, one round split over the ranks), count and name bad rows, and a resumed
streaming run reproduces the uninterrupted one."""

from __future__ import annotations

import json

import pytest

from mmfast.train.cli import train
from mmfast.train.data_report import BadRowError
from mmfast.train.data_spec import parse_data_spec
from mmfast.train.streaming import StreamingBatches, count_rows


def write_subset(path, name, rows, bad=()):
    lines = []
    for i in range(rows):
        query = "" if i in bad else f"{name} query {i}"
        lines.append(json.dumps({"qry": query, "qry_image_path": "", "pos_text": f"{name} positive {i}",
                                 "pos_image_path": ""}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def subsets(tmp_path):
    return [write_subset(tmp_path / "A.jsonl", "A", 23, bad=(4,)), write_subset(tmp_path / "B.jsonl", "B", 13)]


def batches(stream, n):
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out


def keys(batch):
    return [(e.subset, e.row) for e in batch]


def test_streamed_batches_are_seeded_homogeneous_and_split_over_ranks(subsets):
    sources = parse_data_spec(subsets)
    assert count_rows(subsets[0]) == 23
    make = lambda **kw: StreamingBatches(sources, 4, buffer_rows=8, **kw)  # noqa: E731
    first = [keys(b) for b in batches(make(seed=1), 10)]
    assert first == [keys(b) for b in batches(make(seed=1), 10)]  # a pure function of the seed
    assert first != [keys(b) for b in batches(make(seed=2), 10)]
    assert all(len(b) == 4 for b in first) and {s for b in first for s, _ in b} == {"A", "B"}
    assert all(("A", 4) not in b for b in first)  # the bad row never comes
    homogeneous = [keys(b) for b in batches(make(seed=1, homogeneous=True), 12)]
    assert all(len({s for s, _ in b}) == 1 for b in homogeneous)
    # Two ranks: each takes its half of the same round; a round holds no row twice.
    ranks = [[keys(b) for b in batches(make(seed=3, num_replicas=2, rank=r, homogeneous=True), 6)] for r in (0, 1)]
    for zero, one in zip(*ranks, strict=True):
        assert {s for s, _ in zero + one} and len({s for s, _ in zero + one}) == 1
        assert len(set(zero + one)) == 8


def test_a_streamed_bad_row_is_counted_once_and_named_or_strict(subsets):
    sources = parse_data_spec(subsets[:1])
    reports = [b.skipped for b in batches(StreamingBatches(sources, 4, buffer_rows=4), 6)]
    (counted,) = [r for r in reports if r.total]
    assert counted.counts == {"empty query": 1} and counted.offenders["empty query"][0].row == 4
    assert counted.offenders["empty query"][0].source == str(subsets[0])
    rank_one = [b.skipped.total for b in batches(StreamingBatches(sources, 2, num_replicas=2, rank=1), 6)]
    assert rank_one == [0] * 6
    with pytest.raises(BadRowError, match=r"A\.jsonl, row 4: empty query"):
        batches(StreamingBatches(sources, 4, buffer_rows=4, strict=True), 6)


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.slow
def test_a_resumed_streaming_run_reproduces_the_uninterrupted_one(tmp_path, subsets):
    def argv(out, *extra):
        return ["--data", *map(str, subsets), "--streaming", "True", "--output_dir", str(out),
                "--per_device_train_batch_size", "6", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
                "--report_to", "none", "--cpu_threads", "1", "--disable_tqdm", "True", *extra]  # fmt: skip

    whole = train(argv(tmp_path / "whole"))
    losses = _losses(whole)
    assert sorted(losses) == [1, 2, 3, 4]
    assert whole.data_report.counts == {"empty query": 1}  # counted by the run, as the stream met it
    resumed = train(argv(tmp_path / "resumed", "--resume_from_checkpoint", str(tmp_path / "whole" / "checkpoint-2")))
    assert {step: loss for step, loss in _losses(resumed).items() if step > 2} == {3: losses[3], 4: losses[4]}
    with pytest.raises(ValueError, match="--streaming: a stream has no length; give --max_steps"):
        train(argv(tmp_path / "endless", "--max_steps", "-1"))

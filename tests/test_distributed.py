"""Cross-device negatives on real processes (gloo, CPU): each rank's loss and gradients against the
single-process loss over the concatenated global batch."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

import mmfast
from mmfast.reference import contrastive_loss_reference, distillation_loss_reference, sigmoid_loss_reference
from tests import distributed_worker as worker

TIMEOUT_SECONDS = 600
# Scalars every rank holds a copy of (a learnable τ, the sigmoid loss's scale and bias).
SHARED_PARAMETERS = {"temperature", "logit_scale", "logit_bias"}


def run_ranks(sizes: list[int], tmp_path) -> list[dict]:
    init_file = tmp_path / "rendezvous"
    context = mp.start_processes(worker.worker, args=(sizes, str(init_file), str(tmp_path)), nprocs=len(sizes),
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {len(sizes)} ranks did not finish within {TIMEOUT_SECONDS} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]


def expected(case: dict, everything: dict, sizes: list[int]):
    """Per-rank losses and the gradient of Σ_rank loss_rank, from one process over the whole batch."""
    if case["op"] == "contrastive":
        leaves = {k: everything[k].clone().requires_grad_() for k in ("query", "target", "negatives")}
        options = dict(case["options"])
        if case.get("tensor_temperature"):
            leaves["temperature"] = options["temperature"] = worker.temperature_leaf(options)
        rows = contrastive_loss_reference(
            leaves["query"], leaves["target"], leaves["negatives"] if case["negatives"] else None,
            reduction="none", **options, **worker.duplicate_ids(everything, case),
        )  # fmt: skip
        if case["weighted"]:
            rows = rows * everything["weight"]
    elif case["op"] == "sigmoid":
        leaves = {k: everything[k].clone().requires_grad_() for k in ("query", "target", "negatives")}
        leaves |= worker.sigmoid_parameter_leaves()
        rows = sigmoid_loss_reference(
            leaves["query"], leaves["target"], leaves["negatives"], logit_scale=leaves["logit_scale"],
            logit_bias=leaves["logit_bias"], reduction="none", **worker.duplicate_ids(everything, case),
        ) * everything["weight"]  # fmt: skip
    else:
        leaves = {k: everything[k].clone().requires_grad_() for k in ("query", "target")}
        rows = distillation_loss_reference(
            leaves["query"], leaves["target"], everything["teacher_query"], everything["teacher_target"],
            student_temperature=0.05, teacher_temperature=0.1, reduction="none",
        )  # fmt: skip
    losses, total, start = [], 0.0, 0
    prefix_weights = case.get("options", {}).get("matryoshka_weights")
    for n in sizes:
        part = rows[..., start : start + n]  # Matryoshka: [m, B], a row per prefix
        if case["reduction"] == "none":
            losses.append(part)
            total = total + (part * everything["grad_out"][start : start + n]).sum()
        else:
            mean = part.mean(-1) if prefix_weights is None else (part.mean(-1) * part.new_tensor(prefix_weights)).sum()
            losses.append(mean)
            total = total + mean
        start += n
    total.backward()
    return losses, {k: v.grad for k, v in leaves.items()}


@pytest.fixture(scope="module", params=[[3, 5], [2, 4, 3], [4, 1, 3, 2]], ids=["2-ranks", "3-ranks", "4-ranks"])
def ranks(request, tmp_path_factory) -> tuple[list[int], list[dict]]:
    """(the per-rank batch sizes, every rank's results): one run of the worker serves every test."""
    return request.param, run_ranks(request.param, tmp_path_factory.mktemp("ranks"))


def assert_rank_matches(got: dict, losses, grads: dict, rows: dict, rank: int, name: str) -> None:
    """One rank's loss and gradients against the single-process ones; rows[key] = this rank's rows."""
    torch.testing.assert_close(got["loss"], losses[rank].detach(), rtol=1e-9, atol=1e-11,
                               msg=lambda m: f"{name} rank {rank} loss: {m}")  # fmt: skip
    for key, (start, n) in rows.items():
        have = got["grads"][key]
        assert have is not None, f"{name} rank {rank}: no gradient for {key}"
        label = f"{name} rank {rank} {key}"
        torch.testing.assert_close(have, grads[key][start : start + n], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, label=label: f"{label}: {m}")  # fmt: skip


@pytest.mark.distributed
def test_cross_device_matches_single_process_over_the_global_batch(ranks):
    sizes, results = ranks
    everything = worker.global_inputs(sum(sizes))
    for with_negatives in (False, True):
        ids = worker.duplicate_ids(
            everything, {"ids": True, "negatives": with_negatives, "options": {"symmetric": True}}
        )
        counts = mmfast.masked_candidate_counts(sum(sizes), ids["candidate_ids"], ids["query_ids"])
        got = torch.cat(
            [results[rank][f"masked_counts-{'K' if with_negatives else 'noK'}"] for rank in range(len(sizes))]
        )
        assert torch.equal(got, counts), (with_negatives, got, counts)
    for name, case in worker.cases():
        losses, grads = expected(case, everything, sizes)
        start = 0
        for rank, n in enumerate(sizes):
            got = results[rank][name]
            torch.testing.assert_close(got["loss"], losses[rank].detach(), rtol=1e-9, atol=1e-11,
                                       msg=lambda m, name=name, rank=rank: f"{name} rank {rank} loss: {m}")  # fmt: skip
            for key, grad in grads.items():
                if case["op"] == "contrastive" and key == "negatives" and not case["negatives"]:
                    continue
                if key in SHARED_PARAMETERS:  # one per rank: the ranks' gradients sum to the total's
                    continue
                want = grad[start : start + n]
                have = got["grads"][key]
                assert have is not None, f"{name} rank {rank}: no gradient for {key}"
                label = f"{name} rank {rank} {key}"
                torch.testing.assert_close(
                    have, want, rtol=1e-9, atol=1e-11, msg=lambda m, label=label: f"{label}: {m}"
                )
            start += n
        for key in SHARED_PARAMETERS & grads.keys():
            total = sum(results[rank][name]["grads"][key] for rank in range(len(sizes)))
            torch.testing.assert_close(total, grads[key], rtol=1e-9, atol=1e-11,
                                       msg=lambda m, name=name, key=key: f"{name} {key}: {m}")  # fmt: skip


@pytest.mark.distributed
def test_negatives_of_a_different_count_on_each_rank_and_none_on_one(ranks):
    sizes, results = ranks
    counts, negatives = worker.ragged_negatives(sizes)
    everything = worker.global_inputs(sum(sizes)) | {"negatives": negatives}
    for name, case in worker.ragged_cases():
        losses, grads = expected(case, everything, sizes)
        for rank, n in enumerate(sizes):
            rows = {"query": (sum(sizes[:rank]), n), "target": (sum(sizes[:rank]), n),
                    "negatives": (sum(counts[:rank]), counts[rank])}  # fmt: skip
            assert_rank_matches(results[rank][name], losses, grads, rows, rank, name)


@pytest.mark.distributed
def test_both_ways_of_summing_to_the_owner_in_every_dtype_with_a_rank_of_no_rows_or_equal_rows(ranks):
    sizes, results = ranks
    for rank in range(len(sizes)):
        checks = results[rank]["sums_to_owner"]
        assert len(checks) == 2 * 4 * len(worker.SUM_DTYPES)  # 2 layouts × 4 checks
        for label, (got, want) in checks.items():
            assert got.shape == want.shape, (label, rank, got.shape, want.shape)
            assert torch.equal(got.double(), want.double()), (label, rank, got, want)  # small integers: exact


@pytest.mark.distributed
def test_backward_receives_only_this_ranks_rows(ranks):
    """One symmetric float32 loss with K = 2 negatives: the forward all-gathers (padded to the largest
    batch), the backward one all-to-all per gathered tensor (targets, queries, negatives: gloo) that
    hands this rank only its rows of every rank's gradient, and no all-reduce. The bytes the process
    sent during each backward call (the kernel's count) are the other ranks' rows, plus gloo's headers."""
    sizes, results = ranks
    world, total, row_bytes = len(sizes), sum(sizes), worker.D * 4
    for rank, n in enumerate(sizes):
        calls = results[rank]["collectives"]
        forward = [c for c in calls if c["phase"] == "forward"]
        padded = [c for c in forward if c["input_bytes"] > 8]  # past the batch sizes' all-gathers
        assert sorted(c["input_bytes"] // max(sizes) for c in padded) == sorted(
            [row_bytes, row_bytes, worker.K * row_bytes]
        )
        assert all(c["collective"] == "all_gather" and c["output_bytes"] == world * c["input_bytes"] for c in padded)
        backward = [c for c in calls if c["phase"] == "backward"]
        assert [c["collective"] for c in backward] == ["all_to_all_single"] * 3, (rank, backward)
        for call, width in zip(sorted(backward, key=lambda c: c["input_bytes"]), (1, 1, worker.K), strict=True):
            assert call["input_bytes"] == total * width * row_bytes, (rank, call)
            assert call["output_bytes"] == world * n * width * row_bytes, (rank, call)
            others = (total - n) * width * row_bytes  # sent: the other ranks' rows of this rank's gradient
            assert others <= call["sent_bytes"] <= others + 512 * (world - 1), (rank, call, others)

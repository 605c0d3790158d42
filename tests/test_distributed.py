"""Cross-device negatives on real processes (gloo, CPU): each rank's loss and gradients against the
single-process loss over the concatenated global batch."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

import mmfast
from mmfast.reference import contrastive_loss_reference, distillation_loss_reference
from tests import distributed_worker as worker

TIMEOUT_SECONDS = 600


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
    else:
        leaves = {k: everything[k].clone().requires_grad_() for k in ("query", "target")}
        rows = distillation_loss_reference(
            leaves["query"], leaves["target"], everything["teacher_query"], everything["teacher_target"],
            student_temperature=0.05, teacher_temperature=0.1, reduction="none",
        )  # fmt: skip
    losses, total, start = [], 0.0, 0
    for n in sizes:
        part = rows[start : start + n]
        if case["reduction"] == "none":
            losses.append(part)
            total = total + (part * everything["grad_out"][start : start + n]).sum()
        else:
            losses.append(part.mean())
            total = total + part.mean()
        start += n
    total.backward()
    return losses, {k: v.grad for k, v in leaves.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [[3, 5], [2, 4, 3]], ids=["2-ranks", "3-ranks"])
def test_cross_device_matches_single_process_over_the_global_batch(sizes, tmp_path):
    results = run_ranks(sizes, tmp_path)
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
                if key == "temperature":  # one τ per rank: the ranks' gradients sum to the total's
                    continue
                want = grad[start : start + n]
                have = got["grads"][key]
                assert have is not None, f"{name} rank {rank}: no gradient for {key}"
                label = f"{name} rank {rank} {key}"
                torch.testing.assert_close(
                    have, want, rtol=1e-9, atol=1e-11, msg=lambda m, label=label: f"{label}: {m}"
                )
            start += n
        if "temperature" in grads:
            total = sum(results[rank][name]["grads"]["temperature"] for rank in range(len(sizes)))
            torch.testing.assert_close(total, grads["temperature"], rtol=1e-9, atol=1e-11,
                                       msg=lambda m, name=name: f"{name} τ: {m}")  # fmt: skip

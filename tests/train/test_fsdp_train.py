"""GradCache under FSDP2 on the CPU (gloo): the encoder sharded with `fully_shard` (each backbone layer a
unit), 2 ranks × B rows give the loss and every parameter's full gradient of 1 process × 2B rows, for every
recipe, with the gradient reduce-scatter held to the last mini-batch (one sync per step, the trainer's
choice) and synced per mini-batch (one sync per mini-batch). The level proven is the trainer's step on a
model sharded by `fully_shard`; `accelerate launch` with FSDP is not run here."""

from pathlib import Path

import pytest
import torch

from tests.train.distributed_train_worker import CASES, trainer_for
from tests.train.fsdp_train_worker import aligned_rows
from tests.train.torchrun import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = Path(__file__).with_name("fsdp_train_worker.py")
ROWS_PER_RANK = 6


def assert_gradients_equal(got: dict, reference: dict, case: str) -> None:
    assert got.keys() == reference.keys(), case
    for name, grad in reference.items():
        # fp32 sums taken in another order: equal within 1e-5 of the gradient's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{case}: {name}")


def test_fsdp2_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    torchrun(str(WORKER), str(tmp_path), str(ROWS_PER_RANK), *CASES, cwd=tmp_path)
    for case in CASES:
        got = torch.load(tmp_path / f"{case}.pt")
        trainer = trainer_for(case, str(tmp_path / f"{case}-single"), 2 * ROWS_PER_RANK, mini_batch=0)
        trainer.current_gradient_accumulation_steps = 1
        rows = aligned_rows(trainer, ROWS_PER_RANK)
        loss = trainer.training_step(trainer.model, trainer.data_collator(rows))
        # Each rank's loss is that of its own queries against every rank's candidates: their mean is
        # the loss of the whole batch.
        torch.testing.assert_close(torch.stack(got["losses"]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
        reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert_gradients_equal(got["grads"], reference, case)
        assert_gradients_equal(got["grads_per_mini_batch"], reference, case + " (synced per mini-batch)")
        # Two GradCache mini-batches per rank. Synced per mini-batch: each FSDP unit's gradient is
        # reduce-scattered once per mini-batch. Held to the last mini-batch: fewer, but not yet as few as one
        # plain backward's (measured: the backbone's layer units reduce-scatter twice in the last
        # mini-batch's backward; README, "GradCache under FSDP2").
        assert got["mini_batches"] == 2, case
        assert got["per_mini_batch"] == got["mini_batches"] * got["one_sync"] > 0, case
        assert got["one_sync"] <= got["reduce_scatters"] < got["per_mini_batch"], case

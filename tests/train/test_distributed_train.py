"""Data-parallel training on the CPU (gloo): torchrun runs the default and the LLaVE example, and 2 ranks ×
B rows give the gradients of 1 process × 2B rows, for every recipe, with GradCache and one all-reduce per step; every
contrastive recipe's batch holds hard negatives on both ranks (uneven counts: the gather pads them).
New cases (a recipe plus options) go in distributed_train_worker.CASES."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.distributed_train_worker import CASES, assert_gradients_equal, batch_rows, trainer_for, uneven_rows
from tests.train.torchrun import REPOSITORY, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = Path(__file__).with_name("distributed_train_worker.py")
ROWS_PER_RANK = 6
# Recipes with hard negatives: single-vector InfoNCE, multi-vector late interaction (tokens padded across ranks), and
# the sigmoid loss (its learnable logit scale and bias get their gradients from every rank's loss too).
UNEVEN_CASES = ("vlm2vec", "colpali", "sigmoid")


def test_torchrun_trains_the_default(tmp_path):
    out = tmp_path / "run"
    done = torchrun("-m", "mmfast.train", "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
                     "--per_device_train_batch_size", "8", "--logging_steps", "1", cwd=tmp_path)  # fmt: skip
    # Data-parallel for real: both ranks in one process group, negatives gathered across them.
    assert "contrastive batch: 16 (8 per device × 2 process(es), gathered across devices)" in done.stderr
    assert done.stderr.count("contrastive batch: ") == 1 and done.stderr.count("adapter full fine-tune") == 1  # rank 0
    # The default freezes its vision tower and ties its head: DDP is not asked to search for unused parameters
    # (HF's default for a model that is not a PreTrainedModel), so it has nothing to warn about.
    assert "find_unused_parameters" not in done.stderr
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert (out / "mmfast_encoder.json").is_file()
    # The checkpoint was written aside by both ranks and published once complete, with every rank's files.
    manifest = json.loads((out / "checkpoint-2" / "mmfast_checkpoint.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(manifest)
    assert not (out / ".partial").exists()


def test_torchrun_runs_the_llave_example(tmp_path):
    out = tmp_path / "run"
    done = torchrun(str(REPOSITORY / "examples" / "train_llave.py"), "--output_dir", str(out), "--max_steps", "2",
                    "--per_device_train_batch_size", "8", "--heldout_size", "tiny", "--logging_steps", "1",
                    "--save_steps", "10", "--report_to", "none", cwd=tmp_path)  # fmt: skip
    assert "contrastive batch: 16 (8 per device × 2 process(es), gathered across devices)" in done.stderr
    # rank 0 alone evaluates and writes the results, before and after the 2 data-parallel steps
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["before", "after"]
    assert 0 <= results["after"]["retrieval"]["flickr30k"]["t2i_R@1"] <= 100
    assert done.stdout.count("results: ") == 1 and (out / "loss.png").is_file()
    assert (out / "mmfast_encoder.json").is_file()


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    torchrun(str(WORKER), str(tmp_path), str(ROWS_PER_RANK), *CASES, cwd=tmp_path)
    for recipe in CASES:
        got = torch.load(tmp_path / f"{recipe}.pt")
        # GradCache ran two mini-batches per rank, yet synchronised gradients exactly once.
        assert got["allreduces"] == got["one_sync"] >= 1, recipe
        # Hard negatives on both ranks for every contrastive recipe (distillation takes none).
        if CASES[recipe][0] != "unime-stage1":
            assert all(n > 0 for n in got["negatives_per_rank"]), (recipe, got["negatives_per_rank"])
        trainer = trainer_for(recipe, str(tmp_path / f"{recipe}-single"), 2 * ROWS_PER_RANK, mini_batch=0)
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(
            trainer.model, trainer.data_collator(batch_rows(trainer, 0, 2 * ROWS_PER_RANK, 2 * ROWS_PER_RANK))
        )
        reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert got["grads"].keys() == reference.keys(), recipe
        for name, grad in reference.items():
            # fp32 sums taken in another order: equal to ~1e-6 of the gradient's scale (measured 1.5e-6).
            scale = grad.abs().max().item()
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{recipe}: {name}")


def test_ddp_ranks_differing_in_hard_negatives_and_mini_batches_equal_one_process(tmp_path):
    """Rank 0's rows with hard negatives, rank 1's without: the cross-device loss gathers negatives on rank 0, so
    rank 1's gathers them too, giving its loss negatives of no rows (decided by one small all-gather before the
    step, rank_alignment.hard_negatives_on_other_ranks_only); without it gloo aborts on a size mismatch. Without
    GradCache, and with GradCache mini-batches by a token budget that holds rank 1's batch in one and rank 0's,
    with its negatives, in more: under DDP nothing else needs aligning. Each step equals one process on the
    concatenated batch, with one gradient sync per step (as many all-reduces as the plain step)."""
    torchrun(str(WORKER), str(tmp_path), str(ROWS_PER_RANK), *(f"uneven={case}" for case in UNEVEN_CASES),
             cwd=tmp_path)  # fmt: skip
    for case in UNEVEN_CASES:
        got = torch.load(tmp_path / f"uneven-{case}.pt")
        trainer = trainer_for(case, str(tmp_path / f"single-{case}"), 2 * ROWS_PER_RANK, mini_batch=0)
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, trainer.data_collator(uneven_rows(trainer, ROWS_PER_RANK)))
        reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        if case == "sigmoid":  # the loss's own parameters are among the gradients compared
            assert {"sigmoid_parameters.log_scale", "sigmoid_parameters.bias"} <= reference.keys()
        for name in ("plain", "grad_cache"):
            step = got[name]
            assert step["negatives"][0] > 0 == step["negatives"][1], (case, name, step["negatives"])
            most, fewest = step["mini_batches"]
            if name == "plain":
                assert most == fewest == 1, step["mini_batches"]
            else:
                assert most > fewest == 1, (case, step["mini_batches"], got["budget"])
            # Each rank's loss: its rows' against every rank's candidates (rank 1's queries see rank 0's hard
            # negatives, as in one process); their mean is the whole batch's.
            torch.testing.assert_close(torch.tensor(step["losses"]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
            assert_gradients_equal(step["grads"], reference, f"{case}, uneven ranks, {name}")
        assert got["grad_cache"]["allreduces"] == got["plain"]["allreduces"] > 0, case


def test_a_rank_ends_in_leave_process_group_after_its_exit_handlers(tmp_path):
    """Under a process group, leave_process_group ends the process itself (status 0) after the
    atexit handlers and a flush, so that gloo's destructor never runs; nothing after it does."""
    marker = tmp_path / "atexit-ran"
    code = f"""
import atexit, pathlib, torch.distributed as dist
from mmfast.train.run import leave_process_group
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text("yes"))
print("trained", end="")  # no newline: only an explicit flush gets it out before os._exit
leave_process_group()
print("after leaving")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "trained" and marker.read_text() == "yes"

"""GradCache under FSDP2 on the CPU (gloo): the encoder sharded with `fully_shard` (each backbone layer a
unit), 2 ranks × B rows give the loss and every parameter's full gradient of 1 process × 2B rows, for every
recipe, with the gradient reduce-scatter held to the last mini-batch (`--gradcache_fsdp_sync last_mini_batch`,
the default) and synced per mini-batch (`every_mini_batch`); reduce-scatters counted. Then `mmfast-train` itself
with the Trainer's `--fsdp` (accelerate's FSDP2; its CPU gate lifted, fsdp_launch_worker.py): it saves
checkpoints `Encoder.from_pretrained` loads, and a resumed run ends where the uninterrupted one does; and
`accelerate launch` with the shipped FSDP config: refused on CPU, trained with the gate lifted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfast.train.backbones import FAMILIES
from mmfast.train.default import default_backbone, default_data
from mmfast.train.encoder import Encoder
from tests.train.distributed_train_worker import CASES, assert_gradients_equal, trainer_for
from tests.train.fsdp_launch_worker import FSDP_ARGUMENTS
from tests.train.fsdp_train_worker import aligned_rows, backbone_options, mixed_rows, uneven_rows
from tests.train.torchrun import REPOSITORY, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
WORKER = Path(__file__).with_name("fsdp_train_worker.py")
LAUNCH_WORKER = Path(__file__).with_name("fsdp_launch_worker.py")
FSDP_CONFIG_FILE = REPOSITORY / "examples" / "configs" / "accelerate-fsdp.yaml"
ROWS_PER_RANK = 6
# FSDP units with gradients in a step of rank 0's image queries and rank 1's text ones (units: each of the
# backbone's _no_split_modules layers, and the root): the root, the vision tower's embeddings (CLIP's, SigLIP's;
# Qwen2.5-VL's patch embedding and merger are the root's) and its 2 layers, the 2 language layers.
UNITS_RUN = {"qwen2_5_vl": 5, "llava_onevision": 6, "llava": 6, "llava_next": 6}
# Recipes with hard negatives: single-vector InfoNCE, and multi-vector late interaction (tokens padded across ranks).
UNEVEN_CASES = ("vlm2vec", "colpali")


def test_fsdp2_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    torchrun(str(WORKER), str(tmp_path), str(ROWS_PER_RANK), *CASES, "mixed", "unaligned", cwd=tmp_path)
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
        # Two GradCache mini-batches per rank. every_mini_batch: each FSDP unit's gradient is reduce-scattered
        # once per mini-batch. last_mini_batch: once per step, as the plain step (one backward) does, though
        # the encoder runs each layer once per side, so its post-backward fires once per side
        # (fsdp.sync_at_last_post_backward). The units run are the root and the language layers (2 ranks'
        # rows with images run the vision tower's too): the count is at least 3.
        assert got["mini_batches"] == 2, case
        assert got["per_mini_batch"] == got["mini_batches"] * got["one_sync"] > 0, case
        assert got["reduce_scatters"] == got["one_sync"] == got["units_run"] >= 3, case
    # Ranks whose mini-batches run different modules (rank 0's queries hold images, rank 1's do not): rank 1
    # runs the vision tower over a blank image, weighted zero, so both join every unit's collectives, and the
    # step is still that of one process on the concatenated batch.
    got = torch.load(tmp_path / "mixed.pt")
    trainer = trainer_for("vlm2vec", str(tmp_path / "mixed-single"), 2 * ROWS_PER_RANK, mini_batch=0)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, trainer.data_collator(mixed_rows(trainer, ROWS_PER_RANK)))
    torch.testing.assert_close(torch.stack(got["losses"]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    vision = [name for name in reference if "visual" in name]
    assert any(reference[name].abs().max() > 0 for name in vision), "no image reached the vision tower"
    assert_gradients_equal(got["grads"], reference, "mixed modules")
    assert got["reduce_scatters"] == got["units_run"] == 5  # the root, 2 language layers, 2 vision blocks
    # What is not aligned (here: query images on rank 0 only, target images on rank 1 only, and a vision tower
    # taken to accept no blank image)
    # stops every rank with an error saying what each runs.
    error = (tmp_path / "unaligned.txt").read_text()
    assert "under FSDP every rank must run the same modules" in error, error
    assert "rank 0: 2 mini-batch(es): query image; query image\n" in error, error
    assert "rank 1: 2 mini-batch(es): target image; target image\n" in error, error
    assert "takes none (no get_image_features)" in error


@pytest.fixture(scope="module")
def blank_image_steps(tiny_dirs, tmp_path_factory) -> Path:
    """One torchrun for every family of UNITS_RUN (a launch costs more than a family's step): each family's
    mixed step (`fsdp_train_worker.mixed_step`), written to <folder>/mixed-<family>.pt."""
    folder = tmp_path_factory.mktemp("blank_image_steps")
    torchrun(str(WORKER), str(folder), str(ROWS_PER_RANK), *(f"mixed={tiny_dirs[f]}" for f in UNITS_RUN), cwd=folder)
    return folder


@pytest.mark.parametrize("family", UNITS_RUN)
def test_fsdp2_blank_image_pass_on_other_families(blank_image_steps, tiny_dirs, tmp_path, family):
    """The blank image pass under FSDP2 on other families' vision towers (Qwen2.5-VL's with its merger, SigLIP
    under LLaVA-OneVision's projector and image packing, CLIP under LLaVA's projector and LLaVA-NeXT's image
    packing): rank 0's queries with images, rank 1's text-only, every parameter trained, equal one process on the
    concatenated batch; one reduce-scatter per unit with gradients."""
    got = torch.load(blank_image_steps / f"mixed-{family}.pt")
    options = backbone_options(str(tiny_dirs[family]))
    trainer = trainer_for("vlm2vec", str(tmp_path / f"single-{family}"), 2 * ROWS_PER_RANK, 0, *options)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, trainer.data_collator(mixed_rows(trainer, ROWS_PER_RANK)))
    torch.testing.assert_close(torch.stack(got["losses"]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    vision = [name for name in reference if name.startswith(f"model.{FAMILIES[family].vision_tower_path}.")]
    assert any(reference[name].abs().max() > 0 for name in vision), f"{family}: no image reached the vision tower"
    # The vision tower's attention key bias (CLIP's, SigLIP's; no rotary positions there): adding one number to
    # every key's score leaves the softmax unchanged, so its gradient is zero in exact arithmetic and both hold
    # rounding noise (measured ~1e-9, the largest gradient ~30): those are held to that floor, every other
    # gradient to 1e-5 of its own scale. (The language model's key bias, Qwen2's, is rotated: a real gradient.)
    largest = max(grad.abs().max().item() for grad in reference.values())
    for name in [name for name in vision if name.endswith("self_attn.k_proj.bias")]:
        assert max(got["grads"].pop(name).abs().max(), reference.pop(name).abs().max()) < 1e-7 * largest, name
    assert_gradients_equal(got["grads"], reference, f"mixed modules, {family}")
    assert got["reduce_scatters"] == got["units_run"] == UNITS_RUN[family], (family, got["reduce_scatters"])


@pytest.mark.parametrize("case", UNEVEN_CASES)
def test_fsdp2_ranks_differing_in_hard_negatives_and_mini_batches_equal_one_process(tmp_path, case):
    """Rank 0's rows with hard negatives, rank 1's without: rank 1 runs a placeholder negatives side, weighted
    zero. Without GradCache, and with GradCache mini-batches by a token budget that holds rank 1's batch in one
    and rank 0's, with its negatives, in more (rank 1 also runs placeholder mini-batches). Each step equals one
    process on the concatenated batch; reduce-scatters: one per unit with gradients (plain, last_mini_batch),
    one per unit per mini-batch of the rank with the most (every_mini_batch)."""
    torchrun(str(WORKER), str(tmp_path), str(ROWS_PER_RANK), f"uneven={case}", cwd=tmp_path)
    got = torch.load(tmp_path / f"uneven-{case}.pt")
    trainer = trainer_for(case, str(tmp_path / "single"), 2 * ROWS_PER_RANK, mini_batch=0)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(trainer.model, trainer.data_collator(uneven_rows(trainer, ROWS_PER_RANK)))
    reference = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    for sync, step in ((sync, got[sync]) for sync in ("plain", "last_mini_batch", "every_mini_batch")):
        most, fewest = step["mini_batches"]
        if sync == "plain":  # without GradCache: one mini-batch each, rank 1's with a placeholder negatives side
            assert most == fewest == 1, step["mini_batches"]
        else:
            assert most > fewest == 1, (case, sync, step["mini_batches"], got["budget"])
        # The loss each rank logs: its rows' against every rank's candidates (rank 1's queries see rank 0's
        # hard negatives, as in one process); their mean is the whole batch's.
        torch.testing.assert_close(torch.stack(step["losses"]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
        assert_gradients_equal(step["grads"], reference, f"{case}, uneven ranks, {sync}")
        per_step = most if sync == "every_mini_batch" else 1
        assert step["reduce_scatters"] == step["units_run"] * per_step > 0, (case, sync, step["reduce_scatters"])
    assert got["plain"]["units_run"] == got["last_mini_batch"]["units_run"] == got["every_mini_batch"]["units_run"] >= 3


def test_fsdp_through_the_trainer_saves_and_resumes(tmp_path):
    """mmfast-train --fsdp (accelerate's FSDP2, GradCache, 2 ranks): the checkpoint's encoder files hold the
    full model, and resuming from checkpoint-2 ends at step 3 where the uninterrupted run does."""
    run = ["--recipe", "e5v", "--max_steps", "3", "--save_steps", "2", "--per_device_train_batch_size", "8",
           "--gradcache_mini_batch_size", "4", "--report_to", "none", "--logging_steps", "1",
           *FSDP_ARGUMENTS]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = torchrun(str(LAUNCH_WORKER), "--output_dir", str(whole), *run, cwd=tmp_path)
    assert "GradCache mini-batch: 4 (2 mini-batch(es) per device per step)" in done.stderr
    checkpoint = whole / "checkpoint-2"
    # The encoder's files (model.safetensors) hold the full weights: those of accelerate's full state dict.
    saved = Encoder.from_pretrained(checkpoint)
    full = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    weights = {f"model.{name}": tensor for name, tensor in saved.model.state_dict().items()}
    assert weights.keys() == full.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    torchrun(str(LAUNCH_WORKER), "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", *run,
             cwd=tmp_path)  # fmt: skip
    final, final_resumed = Encoder.from_pretrained(whole), Encoder.from_pretrained(resumed)
    reference = final.model.state_dict()
    moved = [n for n, t in reference.items() if not torch.equal(t, saved.model.state_dict()[n])]
    assert moved, "step 3 changed no weight"
    for name, tensor in final_resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    losses = [json.loads((d / "trainer_state.json").read_text())["log_history"] for d in (whole, resumed)]
    assert [e["loss"] for e in losses[0] if e.get("step") == 3 and "loss" in e] == [
        e["loss"] for e in losses[1] if e.get("step") == 3 and "loss" in e
    ]


def accelerate_launch(*args, cwd, succeed: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped FSDP config on 2 CPU processes (its 8 GPUs and bf16 overridden)."""
    default_backbone(), default_data()  # built before the ranks start, so they only read them
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG_FILE),
               "--num_processes", "2", "--mixed_precision", "no", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == succeed, done.stderr[-4000:]
    return done


def test_accelerate_launch_with_the_shipped_fsdp_config(tmp_path):
    """`accelerate launch --config_file examples/configs/accelerate-fsdp.yaml` (the plugin set through the
    environment, as on GPUs): on CPU processes accelerate sets up DDP and mmfast-train refuses; with the one
    CPU gate lifted (fsdp_launch_worker.py, which also checks the step gets an FSDP2-sharded model) it trains."""
    run = ["--recipe", "e5v", "--max_steps", "1", "--per_device_train_batch_size", "4", "--gradcache_mini_batch_size",
           "2", "--report_to", "none", "--save_strategy", "no"]  # fmt: skip
    refused = accelerate_launch("-m", "mmfast.train", "--output_dir", str(tmp_path / "refused"), *run, cwd=tmp_path,
                                succeed=False)  # fmt: skip
    assert "mmfast-train: error: FSDP was asked for" in refused.stderr, refused.stderr[-2000:]
    assert "but accelerate set up MULTI_CPU" in refused.stderr
    done = accelerate_launch(str(LAUNCH_WORKER), "--output_dir", str(tmp_path / "run"), *run, cwd=tmp_path)
    assert "'train_loss'" in done.stdout + done.stderr, done.stderr[-2000:]


def test_fsdp_on_cpu_is_refused(tmp_path):
    """accelerate runs FSDP on accelerators only: on CPU processes, --fsdp would silently train with DDP."""
    done = torchrun("-m", "mmfast.train", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                    "--report_to", "none", *FSDP_ARGUMENTS, cwd=tmp_path, succeed=False)  # fmt: skip
    assert "mmfast-train: error: FSDP was asked for (--fsdp" in done.stderr, done.stderr[-2000:]
    assert "but accelerate set up MULTI_CPU: it runs FSDP only on GPUs" in done.stderr
    # Both ranks stop with the error, neither with a traceback (torchrun's own reports the exit status 2).
    assert done.stderr.count("mmfast-train: error: FSDP was asked for") == 2
    assert "[rank0]:" not in done.stderr and "[rank1]:" not in done.stderr

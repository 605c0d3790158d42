"""Run by torchrun from test_fsdp_train.py: per case, EmbeddingTrainer.training_step on this rank's half of
a fixed batch, with the encoder sharded by FSDP2 (`fully_shard`: each backbone layer a unit, the encoder the
root) and GradCache over two mini-batches; rank 0 writes the full (unsharded) gradients, each rank's loss and
the number of gradient reduce-scatters, for both `--gradcache_fsdp_sync` choices (last_mini_batch, the
default, and every_mini_batch), and for the plain step without GradCache (one backward: one sync). Then a
step whose ranks run different modules (an image on rank 0's query side only, aligned by a blank image through
rank 1's vision tower), on the default backbone or another family's; steps whose ranks differ in hard negatives
and in their number of GradCache mini-batches (aligned by placeholder passes); for each, rank 0 writes the
gradients, losses and reduce-scatters. And a step whose ranks differ in what is not aligned: rank 0 writes the
error.

    torchrun --standalone --nproc-per-node 2 fsdp_train_worker.py OUT_DIR ROWS_PER_RANK JOB...

(a JOB: a case, `mixed`, `mixed=BACKBONE_FOLDER`, `uneven=CASE`, `unaligned`; `main`)
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from mmfast.train.rank_alignment import rank_alignment
from tests.train.distributed_train_worker import leave, padded_tokens_of, run_step, trainer_for, uneven_rows

REDUCE_SCATTERS = [0]
_reduce_scatter_single = dist.reduce_scatter_single


def counting_reduce_scatter(*args, **kwargs):
    # FSDP2 syncs each unit's gradient with one reduce_scatter_single (torch.distributed.fsdp's
    # _fsdp_collectives, looked up on torch.distributed at call time).
    REDUCE_SCATTERS[0] += 1
    return _reduce_scatter_single(*args, **kwargs)


def signature(example) -> tuple[bool, ...]:
    """What decides which of the backbone's modules a row's sides run: an image on each side, hard negatives."""
    negatives = example.negatives
    return (example.query.image is None, example.positive.image is None, bool(negatives),
            any(n.image is not None for n in negatives))  # fmt: skip


def aligned_rows(trainer, rows: int) -> list:
    """2 × `rows` rows of every subset, rank 1's half row for row like rank 0's in what modules it runs.

    Ranks that agree add no passes of their own (rank_alignment.py): what this proves is the plain FSDP2 step;
    ranks that differ are `mixed_rows` and `uneven_rows`."""
    dataset = trainer.train_dataset
    stride = max(len(dataset) // 200, 1)
    buckets: dict[tuple, list] = {}
    for index in range(0, len(dataset), stride):
        buckets.setdefault(signature(dataset[index]), []).append(dataset[index])
    pairs = [pair for bucket in buckets.values() for pair in zip(bucket[0::2], bucket[1::2], strict=False)]
    # Round-robin over the kinds of row, so the batch mixes modalities and hard negatives.
    by_kind = [[p for p in pairs if signature(p[0]) == kind] for kind in buckets]
    picked = [kind[i] for i in range(len(pairs)) for kind in by_kind if i < len(kind)][:rows]
    if len(picked) < rows:
        raise ValueError(f"the data holds {len(picked)} aligned pairs of rows, fewer than {rows}")
    return [first for first, _ in picked] + [second for _, second in picked]


def sharded(trainer):
    """The trainer's encoder under FSDP2: each of the backbone's _no_split_modules layers a unit, the
    encoder (embeddings, norms, pooling) the root; as accelerate's TRANSFORMER_BASED_WRAP does."""
    model = trainer.model
    layers = set(model._no_split_modules or ())
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module)
    return fully_shard(model)


def step(trainer, model, rows: int) -> tuple[torch.Tensor, int]:
    """One training step on this rank's rows; returns (loss, reduce-scatters it ran)."""
    rank = dist.get_rank()
    model.zero_grad(set_to_none=True)
    before = REDUCE_SCATTERS[0]
    loss = run_step(trainer, model, aligned_rows(trainer, rows)[rank * rows : (rank + 1) * rows])
    return loss.detach(), REDUCE_SCATTERS[0] - before


def mixed_rows(trainer, rows: int) -> list:
    """2 × `rows` vlm2vec rows without hard negatives whose halves run different modules: rank 0's queries each
    hold an image, rank 1's none (so in each mini-batch's query side only rank 0 runs the vision tower)."""
    dataset = trainer.train_dataset
    stride = max(len(dataset) // 400, 1)
    examples = [dataset[i] for i in range(0, len(dataset), stride) if not dataset[i].negatives]
    with_image = [example for example in examples if example.query.image is not None]
    text_only = [example for example in examples if example.query.image is None]
    if len(with_image) < rows or len(text_only) < rows:
        raise ValueError(f"{len(with_image)} image and {len(text_only)} text-only queries; {rows} of each needed")
    return with_image[:rows] + text_only[:rows]


def mixed_step(out_dir: str, rows: int, backbone: str | None = None) -> dict:
    """GradCache step of vlm2vec with rank 0's queries holding images and rank 1's none: the vision tower runs
    on rank 1 over a blank image, weighted zero, so both ranks join its collectives. backbone: a tiny backbone
    folder of another family (trained in full, as the default is: `backbone_options`); None, the default."""
    name = "mixed" if backbone is None else f"mixed-{os.path.basename(backbone)}"
    trainer = trainer_for("vlm2vec", os.path.join(out_dir, name), rows, max(rows // 2, 1), *backbone_options(backbone))
    model = sharded(trainer)
    rank = dist.get_rank()
    picked = mixed_rows(trainer, rows)[rank * rows : (rank + 1) * rows]
    model.zero_grad(set_to_none=True)
    before = REDUCE_SCATTERS[0]
    loss = run_step(trainer, model, picked).detach()
    reduce_scatters = REDUCE_SCATTERS[0] - before
    losses = [torch.zeros_like(loss) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss)
    return {"grads": full_gradients(model), "losses": losses, "reduce_scatters": reduce_scatters,
            "units_run": units_with_gradients(model)}  # fmt: skip


def backbone_options(backbone: str | None) -> tuple[str, ...]:
    """The arguments that train `backbone` (a folder) as the embedded default is trained: every parameter, vision
    tower included (own models otherwise get the recipe's adapter on the language model only)."""
    if backbone is None:
        return ()
    return ("--model_name_or_path", backbone, "--lora", "false", "--freeze_vision_tower", "false")


def unaligned_error(out_dir: str, rows: int) -> str:
    """The error of a step whose ranks differ in what nothing aligns: image queries on rank 0 only, with a
    vision tower taken to accept no blank image (as a backbone without get_image_features)."""
    trainer = trainer_for("vlm2vec", os.path.join(out_dir, "unaligned"), rows, max(rows // 2, 1))
    rank = dist.get_rank()
    mini_batches = trainer.data_collator(mixed_rows(trainer, rows)[rank * rows : (rank + 1) * rows])["mini_batches"]
    try:
        rank_alignment(mini_batches, takes_blank_image=False)
    except ValueError as error:
        return str(error)
    return ""


def uneven_step(out_dir: str, rows: int, case: str) -> dict:
    """Steps of `case` whose ranks differ in hard negatives (`uneven_rows`): without GradCache (rank 1 runs a
    placeholder negatives side), and with GradCache mini-batches by a token budget of rank 1's whole batch, so
    that the ranks also differ in their number of mini-batches (rank 1 runs placeholder mini-batches too),
    for both sync choices."""
    plain = trainer_for(case, os.path.join(out_dir, f"uneven-{case}"), rows, 0)  # (sets up the process group)
    rank, world = dist.get_rank(), dist.get_world_size()
    picked = uneven_rows(plain, rows)
    budget = padded_tokens_of(plain, picked[rows:])
    mine = picked[rank * rows : (rank + 1) * rows]
    result = {"budget": budget}
    for name in ("plain", "last_mini_batch", "every_mini_batch"):
        trainer = plain
        if name != "plain":
            options = ("--gradcache_mini_batch_tokens", str(budget), "--gradcache_fsdp_sync", name)
            trainer = trainer_for(case, os.path.join(out_dir, f"uneven-{case}-{name}"), rows, 0, *options)
        model = sharded(trainer)
        mini_batches = [None] * world
        dist.all_gather_object(mini_batches, len(trainer.data_collator(mine)["mini_batches"]))
        model.zero_grad(set_to_none=True)
        before = REDUCE_SCATTERS[0]
        loss = run_step(trainer, model, mine).detach()
        reduce_scatters = REDUCE_SCATTERS[0] - before
        losses = [torch.zeros_like(loss) for _ in range(world)]
        dist.all_gather(losses, loss)
        result[name] = {"grads": full_gradients(model), "losses": losses, "reduce_scatters": reduce_scatters,
                        "units_run": units_with_gradients(model), "mini_batches": mini_batches}  # fmt: skip
    return result


def units_with_gradients(model) -> int:
    """The FSDP units any of whose own parameters (not a nested unit's) got a gradient this step."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    counted = 0
    for unit in units:
        inner = {id(p) for sub in unit.modules() if sub is not unit and isinstance(sub, FSDPModule)
                 for p in sub.parameters()}  # fmt: skip
        own = [p for p in unit.parameters() if id(p) not in inner]
        counted += any(p.grad is not None for p in own)
    return counted


def full_gradients(model) -> dict[str, torch.Tensor]:
    # full_tensor() all-gathers the shards: a collective every rank runs.
    return {name: p.grad.full_tensor().clone() for name, p in model.named_parameters() if p.grad is not None}


def main():
    """Runs each job named on the command line: a case of CASES, `mixed` (the default backbone) or
    `mixed=FOLDER` (another tiny backbone), `uneven=CASE` (ranks differing in hard negatives and mini-batches),
    `unaligned`."""
    dist.reduce_scatter_single = counting_reduce_scatter
    out_dir, rows = sys.argv[1], int(sys.argv[2])
    for job in sys.argv[3:]:
        if job == "mixed" or job.startswith("mixed="):
            backbone = job.partition("=")[2] or None
            mixed = mixed_step(out_dir, rows, backbone)
            if dist.get_rank() == 0:
                name = "mixed" if backbone is None else f"mixed-{os.path.basename(backbone)}"
                torch.save(mixed, os.path.join(out_dir, f"{name}.pt"))
        elif job.startswith("uneven="):
            case = job.partition("=")[2]
            uneven = uneven_step(out_dir, rows, case)
            if dist.get_rank() == 0:
                torch.save(uneven, os.path.join(out_dir, f"uneven-{case}.pt"))
        elif job == "unaligned":
            error = unaligned_error(out_dir, rows)
            if dist.get_rank() == 0:
                with open(os.path.join(out_dir, "unaligned.txt"), "w") as f:
                    f.write(error)
        else:
            case_step(out_dir, rows, job)
        dist.barrier()
    leave()


def case_step(out_dir: str, rows: int, case: str) -> None:
    trainer = trainer_for(case, os.path.join(out_dir, case), rows, mini_batch=max(rows // 2, 1))
    model = sharded(trainer)
    loss, once = step(trainer, model, rows)
    grads = full_gradients(model)
    units_run = units_with_gradients(model)
    losses = [torch.zeros_like(loss) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss)
    every = trainer_for(case, os.path.join(out_dir, case + "-every"), rows, max(rows // 2, 1),
                        "--gradcache_fsdp_sync", "every_mini_batch")  # fmt: skip
    every_model = sharded(every)
    _, per_mini_batch = step(every, every_model, rows)
    grads_per_mini_batch = full_gradients(every_model)
    plain = trainer_for(case, os.path.join(out_dir, case + "-plain"), rows, mini_batch=0)
    _, one_sync = step(plain, sharded(plain), rows)
    if dist.get_rank() == 0:
        mini_batches = len(trainer.data_collator(aligned_rows(trainer, rows)[:rows])["mini_batches"])
        result = {"grads": grads, "grads_per_mini_batch": grads_per_mini_batch, "losses": losses,
                  "reduce_scatters": once, "per_mini_batch": per_mini_batch, "one_sync": one_sync,
                  "units_run": units_run, "mini_batches": mini_batches}  # fmt: skip
        torch.save(result, os.path.join(out_dir, f"{case}.pt"))


if __name__ == "__main__":
    main()

"""Run by torchrun from test_distributed_train.py: one EmbeddingTrainer.training_step per case on
this rank's half of a fixed batch, under DDP with GradCache; writes the averaged gradients, the
number of gradient all-reduces and the number of hard negatives each rank's batch held. And steps whose ranks
differ in hard negatives and in their number of GradCache mini-batches (`uneven=CASE`).

    torchrun --standalone --nproc-per-node 2 distributed_train_worker.py OUT_DIR ROWS_PER_RANK JOB...

(a JOB: a case of CASES, or `uneven=CASE`)
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mmfast.train.arguments import parse_arguments
from mmfast.train.collator import kept_negatives
from mmfast.train.data import load_image
from mmfast.train.default import PROFILE
from mmfast.train.mini_batches import padded_tokens
from mmfast.train.run import build_trainer

# A case: a recipe plus extra command-line arguments (one line per new option to prove, e.g. a
# duplicate-masking flag over a recipe with hard negatives).
CASES = {
    "llave": ("llave", ()),
    "vlm2vec": ("vlm2vec", ()),
    "unime-stage2": ("unime-stage2", ()),
    "e5v": ("e5v", ()),
    "unime-stage1": ("unime-stage1", ()),
    # multi-vector: every rank's pages zero-padded to the longest before the late-interaction loss gathers them
    "colpali": ("colpali", ()),
}
# Cases run under DDP only: the sigmoid loss (SigLIP's, on vlm2vec's rows with hard negatives), whose learnable
# logit scale and bias are refused under FSDP (run_config.py), so it is not in CASES, which the FSDP tests run too.
DDP_ONLY_CASES = {"sigmoid": ("vlm2vec", ("--loss", "sigmoid"))}


def batch_rows(trainer, start: int, count: int, total: int):
    """Rows start..start+count of a fixed, seed-independent pick of `total` rows spread over every subset."""
    dataset = trainer.train_dataset
    stride = max(len(dataset) // (total + 1), 1)
    return [dataset[i * stride] for i in range(start, start + count)]


def trainer_for(case: str, out_dir: str, rows: int, mini_batch: int, *options: str):
    """The case's trainer for one step of `rows` rows per rank, GradCache `mini_batch` rows (0: off);
    options: more command-line arguments."""
    recipe, extra = {**CASES, **DDP_ONLY_CASES}[case]
    argv = ["--recipe", recipe, "--output_dir", out_dir, "--per_device_train_batch_size", str(rows),
            "--gradcache_mini_batch_size", str(mini_batch), "--max_steps", "1", "--report_to", "none",
            *extra, *options]  # fmt: skip
    return build_trainer(parse_arguments(argv, profile=PROFILE))


def run_step(trainer, model, rows) -> torch.Tensor:
    """One training step of `model` (as the launcher wrapped it) on these rows; returns the loss."""
    trainer.current_gradient_accumulation_steps = 1
    return trainer.training_step(model, trainer.data_collator(rows))


def uneven_rows(trainer, rows: int) -> list:
    """2 × `rows` rows: rank 0's with hard negatives, rank 1's without (so in a token budget that holds rank 1's
    batch in one mini-batch, rank 0's, with its negatives, takes more)."""
    dataset = trainer.train_dataset
    examples = [dataset[i] for i in range(min(len(dataset), 400))]
    with_negatives = [example for example in examples if example.negatives]
    without = [example for example in examples if not example.negatives]
    if len(with_negatives) < rows or len(without) < rows:
        raise ValueError(f"{len(with_negatives)} rows with hard negatives and {len(without)} without; {rows} of each")
    return with_negatives[:rows] + without[:rows]


def padded_tokens_of(trainer, examples) -> int:
    """The padded tokens of `examples` in one mini-batch, counted as the collator counts them."""
    collator = trainer.data_collator
    lengths = []
    for example in examples:
        sides = (example.query, example.positive, *kept_negatives(example, collator.max_negatives))
        lengths.append(tuple(int(collator.builder([side], [None if side.image is None else load_image(side.image)])
                                 ["attention_mask"].sum()) for side in sides))  # fmt: skip
    return padded_tokens(lengths)


def assert_gradients_equal(got: dict, reference: dict, case: str) -> None:
    assert got.keys() == reference.keys(), case
    for name, grad in reference.items():
        # fp32 sums taken in another order: equal within 1e-5 of the gradient's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{case}: {name}")


def hard_negatives_in(inputs) -> int:
    """The hard negatives a collated batch holds, over its mini-batches."""
    return sum(mb["negatives"]["input_ids"].shape[0] for mb in inputs["mini_batches"] if "negatives" in mb)


def every_rank(value) -> list:
    """`value` (a number) of every rank, in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def uneven_step(out_dir: str, rows: int, case: str) -> dict:
    """Steps of `case` under DDP whose ranks differ in hard negatives (`uneven_rows`: rank 0's rows hold some,
    rank 1's none): without GradCache, and with GradCache mini-batches by a token budget of rank 1's whole batch,
    so that rank 0, with its negatives, also runs more mini-batches. Per step: every rank's loss, mini-batches
    and hard negatives, the averaged gradients and the gradient all-reduces."""
    plain = trainer_for(case, os.path.join(out_dir, f"uneven-{case}"), rows, 0)  # (sets up the process group)
    rank = dist.get_rank()
    picked = uneven_rows(plain, rows)
    budget = padded_tokens_of(plain, picked[rows:])
    mine = picked[rank * rows : (rank + 1) * rows]
    result = {"budget": budget}
    for name in ("plain", "grad_cache"):
        trainer = plain
        if name == "grad_cache":
            options = ("--gradcache_mini_batch_tokens", str(budget))
            trainer = trainer_for(case, os.path.join(out_dir, f"uneven-{case}-{name}"), rows, 0, *options)
        model = trainer.accelerator.prepare(trainer.model)
        allreduces = [0]
        model.register_comm_hook(None, counting_hook(allreduces))
        inputs = trainer.data_collator(mine)
        loss = run_step(trainer, model, mine).detach()
        grads = {n: p.grad.detach().clone() for n, p in model.module.named_parameters() if p.grad is not None}
        result[name] = {"grads": grads, "losses": every_rank(float(loss)), "allreduces": allreduces[0],
                        "mini_batches": every_rank(len(inputs["mini_batches"])),
                        "negatives": every_rank(hard_negatives_in(inputs))}  # fmt: skip
    return result


def leave() -> None:
    """Every result is written and every rank is past the barrier: leave without gloo's teardown,
    which once hung a rank at exit under heavy load (and can abort one, see distributed_worker.py)."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def counting_hook(counter):
    def hook(state, bucket):
        counter[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def main():
    """Runs each job named on the command line: a case of CASES, or `uneven=CASE` (ranks differing in hard
    negatives and mini-batches)."""
    out_dir, rows = sys.argv[1], int(sys.argv[2])
    for job in sys.argv[3:]:
        if job.startswith("uneven="):
            case = job.partition("=")[2]
            uneven = uneven_step(out_dir, rows, case)
            if dist.get_rank() == 0:
                torch.save(uneven, os.path.join(out_dir, f"uneven-{case}.pt"))
        else:
            case_step(out_dir, rows, job)
        dist.barrier()
    leave()


def case_step(out_dir: str, rows: int, recipe: str) -> None:
    trainer = trainer_for(recipe, os.path.join(out_dir, recipe), rows, mini_batch=max(rows // 2, 1))
    rank = dist.get_rank()
    model = trainer.accelerator.prepare(trainer.model)
    counter = [0]
    model.register_comm_hook(None, counting_hook(counter))
    inputs = trainer.data_collator(batch_rows(trainer, rank * rows, rows, 2 * rows))
    loss = run_step(trainer, model, batch_rows(trainer, rank * rows, rows, 2 * rows))
    negatives = torch.tensor([hard_negatives_in(inputs)])
    per_rank = [torch.zeros_like(negatives) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, negatives)
    grads = {name: p.grad.detach().clone() for name, p in model.module.named_parameters() if p.grad is not None}
    # The same batch without GradCache: one backward, so the all-reduces of exactly one sync.
    one_graph = trainer_for(recipe, os.path.join(out_dir, recipe + "-plain"), rows, mini_batch=0)
    plain = one_graph.accelerator.prepare(one_graph.model)
    one_sync = [0]
    plain.register_comm_hook(None, counting_hook(one_sync))
    run_step(one_graph, plain, batch_rows(one_graph, rank * rows, rows, 2 * rows))
    if rank == 0:
        result = {"grads": grads, "allreduces": counter[0], "one_sync": one_sync[0], "loss": loss,
                  "negatives_per_rank": [int(n) for n in per_rank]}  # fmt: skip
        torch.save(result, os.path.join(out_dir, f"{recipe}.pt"))


if __name__ == "__main__":
    main()

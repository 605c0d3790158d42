"""Run by torchrun from test_distributed_train.py: one EmbeddingTrainer.training_step per case on
this rank's half of a fixed batch, under DDP with GradCache; writes the averaged gradients, the
number of gradient all-reduces and the number of hard negatives each rank's batch held.

    torchrun --standalone --nproc-per-node 2 distributed_train_worker.py OUT_DIR ROWS_PER_RANK CASE...
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mmfast.train.arguments import parse_arguments
from mmfast.train.default import PROFILE
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


def batch_rows(trainer, start: int, count: int, total: int):
    """Rows start..start+count of a fixed, seed-independent pick of `total` rows spread over every subset."""
    dataset = trainer.train_dataset
    stride = max(len(dataset) // (total + 1), 1)
    return [dataset[i * stride] for i in range(start, start + count)]


def trainer_for(case: str, out_dir: str, rows: int, mini_batch: int, *options: str):
    """The case's trainer for one step of `rows` rows per rank, GradCache `mini_batch` rows (0: off);
    options: more command-line arguments."""
    recipe, extra = CASES[case]
    argv = ["--recipe", recipe, "--output_dir", out_dir, "--per_device_train_batch_size", str(rows),
            "--gradcache_mini_batch_size", str(mini_batch), "--max_steps", "1", "--report_to", "none",
            *extra, *options]  # fmt: skip
    return build_trainer(parse_arguments(argv, profile=PROFILE))


def run_step(trainer, model, rows) -> torch.Tensor:
    """One training step of `model` (as the launcher wrapped it) on these rows; returns the loss."""
    trainer.current_gradient_accumulation_steps = 1
    return trainer.training_step(model, trainer.data_collator(rows))


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
    out_dir, rows = sys.argv[1], int(sys.argv[2])
    for recipe in sys.argv[3:]:
        trainer = trainer_for(recipe, os.path.join(out_dir, recipe), rows, mini_batch=max(rows // 2, 1))
        rank = dist.get_rank()
        model = trainer.accelerator.prepare(trainer.model)
        counter = [0]
        model.register_comm_hook(None, counting_hook(counter))
        inputs = trainer.data_collator(batch_rows(trainer, rank * rows, rows, 2 * rows))
        loss = run_step(trainer, model, batch_rows(trainer, rank * rows, rows, 2 * rows))
        negatives = torch.tensor([sum(mb["negatives"]["input_ids"].shape[0] for mb in inputs["mini_batches"]
                                      if "negatives" in mb)])  # fmt: skip
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
        dist.barrier()
    leave()


if __name__ == "__main__":
    main()

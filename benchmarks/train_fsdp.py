"""GradCache under FSDP2 against DDP on 2 CPU processes (gloo): step time and each process's peak memory.

    python benchmarks/train_fsdp.py --json benchmarks/results/train_fsdp.json

A text-only Qwen2 built from its config (hidden 512, --layers layers: tens of millions of parameters),
the e5v recipe (full fine-tune, one hard negative per row: every rank runs the same modules), GradCache
with --mini-batch rows, --batch rows per process, run as a user runs it: `Trainer.train()` for --steps
steps under `torchrun --nproc-per-node 2`, each launcher in fresh processes.
  ddp             the Trainer's DDP (one all-reduce per step)
  fsdp-last       the Trainer's `--fsdp` (accelerate's FSDP2, each decoder layer a unit),
                  `--gradcache_fsdp_sync last_mini_batch`: unsharded gradients held until the last mini-batch
  fsdp-every      the same, `every_mini_batch`: gradients reduce-scattered (sharded) after each mini-batch
  fsdp-*-keep     the same with fsdp_config reshard_after_forward False (not run unless named in --launchers)
accelerate runs FSDP only on accelerators; on CPU processes its distributed type is lifted to FSDP as in
tests/train/fsdp_launch_worker.py (everything else is the GPU code path). Memory: `peak_rss_mib` is each
process's peak resident memory (ru_maxrss at the end: model load, optimizer state, gradients, inputs);
step s is the median over the steps after the first; `reduce_scatters` per step, counted on rank 0; rank 0's
resident memory (now / peak so far) once the model is wrapped, after the first step and after the last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_json  # noqa: E402

ROOT = Path("/tmp/mmfast-bench-train-fsdp")
LAUNCHERS = {
    "ddp": [],
    "fsdp-last": ["--gradcache_fsdp_sync", "last_mini_batch"],
    "fsdp-every": ["--gradcache_fsdp_sync", "every_mini_batch"],
    "fsdp-last-keep": ["--gradcache_fsdp_sync", "last_mini_batch"],
    "fsdp-every-keep": ["--gradcache_fsdp_sync", "every_mini_batch"],
}
# The -keep launchers: fsdp_config reshard_after_forward False (each unit's parameters stay unsharded from
# its forward to its backward, FSDP2's SHARD_GRAD_OP).
KEEP_UNSHARDED = {"reshard_after_forward": False}


def resident_mib() -> float:
    """This process's resident memory now (not its peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backbone(layers: int) -> Path:
    """The text-only Qwen2 of this benchmark, built once (hidden 512, 8 heads, MLP 1024)."""
    from mmfast.train.default.model import build_tiny_backbone, default_corpus
    from mmfast.train.default.tokenizer import train_tokenizer

    folder = ROOT / f"qwen2-512x{layers}"
    if not (folder / "config.json").is_file():
        tokenizer = train_tokenizer(default_corpus())
        build_tiny_backbone("causal_lm", folder, tokenizer=tokenizer, hidden_size=512, num_layers=layers, num_heads=8)
    return folder


def rank_main(launcher: str, model: str, batch: int, mini: int, steps: int) -> None:
    """One rank of one launcher: trains `steps` steps, rank 0 prints the result as JSON."""
    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    from mmfast.train import build_trainer, parse_arguments
    from tests.train.fsdp_launch_worker import FSDP_ARGUMENTS, FSDP_CONFIG, lift_accelerate_cpu_gate

    reduce_scatters = [0]
    reduce_scatter = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        reduce_scatters[0] += 1
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counting
    fsdp = []
    if launcher != "ddp":
        lift_accelerate_cpu_gate()
        config = {**FSDP_CONFIG, **(KEEP_UNSHARDED if launcher.endswith("-keep") else {})}
        fsdp = [*FSDP_ARGUMENTS[:2], "--fsdp_config", json.dumps(config)]
    argv = ["--recipe", "e5v", "--model_name_or_path", model, "--lora", "False", "--text_prompt", "{text}",
            "--output_dir", str(ROOT / f"run-{launcher}"), "--per_device_train_batch_size", str(batch),
            "--gradcache_mini_batch_size", str(mini), "--max_steps", str(steps), "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", str(steps), "--cpu_threads", "1", "--disable_tqdm", "True",
            *LAUNCHERS[launcher], *fsdp]  # fmt: skip
    trainer = build_trainer(parse_arguments(argv))
    parameters = sum(p.numel() for p in trainer.model.parameters())

    class StepTimes(TrainerCallback):
        times: list[float] = []
        counts: list[int] = []
        # Resident MiB after the model is wrapped (sharded) and before the first step: (now, peak so far);
        # then the peak after the first step (optimizer state made) and after the last.
        memory: dict[str, list[float]] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory["prepared"] = [resident_mib(), peak_mib()]

        def on_step_begin(self, args, state, control, **kwargs):
            self.start, self.before = time.perf_counter(), reduce_scatters[0]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            self.counts.append(reduce_scatters[0] - self.before)
            self.memory.setdefault("first_step", [resident_mib(), peak_mib()])
            self.memory["last_step"] = [resident_mib(), peak_mib()]

    timer = StepTimes()
    trainer.add_callback(timer)
    trainer.train()
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        row = {"launcher": launcher, "parameters": parameters, "batch_per_process": batch, "mini_batch": mini,
               "step_s": statistics.median(timer.times[1:]), "steps_s": timer.times,
               "reduce_scatters": timer.counts[-1], "peak_rss_mib": [round(float(p), 1) for p in peaks],
               "rank0_mib": {k: [round(v, 1) for v in m] for k, m in timer.memory.items()}}  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="contrastive batch per process")
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="steps per launcher (the first is not timed)")
    parser.add_argument("--launchers", nargs="+", choices=list(LAUNCHERS), default=list(LAUNCHERS)[:3])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rank", nargs=2, metavar=("LAUNCHER", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        rank_main(args.rank[0], args.rank[1], args.batch, args.mini_batch, args.steps)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = backbone(args.layers)
    print(machine())
    header = f"{'launcher':15s} {'params':>8s} {'batch':>6s} {'mini':>5s} {'step s':>7s} {'RS/step':>8s}"
    print(header + f" {'peak MiB (rank 0, 1)':>22s}")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    for launcher in args.launchers:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                   "--rank", launcher, str(model), "--batch", str(args.batch), "--mini-batch", str(args.mini_batch),
                   "--steps", str(args.steps)]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env, cwd=ROOT)
        found = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not found:
            print(f"{launcher:15s} failed: {run.stderr.strip().splitlines()[-3:]}")
            continue
        row = json.loads(found[-1].removeprefix("RESULT "))
        rows.append(row)
        peaks = ", ".join(f"{p:.0f}" for p in row["peak_rss_mib"])
        memory = "  ".join(f"{k} {v[0]:.0f}/{v[1]:.0f}" for k, v in row["rank0_mib"].items())
        print(f"{launcher:15s} {row['parameters'] / 1e6:7.1f}M {row['batch_per_process']:6d} {row['mini_batch']:5d} "
              f"{row['step_s']:7.2f} {row['reduce_scatters']:8d} {peaks:>22s}  rank 0 now/peak: {memory}",
              flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()

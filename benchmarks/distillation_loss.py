"""Speed and memory of mmfast.distillation_loss against the code people write, torch.compile of that
code and the project's float64-oracle code, in one run.

Providers:
  mmfast     mmfast.distillation_loss (backend "auto")
  naive      what a user writes: F.kl_div(F.log_softmax(student scores / τ_s), F.log_softmax(teacher
             scores / τ_t), log_target=True, reduction="batchmean"), both B×B matrices materialised
  compiled   torch.compile(naive), compile time excluded
  reference  mmfast.reference.distillation_loss_reference (the tests' oracle), input dtype

    python benchmarks/distillation_loss.py --batch 1024 4096 --dim 1536 --teacher-dim 4096
    pytest benchmarks/distillation_loss.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.reference import distillation_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_step,
    machine,
    median_times,
    memory_in_subprocess,
    peak_after_warmup,
    write_json,
)

PROVIDERS = ("mmfast", "naive", "compiled", "reference")
NAIVE_MEMORY_LIMIT = 12 << 30
_compiled = None


def naive_distillation_loss(student_query, student_target, teacher_query, teacher_target, *, student_temperature,
                            teacher_temperature):  # fmt: skip
    """The loss as a user writes it (the benchmark's honest baseline, not the project's oracle)."""
    log_student = F.log_softmax(student_query @ student_target.T / student_temperature, dim=1)
    with torch.no_grad():
        log_teacher = F.log_softmax(teacher_query @ teacher_target.T / teacher_temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def make_inputs(b: int, d: int, d_teacher: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return unit(b, d), unit(b, d), unit(b, d_teacher), unit(b, d_teacher)


def step_functions(provider: str, sq, st, tq, tt):
    global _compiled
    state = {}
    leaves = [sq.detach().requires_grad_(), st.detach().requires_grad_()]
    if provider == "mmfast":
        fn = mmfast.distillation_loss
    elif provider == "naive":
        fn = naive_distillation_loss
    elif provider == "reference":
        fn = distillation_loss_reference
    else:
        _compiled = _compiled or torch.compile(naive_distillation_loss, dynamic=False)
        fn = _compiled

    def forward():
        state["loss"] = fn(*leaves, tq, tt, student_temperature=0.05, teacher_temperature=0.02)

    def backward():
        state["grads"] = torch.autograd.grad(state.pop("loss"), leaves)

    return forward, backward, lambda: state.get("grads", [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--teacher-dim", type=int, default=4096)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, b, d, dt = args.memory_child[0], *map(int, args.memory_child[1:])
        make_step = lambda *inputs: step_functions(provider, *inputs)
        small, full = make_inputs(64, d, dt), make_inputs(b, d, dt)
        print(json.dumps(peak_after_warmup(make_step, small, full, compiled=provider == "compiled")))
        return 0
    print(f"# {machine()} | float32, CPU | student D={args.dim}, teacher D={args.teacher_dim}")
    print("B      provider   fwd ms   bwd ms  fwd+bwd  naive÷  extra MiB")
    rows = []
    for b in args.batch:
        case = {}
        for provider in args.providers:
            row = {"provider": provider, "B": b, "D": args.dim, "D_teacher": args.teacher_dim}
            if provider != "mmfast" and 6 * 4 * b * b > NAIVE_MEMORY_LIMIT:
                row["skipped"] = "B×B matrices too large"
            else:
                forward, backward, _ = step_functions(provider, *make_inputs(b, args.dim, args.teacher_dim))
                row.update(median_times(forward, backward, args.repeats))
                if args.memory:
                    row.update(memory_in_subprocess(__file__, [provider, str(b), str(args.dim), str(args.teacher_dim)]))
            case[provider] = row
            rows.append(row)
        for row in case.values():
            if "fwd_bwd_ms" not in row:
                print(f"{b:<6d} {row['provider']:9s} skipped: {row['skipped']}")
                continue
            naive = case.get("naive", {}).get("fwd_bwd_ms")
            speedup = f"{naive / row['fwd_bwd_ms']:.2f}" if naive else "-"
            mem = row.get("extra_peak_mib")
            print(f"{b:<6d} {row['provider']:9s} {row['fwd_ms']:8.1f} {row['bwd_ms']:8.1f} {row['fwd_bwd_ms']:8.1f}  "
                  f"{speedup:6s}  {'-' if mem is None else f'{mem:.0f}'}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("provider", ["mmfast", "naive", "reference"])
def test_distillation_loss(benchmark, provider):
    bench_step(benchmark, *step_functions(provider, *make_inputs(1024, 512, 1024))[:2], rounds=3)


if __name__ == "__main__":
    sys.exit(main())

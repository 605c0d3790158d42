"""Speed and memory of mmfast.contrastive_loss against naive PyTorch, torch.compile(naive) and the
three bare GEMMs the math needs (S = Q·Cᵀ, G·C, Gᵀ·Q), all measured in one run.

    python benchmarks/contrastive_loss.py --batch 4096 --negatives 1 --dim 256 1024
    python benchmarks/contrastive_loss.py --demo            # ~1 minute, what `make demo` prints
    pytest benchmarks/contrastive_loss.py --benchmark-enable  # the pytest-benchmark cases

Times are medians over --repeats runs after one warm-up, for forward (with inputs that require
grad: mmfast computes its gradients there), backward, and both. Peak memory is measured in a fresh
subprocess per case: the kernel's high-water mark of resident memory (VmHWM, reset through
/proc/self/clear_refs) minus what was resident before the step and minus the gradients themselves,
i.e. the extra memory over inputs + grads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast.reference import contrastive_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_step,
    machine,
    median_times,
    memory_in_subprocess,
    peak_extra_mib,
    write_json,
)

OPTIONS = {
    "plain": {},
    "llave": {"hardness": 9.0, "symmetric": True},
    "unime": {"false_negative_margin": 0.1, "topk": 8},
    # one option at a time, for the cost of each over plain
    "hardness": {"hardness": 9.0},
    "margin": {"false_negative_margin": 0.1},
    "topk": {"topk": 8},
    "symmetric": {"symmetric": True},
}
DEFAULT_OPTIONS = ["plain", "llave", "unime"]
PROVIDERS = ("mmfast", "naive", "compiled", "gemm")
NAIVE_MEMORY_LIMIT = 12 << 30  # skip naive/compiled where the B×N matrices alone would exceed this


def make_inputs(b: int, k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return unit(b, d), unit(b, d), (unit(b * k, d) if k else None)


def naive_bytes(b: int, k: int) -> int:
    # scores, logits, exp/softmax and their gradients: ~6 float32 copies of B×N.
    return 6 * 4 * b * b * (1 + k)


_compiled_reference = None


def loss_fn(provider: str, options: dict):
    global _compiled_reference
    if provider == "mmfast":
        return lambda q, t, n: mmfast.contrastive_loss(q, t, n, **options)
    if provider == "naive":
        return lambda q, t, n: contrastive_loss_reference(q, t, n, **options)
    if provider == "compiled":
        if _compiled_reference is None:
            _compiled_reference = torch.compile(contrastive_loss_reference, dynamic=False)
        return lambda q, t, n: _compiled_reference(q, t, n, **options)
    raise ValueError(provider)


def step_functions(provider: str, options: dict, q, t, n):
    """(forward, backward) closures; backward uses the loss of the last forward."""
    state = {}
    leaves = [x.detach().requires_grad_() for x in (q, t, n) if x is not None]
    if provider == "gemm":
        cands = torch.cat([t, n]) if n is not None else t
        scores = torch.empty(q.shape[0], cands.shape[0])
        grad_q, grad_c = torch.empty_like(q), torch.empty_like(cands)

        def forward():
            torch.mm(q, cands.T, out=scores)

        def backward():
            torch.mm(scores, cands, out=grad_q)
            torch.mm(scores.T, q, out=grad_c)

        return forward, backward, lambda: [grad_q, grad_c]
    fn = loss_fn(provider, options)

    def forward():
        state["loss"] = fn(*leaves[:2], leaves[2] if len(leaves) > 2 else None)

    def backward():
        state["grads"] = torch.autograd.grad(state.pop("loss"), leaves)

    return forward, backward, lambda: state.get("grads", [])


def time_case(provider: str, options: dict, b: int, k: int, d: int, repeats: int) -> dict:
    forward, backward, _ = step_functions(provider, options, *make_inputs(b, k, d))
    return median_times(forward, backward, repeats)


def measure_memory_here(provider: str, options: dict, b: int, k: int, d: int) -> dict:
    """Extra peak resident memory of one fwd+bwd over inputs + grads (run in a fresh process)."""
    forward, backward, _ = step_functions(provider, options, *make_inputs(64, k, d))
    forward(), backward()  # load and compile everything on a small problem first
    forward, backward, grads = step_functions(provider, options, *make_inputs(b, k, d))
    if provider == "compiled":  # compile at this very size too, before measuring
        forward(), backward()
    return {"extra_peak_mib": peak_extra_mib(forward, backward, grads)}


def run_grid(args) -> list[dict]:
    rows = []
    for option_name in args.options:
        for d in args.dim:
            for k in args.negatives:
                for b in args.batch:
                    for provider in args.providers:
                        row = {"provider": provider, "options": option_name, "B": b, "K": k, "D": d}
                        skip = provider in ("naive", "compiled") and naive_bytes(b, k) > NAIVE_MEMORY_LIMIT
                        if skip:
                            row["skipped"] = f"needs ~{naive_bytes(b, k) / 2**30:.0f} GiB"
                        else:
                            row.update(time_case(provider, OPTIONS[option_name], b, k, d, args.repeats))
                            if args.memory and provider != "gemm":
                                child = [provider, option_name, str(b), str(k), str(d)]
                                row.update(memory_in_subprocess(__file__, child))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each row's fwd+bwd time over the bare GEMMs, naive and compiled of the same case."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["options"], r["B"], r["K"], r["D"]), {})[r["provider"]] = r
    for case in by_case.values():
        for r in case.values():
            if "fwd_bwd_ms" not in r:
                continue
            if "fwd_bwd_ms" in case.get("gemm", {}):
                r["over_gemm"] = r["fwd_bwd_ms"] / case["gemm"]["fwd_bwd_ms"]
            for other in ("naive", "compiled"):
                if "fwd_bwd_ms" in case.get(other, {}):
                    r[f"speedup_vs_{other}"] = case[other]["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def print_table(rows: list[dict]) -> None:
    header = (
        "options  B      K  D     provider    fwd ms   bwd ms  fwd+bwd  ÷gemm  naive÷  compiled÷  extra MiB\n"
        "(÷gemm: fwd+bwd time over the 3 bare GEMMs; naive÷, compiled÷: their time over this one)"
    )
    print(header)
    for r in rows:
        if "skipped" in r:
            print(f"{r['options']:8s} {r['B']:<6d} {r['K']}  {r['D']:<5d} {r['provider']:11s} skipped: {r['skipped']}")
            continue

        def ratio(key, row=r):
            return f"{row[key]:.2f}" if key in row else "-"

        mem = r.get("extra_peak_mib")
        print(f"{r['options']:8s} {r['B']:<6d} {r['K']}  {r['D']:<5d} {r['provider']:11s} {r['fwd_ms']:8.1f} "
              f"{r['bwd_ms']:8.1f} {r['fwd_bwd_ms']:8.1f}  {ratio('over_gemm'):5s}  {ratio('speedup_vs_naive'):6s}  "
              f"{ratio('speedup_vs_compiled'):9s}  {'-' if mem is None else f'{mem:.0f}'}")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["options"], r["K"], r["D"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, (opt, k, d) in zip(axes[0], cases, strict=True):
        for provider in PROVIDERS:
            case = (opt, k, d, provider)
            pts = [(r["B"], r["fwd_bwd_ms"]) for r in rows if (r["options"], r["K"], r["D"], r["provider"]) == case]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=provider)
        ax.set(title=f"{opt}, K={k}, D={d}", xlabel="B", ylabel="fwd+bwd ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1])
    parser.add_argument("--dim", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak extra memory (subprocesses)")
    parser.add_argument("--json", type=Path, help="write rows here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--demo", action="store_true", help="a ~1 minute summary (make demo)")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, option_name, b, k, d = args.memory_child
        print(json.dumps(measure_memory_here(provider, OPTIONS[option_name], int(b), int(k), int(d))))
        return 0
    if args.demo:
        args.batch, args.negatives, args.dim, args.repeats = [4096], [1], [256], 3
        args.providers = ["mmfast", "naive", "gemm"]
    print(f"# {machine()} | float32, CPU")
    rows = run_grid(args)
    add_ratios(rows)
    print_table(rows)
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot([r for r in rows if "fwd_bwd_ms" in r], args.plot)
    return 0


# pytest-benchmark cases: pytest benchmarks/contrastive_loss.py --benchmark-enable
@pytest.mark.parametrize("provider, option_name", [("mmfast", "plain"), ("mmfast", "llave"), ("mmfast", "unime"),
                                                   ("naive", "plain"), ("gemm", "plain")])  # fmt: skip
def test_contrastive_loss(benchmark, provider, option_name):
    bench_step(benchmark, *step_functions(provider, OPTIONS[option_name], *make_inputs(2048, 1, 256))[:2], rounds=3)


if __name__ == "__main__":
    sys.exit(main())

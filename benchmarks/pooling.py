"""Speed and memory of mmfast.last_token_pool / mean_pool against naive PyTorch (gather + F.normalize,
a masked sum for the mean), forward + backward, in one run.

    python benchmarks/pooling.py --batch 64 --tokens 1024 --dim 1536 4096 --dtype float32 bfloat16
    pytest benchmarks/pooling.py --benchmark-enable

The mask is a mix of left- and right-padded rows with lengths uniform in [T/4, T]. Extra memory is
the peak over inputs + the gradient of hidden_states, measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast.reference import pool_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_step,
    machine,
    median_times,
    memory_in_subprocess,
    peak_after_warmup,
    write_json,
)

PROVIDERS = ("mmfast", "naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(b: int, t: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=g)
    positions = torch.arange(t)
    right = positions[None, :] < lengths[:, None]
    left = positions[None, :] >= (t - lengths)[:, None]
    mask = torch.where((torch.arange(b) % 2 == 0)[:, None], left, right).long()
    return hidden, mask


def step_functions(provider: str, mode: str, hidden: torch.Tensor, mask: torch.Tensor):
    state = {}
    leaf = hidden.detach().requires_grad_()
    pool = mmfast.last_token_pool if mode == "last" else mmfast.mean_pool

    def forward():
        if provider == "mmfast":
            state["out"] = pool(leaf, mask)
        else:
            state["out"] = pool_reference(leaf, mask, mode=mode)

    def backward():
        out = state.pop("out")
        state["grads"] = torch.autograd.grad(out, leaf, torch.ones_like(out))

    return forward, backward, lambda: state.get("grads", [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--dim", type=int, nargs="+", default=[1536])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--mode", nargs="+", default=["last", "mean"], choices=["last", "mean"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, mode, b, t, d, dtype = args.memory_child
        make_step = lambda *inputs: step_functions(provider, mode, *inputs)
        small, full = make_inputs(2, 8, int(d), DTYPES[dtype]), make_inputs(int(b), int(t), int(d), DTYPES[dtype])
        print(json.dumps(peak_after_warmup(make_step, small, full)))
        return 0
    print(f"# {machine()} | CPU")
    print("mode  dtype     B     T      D     provider  fwd ms   bwd ms  fwd+bwd  naive÷  extra MiB")
    rows = []
    for mode in args.mode:
        for dtype in args.dtype:
            for b in args.batch:
                for t in args.tokens:
                    for d in args.dim:
                        case = {}
                        for provider in PROVIDERS:
                            hidden, mask = make_inputs(b, t, d, DTYPES[dtype])
                            row = {"provider": provider, "mode": mode, "dtype": dtype, "B": b, "T": t, "D": d}
                            row.update(median_times(*step_functions(provider, mode, hidden, mask)[:2], args.repeats))
                            if args.memory:
                                child = [provider, mode, str(b), str(t), str(d), dtype]
                                row.update(memory_in_subprocess(__file__, child))
                            case[provider] = row
                        case["mmfast"]["speedup_vs_naive"] = case["naive"]["fwd_bwd_ms"] / case["mmfast"]["fwd_bwd_ms"]
                        for r in case.values():
                            mem = r.get("extra_peak_mib")
                            speedup = f"{r['speedup_vs_naive']:.2f}" if "speedup_vs_naive" in r else "1.00"
                            print(f"{mode:5s} {dtype:9s} {b:<5d} {t:<6d} {d:<5d} {r['provider']:8s} {r['fwd_ms']:8.2f} "
                                  f"{r['bwd_ms']:8.2f} {r['fwd_bwd_ms']:8.2f}  {speedup:6s}  "
                                  f"{'-' if mem is None else f'{mem:.0f}'}", flush=True)  # fmt: skip
                            rows.append(r)
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pooling(benchmark, provider, mode):
    bench_step(benchmark, *step_functions(provider, mode, *make_inputs(32, 512, 1536, torch.float32))[:2], rounds=5)


if __name__ == "__main__":
    sys.exit(main())

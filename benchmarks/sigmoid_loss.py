"""Speed and memory of mmfast.sigmoid_loss against the code people write, open_clip's SigLipLoss and
the bare GEMMs the math needs, in one run (float32, CPU, a learnable logit scale and bias).

Providers:
  mmfast     mmfast.sigmoid_loss (backend "auto": the C++ kernels on CPU)
  naive      what a user writes: the B×N logits, a ±1 label matrix, -F.logsigmoid(labels·logits).sum()/B
  open_clip  open_clip's SigLipLoss (open_clip_torch 3.3.0; its loss.py loaded alone, as
             tests/test_sigmoid_loss.py installs it: `--open-clip-dir`); with negatives, its
             negative-only B × B blocks, as its cross-device code adds them. That release has no `chunk_size`
             option, so there is no chunked open_clip row.
  reference  mmfast.reference.sigmoid_loss_reference (the tests' oracle), input dtype
  gemm       the bare GEMMs: S = Q·Cᵀ, G·C, Gᵀ·Q (the same three as the contrastive loss's)

    python benchmarks/sigmoid_loss.py --batch 4096 16384 --dim 1024 --memory
    pytest benchmarks/sigmoid_loss.py --benchmark-enable
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.reference import sigmoid_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_step,
    machine,
    median_times,
    memory_in_subprocess,
    peak_after_warmup,
    write_json,
)

PROVIDERS = ("mmfast", "naive", "open_clip", "open_clip_chunked", "reference", "gemm")
OPEN_CLIP_CHUNK = 512
NAIVE_MEMORY_LIMIT = 12 << 30
DEFAULT_OPEN_CLIP_DIR = Path(sys.prefix) / "peers" / "open_clip_torch-3.3.0"
_open_clip_dir = DEFAULT_OPEN_CLIP_DIR


def naive_sigmoid_loss(query, target, negatives, *, logit_scale, logit_bias):
    """The loss as a user writes it (the benchmark's honest baseline, not the project's oracle)."""
    candidates = target if negatives is None else torch.cat([target, negatives])
    logits = logit_scale * query @ candidates.T + logit_bias
    labels = -torch.ones_like(logits)
    labels.diagonal().fill_(1.0)
    return -F.logsigmoid(labels * logits).sum() / query.shape[0]


def open_clip_siglip_loss():
    """open_clip's SigLipLoss class from its loss.py alone (no torchvision)."""
    spec = importlib.util.spec_from_file_location("open_clip_loss", _open_clip_dir / "open_clip" / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SigLipLoss


def open_clip_has_chunk_size() -> bool:
    return "chunk_size" in inspect.signature(open_clip_siglip_loss()).parameters


def open_clip_loss_fn(chunked: bool = False):
    peer = open_clip_siglip_loss()(**({"chunk_size": OPEN_CLIP_CHUNK} if chunked else {}))

    def loss(query, target, negatives, *, logit_scale, logit_bias):
        total = peer(query, target, logit_scale, logit_bias)
        for block in () if negatives is None else negatives.split(query.shape[0]):  # B × B blocks only
            total = total + peer._loss(query, block, logit_scale, logit_bias, negative_only=True)
        return total

    return loss


def make_inputs(b: int, d: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    return unit(b, d), unit(b, d), (unit(b * k, d) if k else None)


def step_functions(provider: str, q, t, n):
    """(forward, backward, gradients) closures; backward uses the loss of the last forward."""
    state = {}
    leaves = [x.detach().requires_grad_() for x in (q, t, n) if x is not None]
    parameters = [torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)]
    if provider == "gemm":
        candidates = t if n is None else torch.cat([t, n])
        scores = torch.empty(q.shape[0], candidates.shape[0])
        grads = (torch.empty_like(q), torch.empty_like(candidates))

        def forward():
            torch.mm(q, candidates.T, out=scores)

        def backward():
            torch.mm(scores, candidates, out=grads[0])
            torch.mm(scores.T, q, out=grads[1])

        return forward, backward, lambda: list(grads)
    fn = {"mmfast": mmfast.sigmoid_loss, "naive": naive_sigmoid_loss, "reference": sigmoid_loss_reference}.get(
        provider
    ) or open_clip_loss_fn(chunked=provider == "open_clip_chunked")

    def forward():
        negatives = leaves[2] if len(leaves) > 2 else None
        state["loss"] = fn(*leaves[:2], negatives, logit_scale=parameters[0], logit_bias=parameters[1])

    def backward():
        state["grads"] = torch.autograd.grad(state.pop("loss"), leaves + parameters)

    return forward, backward, lambda: state.get("grads", [])


def main(argv=None) -> int:
    global _open_clip_dir
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--negatives", type=int, default=0, help="K hard negatives per query (N = B·(1 + K))")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak extra memory (subprocesses)")
    parser.add_argument("--open-clip-dir", type=Path, default=DEFAULT_OPEN_CLIP_DIR,
                        help="a `pip install --no-deps --target` copy of open_clip_torch")  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _open_clip_dir = args.open_clip_dir
    if args.memory_child:
        provider, b, d, k = args.memory_child[0], *map(int, args.memory_child[1:4])
        _open_clip_dir = Path(args.memory_child[4])
        make_step = lambda *inputs: step_functions(provider, *inputs)
        print(json.dumps(peak_after_warmup(make_step, make_inputs(64, d, k), make_inputs(b, d, k))))
        return 0
    print(f"# {machine()} | float32, CPU | D={args.dim}, K={args.negatives}, learnable scale and bias")
    print("B      provider            fwd ms   bwd ms  fwd+bwd  ÷gemm  naive÷  extra MiB")
    rows = []
    for b in args.batch:
        case = {}
        n_candidates = b * (1 + args.negatives)
        for provider in args.providers:
            row = {"provider": provider, "B": b, "D": args.dim, "K": args.negatives}
            if provider in ("naive", "open_clip", "reference") and 5 * 4 * b * n_candidates > NAIVE_MEMORY_LIMIT:
                row["skipped"] = "B×N matrices too large"
            elif provider.startswith("open_clip") and not (args.open_clip_dir / "open_clip" / "loss.py").exists():
                row["skipped"] = (f"no open_clip in {args.open_clip_dir} (pip install --no-deps --target "
                                  f"{args.open_clip_dir} open_clip_torch==3.3.0)")  # fmt: skip
            elif provider == "open_clip_chunked" and not open_clip_has_chunk_size():
                row["skipped"] = "this open_clip's SigLipLoss has no chunk_size (--open-clip-dir)"
            else:
                forward, backward, _ = step_functions(provider, *make_inputs(b, args.dim, args.negatives))
                row.update(median_times(forward, backward, args.repeats))
                if args.memory:
                    child = [provider, str(b), str(args.dim), str(args.negatives), str(args.open_clip_dir)]
                    row.update(memory_in_subprocess(__file__, child))
            case[provider] = row
            rows.append(row)
        for row in case.values():
            if "fwd_bwd_ms" not in row:
                print(f"{b:<6d} {row['provider']:17s} skipped: {row['skipped']}")
                continue
            gemm, naive = case.get("gemm", {}).get("fwd_bwd_ms"), case.get("naive", {}).get("fwd_bwd_ms")
            row["over_gemm"] = row["fwd_bwd_ms"] / gemm if gemm else None
            over_gemm = f"{row['over_gemm']:.2f}" if gemm else "-"
            speedup = f"{naive / row['fwd_bwd_ms']:.2f}" if naive else "-"
            mem = row.get("extra_peak_mib")
            print(f"{b:<6d} {row['provider']:17s} {row['fwd_ms']:8.1f} {row['bwd_ms']:8.1f} {row['fwd_bwd_ms']:8.1f}  "
                  f"{over_gemm:5s}  {speedup:6s}  {'-' if mem is None else f'{mem:.0f}'}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("provider", ["mmfast", "naive", "reference", "gemm"])
def test_sigmoid_loss(benchmark, provider):
    bench_step(benchmark, *step_functions(provider, *make_inputs(1024, 512, 1))[:2], rounds=3)


if __name__ == "__main__":
    sys.exit(main())

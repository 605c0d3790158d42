"""Memory and speed of mmfast.late_interaction_loss (fwd+bwd) against colpali-engine's einsum loss and
the bare GEMM of the token scores.

    python benchmarks/late_interaction_loss.py --batch 64 256 --providers mmfast colpali gemm \\
        --json benchmarks/results/late_interaction_loss.json

B queries of L_q tokens against B documents of L_d tokens, D dims, float32, CPU. Each measurement
runs in a fresh interpreter (harness.memory_in_subprocess): a warm-up on a small problem, then
`--repeats` timed steps (median wall and CPU time); the extra memory is the first step's resident
high-water mark over what was resident before it (the inputs), minus the gradients it returns.
Providers:
  mmfast         backend "auto" (the C++ kernels on CPU): InfoNCE, τ = 0.02
  mmfast_torch   backend "torch"
  colpali        colpali-engine 0.3.18's ColbertLoss itself (normalize_scores=False, its torch scores:
                 the B × B × L_q × L_d einsum, amax over document tokens, sum over query tokens,
                 cross-entropy), loaded from the pinned `pip install --no-deps --target .peer-losses`
                 copy (benchmarks/peer_losses.py: it cannot share mmfast's environment); never run
                 where that tensor alone exceeds --einsum-limit-gib (reported with its size)
  gemm           the bare GEMM of every token score, Q_tokens · D_tokensᵀ, tiled into the same score
                 budget as mmfast (no max, no backward): the floor a fused forward cannot beat
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import mmfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_losses  # noqa: E402
from harness import machine, memory_in_subprocess, timed_runs, write_json  # noqa: E402

PROVIDERS = ("mmfast", "mmfast_torch", "colpali", "gemm")


def make_inputs(batch: int, query_tokens: int, doc_tokens: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(batch, query_tokens, dim, generator=g), dim=-1)
    document = F.normalize(torch.randn(batch, doc_tokens, dim, generator=g), dim=-1)
    return query, document


def colpali_loss(temperature: float = 0.02) -> torch.nn.Module:
    """colpali-engine's ColbertLoss (normalize_scores=False) on its torch (einsum) scores, from the
    pinned copy peer_losses.install() puts beside .venv."""
    os.environ["COLPALI_SCORES_BACKEND"] = "torch"
    losses = peer_losses.load_colpali_losses(peer_losses.install())
    return losses.ColbertLoss(temperature=temperature, normalize_scores=False)


def bare_gemm(query: torch.Tensor, document: torch.Tensor) -> None:
    """Every token score once, into one tile of mmfast's score budget at a time."""
    from mmfast.backends.late_interaction_loss import tile_shape

    (batch, query_tokens, dim), doc_tokens = query.shape, document.shape[1]
    rows, cols = tile_shape(batch, batch, query_tokens, doc_tokens, query.device)
    q, d = query.reshape(-1, dim), document.reshape(-1, dim)
    tile = torch.empty(rows * query_tokens, cols * doc_tokens)
    for c in range(0, batch, cols):
        docs = d[c * doc_tokens : min(c + cols, batch) * doc_tokens]
        for r in range(0, batch, rows):
            queries = q[r * query_tokens : min(r + rows, batch) * query_tokens]
            torch.mm(queries, docs.T, out=tile[: queries.shape[0], : docs.shape[0]])


def step_function(provider: str, query, document):
    """(one fwd+bwd step, the gradients it returns)."""
    leaves = [query.clone().requires_grad_(), document.clone().requires_grad_()]
    grads = []
    colpali = colpali_loss() if provider == "colpali" else None

    def step():
        if provider == "gemm":
            return bare_gemm(query, document)
        if provider == "colpali":
            loss = colpali(*leaves)
        else:
            loss = mmfast.late_interaction_loss(*leaves, backend="torch" if provider == "mmfast_torch" else "auto")
        grads[:] = torch.autograd.grad(loss, leaves)

    return step, lambda: grads


def measure(provider: str, batch: int, query_tokens: int, doc_tokens: int, dim: int, repeats: int) -> dict:
    """In this (fresh) process: warm up, then time `repeats` steps; memory from the first."""
    step_function(provider, *make_inputs(4, query_tokens, 64, dim, seed=1))[0]()
    step, outputs = step_function(provider, *make_inputs(batch, query_tokens, doc_tokens, dim))
    return timed_runs(step, outputs, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=1030)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--einsum-limit-gib", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, *numbers = args.memory_child
        print(json.dumps(measure(provider, *map(int, numbers))))
        return 0
    if "colpali" in args.providers:
        peer_losses.install()  # once, before the measuring processes load it
    print(f"# {machine()} | float32, CPU | L_q={args.query_tokens}, L_d={args.doc_tokens}, D={args.dim}")
    print("B      provider        wall ms     CPU ms  ÷gemm  extra MiB")
    rows = []
    for batch in args.batch:
        results = {}
        for provider in args.providers:
            row = {"provider": provider, "B": batch, "L_q": args.query_tokens, "L_d": args.doc_tokens, "D": args.dim}
            einsum_bytes = 4 * batch * batch * args.query_tokens * args.doc_tokens
            if provider == "colpali" and einsum_bytes > args.einsum_limit_gib * 2**30:
                row["skipped"] = f"not run: its einsum tensor alone is {einsum_bytes / 2**30:.1f} GiB"
            else:
                child = [provider, str(batch), str(args.query_tokens), str(args.doc_tokens), str(args.dim),
                         str(args.repeats)]  # fmt: skip
                row.update(memory_in_subprocess(__file__, child))
            results[provider] = row
            rows.append(row)
        gemm_ms = results.get("gemm", {}).get("ms")
        for row in results.values():
            if "ms" not in row:
                print(f"{batch:<6d} {row['provider']:13s}  {row.get('skipped') or row}")
                continue
            if gemm_ms:
                row["over_gemm"] = row["ms"] / gemm_ms
            ratio = f"{row['over_gemm']:.2f}" if gemm_ms else "-"
            print(f"{batch:<6d} {row['provider']:13s} {row['ms']:10.0f} {row['cpu_ms']:10.0f}  {ratio:5s}  "
                  f"{row['extra_peak_mib']:.0f}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

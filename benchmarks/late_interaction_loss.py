"""Memory and speed of mmfast.late_interaction_loss (fwd+bwd) against colpali-engine's einsum loss and
the bare GEMM of the token scores, in one run, until colpali-engine runs out of memory.

    python benchmarks/late_interaction_loss.py \\
        --cases 64x256 64x1030 64x4096 256x1030 1024x1030:mmfast,colpali --memory-cap-gib 12 \\
        --json benchmarks/results/late_interaction_loss.json

Each case is BxL_d[:provider,...]: B queries of L_q tokens against B documents of L_d tokens, D dims,
float32, CPU; the B sweep at L_d = 1,030 and the L_d sweep at B = 64 above. Each measurement runs in a
fresh interpreter (harness.memory_in_subprocess) under an address-space cap (RLIMIT_AS,
--memory-cap-gib): a warm-up on a small problem, then `--repeats` timed steps (median wall and CPU
time); the extra memory is the first step's resident high-water mark over what was resident before
it (the inputs), minus the gradients it returns; the process peak is the whole process's high-water
mark. A step that cannot allocate under the cap is that row's result ("out of memory at the cap"),
with how much it asked for and the process's peak until then.
Providers:
  mmfast         backend "auto" (the C++ kernels on CPU): InfoNCE, τ = 0.02
  mmfast_torch   backend "torch"
  colpali        colpali-engine 0.3.18's ColbertLoss itself (normalize_scores=False, its torch scores:
                 the B × B × L_q × L_d einsum, amax over document tokens, sum over query tokens,
                 cross-entropy), loaded from the pinned `pip install --no-deps --target .peer-losses`
                 copy (benchmarks/peer_losses.py: it cannot share mmfast's environment)
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
from harness import machine, memory_in_subprocess, resident_peak_mib, timed_runs  # noqa: E402

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
    """(one fwd+bwd step, the gradients it returns, the step's phase: "forward" or "backward" as it runs)."""
    leaves = [query.clone().requires_grad_(), document.clone().requires_grad_()]
    grads, phase = [], {"now": "forward"}
    colpali = colpali_loss() if provider == "colpali" else None

    def step():
        phase["now"] = "forward"
        if provider == "gemm":
            return bare_gemm(query, document)
        if provider == "colpali":
            loss = colpali(*leaves)
        else:
            loss = mmfast.late_interaction_loss(*leaves, backend="torch" if provider == "mmfast_torch" else "auto")
        phase["now"] = "backward"
        grads[:] = torch.autograd.grad(loss, leaves)

    return step, lambda: grads, phase


def measure(provider: str, batch: int, query_tokens: int, doc_tokens: int, dim: int, repeats: int) -> dict:
    """In this (fresh) process: warm up, then time `repeats` steps; memory from the first. A step that
    cannot allocate (the parent's address-space cap) returns what it asked for instead."""
    step_function(provider, *make_inputs(4, query_tokens, 64, dim, seed=1))[0]()
    step, outputs, phase = step_function(provider, *make_inputs(batch, query_tokens, doc_tokens, dim))
    try:
        result = timed_runs(step, outputs, repeats)
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):
            raise
        asked = int(str(error).split("you tried to allocate ")[1].split()[0])
        return {"out_of_memory": f"the {phase['now']} tried to allocate {asked / 2**30:.1f} GiB more",
                "asked_bytes": asked, "phase": phase["now"], "process_peak_mib": resident_peak_mib()}  # fmt: skip
    return result | {"process_peak_mib": resident_peak_mib()}


def parse_case(case: str) -> tuple[int, int, list[str] | None]:
    """A case "BxL_d[:provider,...]" as (B, L_d, its providers, or None for --providers)."""
    shape, _, chosen = case.partition(":")
    try:
        batch, doc_tokens = map(int, shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--cases: {case!r} is not BxL_d[:provider,...], e.g. 64x1030") from None
    providers = chosen.split(",") if chosen else None
    if providers and not set(providers) <= set(PROVIDERS):
        raise SystemExit(f"--cases: unknown provider in {case!r}; choose from {', '.join(PROVIDERS)}")
    return batch, doc_tokens, providers


def print_row(row: dict) -> None:
    head = f"{row['B']:<6d} {row['L_d']:<6d} {row['provider']:13s}"
    if "out_of_memory" in row:
        print(f"{head} out of memory at the {row['cap_gib']:g} GiB cap: {row['out_of_memory']} "
              f"(process peak {row['process_peak_mib']:.0f} MiB)", flush=True)  # fmt: skip
    elif "ms" not in row:
        print(f"{head} failed: {row}", flush=True)
    else:
        ratio = f"{row['over_gemm']:.2f}" if "over_gemm" in row else "-"
        print(f"{head} {row['ms']:10.0f} {row['cpu_ms']:10.0f}  {ratio:5s}  {row['extra_peak_mib']:9.0f}  "
              f"{row['process_peak_mib']:9.0f}", flush=True)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["64x1030", "256x1030"], help="BxL_d[:provider,...]")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-cap-gib", type=float, default=12.0,
                        help="address-space cap (RLIMIT_AS) of every measuring process")  # fmt: skip
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, *numbers = args.memory_child
        print(json.dumps(measure(provider, *map(int, numbers))))
        return 0
    if args.memory_cap_gib <= 0:
        parser.error(f"--memory-cap-gib must be positive, got {args.memory_cap_gib}")
    cases = [parse_case(case) for case in args.cases]
    if any(providers and "colpali" in providers for *_, providers in cases) or "colpali" in args.providers:
        peer_losses.install()  # once, before the measuring processes load it
    cap = int(args.memory_cap_gib * 2**30)
    started = machine()
    print(f"# {started} | float32, CPU | L_q={args.query_tokens}, D={args.dim} | cap {args.memory_cap_gib:g} GiB")
    print("B      L_d    provider        wall ms     CPU ms  ÷gemm  extra MiB  peak MiB")
    rows = []
    for batch, doc_tokens, providers in cases:
        results = {}
        for provider in providers or args.providers:
            row = {"provider": provider, "B": batch, "L_q": args.query_tokens, "L_d": doc_tokens, "D": args.dim,
                   "cap_gib": args.memory_cap_gib}  # fmt: skip
            child = [provider, *map(str, (batch, args.query_tokens, doc_tokens, args.dim, args.repeats))]
            row.update(memory_in_subprocess(__file__, child, address_space_bytes=cap))
            results[provider] = row
            rows.append(row)
        gemm_ms = results.get("gemm", {}).get("ms")
        for row in results.values():
            if gemm_ms and "ms" in row:
                row["over_gemm"] = row["ms"] / gemm_ms
            print_row(row)
    if args.json:
        command = "python benchmarks/late_interaction_loss.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "machine": started, "load_after": os.getloadavg()[0],
                                         "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed and memory of mmfast.late_interaction_topk against the MaxSim search people write.

    python benchmarks/late_interaction_topk.py --cases 256x2000 1024x8000:mmfast,bare_gemm \\
        --query-tokens 32 --doc-tokens 256 --dim 128 --k 10 --json benchmarks/results/late_interaction_topk.json
    pytest benchmarks/late_interaction_topk.py --benchmark-enable

Each measurement runs in a fresh interpreter (harness.memory_in_subprocess), as
benchmarks/similarity_topk.py's: a warm-up, then `--repeats` timed searches (median wall and CPU
time); the extra memory is the first search's resident high-water mark over what was resident
before it, minus its outputs.
Providers: mmfast (backend "auto": the C++ kernels on CPU), mmfast_rank (also the rank of a [Q]
target), mmfast_torch (backend "torch"); colpali, colpali-engine's `score_multi_vector` way: the
einsum "bnd,csd->bcns" over query batches × passage batches of 128 (colpali-engine's default batch)
and a max and sum, into the [Q, G] score matrix, then torch.topk; naive, the same einsum over the
whole corpus at once (the [Q, G, L_q, L_d] tensor: skipped where it does not fit); bare_gemm, only
the token-score GEMMs of mmfast's tiles (query tokens × document tokens, nothing reduced): the floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast.backends.late_interaction_topk import tile_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_step, machine, memory_in_subprocess, timed_runs, write_json  # noqa: E402

PROVIDERS = ("mmfast", "mmfast_rank", "mmfast_torch", "colpali", "naive", "bare_gemm")
COLPALI_BATCH = 128


def make_inputs(n_queries: int, n_corpus: int, query_tokens: int, doc_tokens: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(n_queries, query_tokens, dim, generator=g), dim=2)
    corpus = torch.nn.functional.normalize(torch.randn(n_corpus, doc_tokens, dim, generator=g), dim=2)
    return query, corpus, torch.randint(0, n_corpus, (n_queries,), generator=g)


def colpali_scores(query, corpus, batch: int) -> torch.Tensor:
    scores = torch.empty(query.shape[0], corpus.shape[0], dtype=query.dtype)
    for i in range(0, query.shape[0], batch):
        for j in range(0, corpus.shape[0], batch):
            tokens = torch.einsum("bnd,csd->bcns", query[i : i + batch], corpus[j : j + batch])
            scores[i : i + batch, j : j + batch] = tokens.max(dim=3).values.sum(dim=2)
    return scores


def bare_gemms(query, corpus) -> None:
    (n_queries, query_tokens, dim), (n_corpus, doc_tokens, _) = query.shape, corpus.shape
    rows, cols = tile_shape(n_queries, n_corpus, query_tokens, doc_tokens, torch.float32, query.device)
    queries = query.reshape(-1, dim)
    tile = torch.empty(rows * query_tokens, cols * doc_tokens)
    for col in range(0, n_corpus, cols):
        documents = corpus[col : col + cols].reshape(-1, dim)
        for row in range(0, n_queries, rows):
            q = queries[row * query_tokens : (row + rows) * query_tokens]
            torch.mm(q, documents.T, out=tile[: q.shape[0], : documents.shape[0]])


def search_function(provider: str, query, corpus, target, k: int):
    state = {}

    def search():
        state.clear()
        if provider == "naive":
            state["out"] = tuple(torch.topk(colpali_scores(query, corpus, max(query.shape[0], corpus.shape[0])), k))
        elif provider == "colpali":
            state["out"] = tuple(torch.topk(colpali_scores(query, corpus, COLPALI_BATCH), k, dim=1))
        elif provider == "bare_gemm":
            bare_gemms(query, corpus)
        else:
            backend = "torch" if provider == "mmfast_torch" else "auto"
            rank_target = target if provider == "mmfast_rank" else None
            result = mmfast.late_interaction_topk(query, corpus, k, target=rank_target, backend=backend)
            state["out"] = tuple(t for t in result if t is not None)

    return search, lambda: state.get("out", ())


def measure(provider: str, n_queries, n_corpus, query_tokens, doc_tokens, dim, k, repeats) -> dict:
    warm = make_inputs(8, 16, query_tokens, doc_tokens, dim, seed=1)
    search_function(provider, *warm, min(k, 16))[0]()
    search, outputs = search_function(provider, *make_inputs(n_queries, n_corpus, query_tokens, doc_tokens, dim), k)
    return timed_runs(search, outputs, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["256x2000"], help="QxG[:provider,...]")
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-limit-gb", type=float, default=8.0, help="skip naive above this many GB of tokens")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, *numbers = args.memory_child
        print(json.dumps(measure(provider, *map(int, numbers))))
        return 0
    lq, ld, dim = args.query_tokens, args.doc_tokens, args.dim
    print(f"# {machine()} | float32, CPU | L_q={lq}, L_d={ld}, D={dim}, k={args.k}")
    print("Q       G        provider        wall ms     CPU ms  GFLOP/s  ÷gemm  extra MiB")
    rows = []
    for case in args.cases:
        shape, _, chosen = case.partition(":")
        n_queries, n_corpus = map(int, shape.lower().split("x"))
        providers = chosen.split(",") if chosen else args.providers
        if not set(providers) <= set(PROVIDERS):
            parser.error(f"unknown provider in {case!r}; choose from {', '.join(PROVIDERS)}")
        flops = 2.0 * n_queries * n_corpus * lq * ld * dim
        results = {}
        for provider in providers:
            row = {"provider": provider, "Q": n_queries, "G": n_corpus, "L_q": lq, "L_d": ld, "D": dim, "k": args.k}
            token_bytes = 4 * n_queries * n_corpus * lq * ld
            if provider == "naive" and token_bytes > args.naive_limit_gb * 1e9:
                row["skipped"] = f"does not fit: its token scores need {token_bytes / 1e9:.0f} GB"
            else:
                child = [provider, *map(str, (n_queries, n_corpus, lq, ld, dim, args.k, args.repeats))]
                row.update(memory_in_subprocess(__file__, child))
                if row.get("ms"):
                    row["gflops"] = flops / (row["ms"] * 1e6)
            results[provider] = row
            rows.append(row)
        gemm_ms = results.get("bare_gemm", {}).get("ms")
        for row in results.values():
            if "ms" not in row:
                print(f"{n_queries:<7d} {n_corpus:<8d} {row['provider']:13s}  {row.get('skipped') or row}")
                continue
            if gemm_ms:
                row["over_bare_gemm"] = row["ms"] / gemm_ms
            ratio = f"{row['over_bare_gemm']:.2f}" if gemm_ms else "-"
            print(f"{n_queries:<7d} {n_corpus:<8d} {row['provider']:13s} {row['ms']:10.0f} {row['cpu_ms']:10.0f} "
                  f"{row['gflops']:8.1f}  {ratio:5s}  {row['extra_peak_mib']:.0f}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("provider", ["mmfast", "colpali", "bare_gemm"])
def test_late_interaction_topk(benchmark, provider):
    search, _ = search_function(provider, *make_inputs(64, 256, 16, 128, 128), 10)
    bench_step(benchmark, search, lambda: None, rounds=3)


if __name__ == "__main__":
    sys.exit(main())

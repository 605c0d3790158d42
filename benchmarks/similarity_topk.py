"""Speed and memory of mmfast.similarity_topk against naive torch.topk(query @ gallery.T, k).

    python benchmarks/similarity_topk.py --cases 25000x5000 10000x1000000:mmfast,mmfast_rank,naive \\
        --dim 512 --k 10 --json benchmarks/results/similarity_topk.json
    pytest benchmarks/similarity_topk.py --benchmark-enable

Each measurement runs in a fresh interpreter (harness.memory_in_subprocess): a warm-up on a small
problem, then `--repeats` timed searches (median wall time, and median CPU time of the process: on a
machine shared with other jobs the second is the steadier); the extra memory is the first search's
resident high-water mark (VmHWM) over what was resident before it (the inputs), minus its outputs
(harness.peak_extra_mib).
Providers: mmfast (backend "auto": the C++ kernels on CPU), mmfast_rank (also the rank of a [Q]
target), mmfast_torch (backend "torch"), naive. Naive is never run where its [Q, G] float32 score
matrix exceeds this machine's memory: it is reported as "does not fit", with the bytes it would need.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

import mmfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_step, machine, memory_in_subprocess, peak_extra_mib, write_json  # noqa: E402

PROVIDERS = ("mmfast", "mmfast_rank", "mmfast_torch", "naive")


def make_inputs(n_queries: int, n_gallery: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    gallery = torch.randn(n_gallery, dim, generator=g)
    gallery /= gallery.norm(dim=1, keepdim=True)  # in place: a 1M-item gallery is 2 GB
    return query, gallery, torch.randint(0, n_gallery, (n_queries,), generator=g)


def search_function(provider: str, query, gallery, target, k: int):
    """A callable running one search and keeping its outputs in `state`, and a getter of those outputs."""
    state = {}

    def search():
        state.clear()
        if provider == "naive":
            state["out"] = tuple(torch.topk(query @ gallery.T, k, dim=1))
        else:
            backend = "torch" if provider == "mmfast_torch" else "auto"
            rank_target = target if provider == "mmfast_rank" else None
            result = mmfast.similarity_topk(query, gallery, k, target=rank_target, backend=backend)
            state["out"] = tuple(t for t in result if t is not None)

    return search, lambda: state.get("out", ())


def total_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal not in /proc/meminfo")


def measure(provider: str, n_queries: int, n_gallery: int, dim: int, k: int, repeats: int) -> dict:
    """In this (fresh) process: warm up, then time `repeats` searches; memory from the first."""
    warm = make_inputs(64, 256, dim, seed=1)
    search_function(provider, *warm, k)[0]()
    search, outputs = search_function(provider, *make_inputs(n_queries, n_gallery, dim), k)
    times, cpu_times = [], []

    def timed():
        start, cpu_start = time.perf_counter(), time.process_time()
        search()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    extra = peak_extra_mib(timed, lambda: None, outputs)
    for _ in range(repeats - 1):
        timed()
    return {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times), "runs": len(times),
            "extra_peak_mib": extra}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["25000x5000"],
        help="QxG[:provider,...], e.g. 10000x1000000:mmfast,naive (default: --providers)",
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; cases over 1e9 scores run once")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, *numbers = args.memory_child
        print(json.dumps(measure(provider, *map(int, numbers))))
        return 0
    memory = total_memory_bytes()
    print(f"# {machine()} | float32, CPU | D={args.dim}, k={args.k} | {memory / 2**30:.1f} GiB")
    print("Q       G         provider          wall ms     CPU ms  GFLOP/s  naive÷  extra MiB")
    rows = []
    for case in args.cases:
        shape, _, chosen = case.partition(":")
        n_queries, n_gallery = map(int, shape.lower().split("x"))
        providers = chosen.split(",") if chosen else args.providers
        if not set(providers) <= set(PROVIDERS):
            parser.error(f"unknown provider in {case!r}; choose from {', '.join(PROVIDERS)}")
        repeats = 1 if n_queries * n_gallery > 10**9 else args.repeats
        flops = 2.0 * n_queries * n_gallery * args.dim
        results = {}
        for provider in providers:
            row = {"provider": provider, "Q": n_queries, "G": n_gallery, "D": args.dim, "k": args.k}
            matrix_bytes = 4 * n_queries * n_gallery
            if provider == "naive" and matrix_bytes > memory:
                row["skipped"] = (f"does not fit: its [Q, G] float32 matrix needs {matrix_bytes / 1e9:.0f} GB, "
                                  f"this machine has {memory / 2**30:.0f} GiB")  # fmt: skip
                row["naive_matrix_gb"] = matrix_bytes / 1e9
            else:
                child = [provider, str(n_queries), str(n_gallery), str(args.dim), str(args.k), str(repeats)]
                row.update(memory_in_subprocess(__file__, child))
                if row.get("ms"):
                    row["gflops"] = flops / (row["ms"] * 1e6)
            results[provider] = row
            rows.append(row)
        naive_ms = results.get("naive", {}).get("ms")
        for row in results.values():
            if "ms" not in row:
                print(f"{n_queries:<7d} {n_gallery:<9d} {row['provider']:13s}  {row.get('skipped') or row}")
                continue
            if naive_ms:
                row["speedup_vs_naive"] = naive_ms / row["ms"]
            speedup = f"{row['speedup_vs_naive']:.2f}" if naive_ms else "-"
            print(f"{n_queries:<7d} {n_gallery:<9d} {row['provider']:13s} {row['ms']:10.0f} {row['cpu_ms']:10.0f} "
                  f"{row['gflops']:8.1f}  {speedup:6s}  {row['extra_peak_mib']:.0f}", flush=True)  # fmt: skip
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("provider", ["mmfast", "mmfast_rank", "naive"])
def test_similarity_topk(benchmark, provider):
    search, _ = search_function(provider, *make_inputs(2048, 4096, 256), 10)
    bench_step(benchmark, search, lambda: None, rounds=3)


if __name__ == "__main__":
    sys.exit(main())

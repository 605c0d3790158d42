"""Speed and memory of mmfast.similarity_topk against faiss-cpu's exact IndexFlatIP and naive
torch.topk(query @ gallery.T, k), with the GEMM-rate bound.

    python benchmarks/similarity_topk.py --cases 25000x100000 25000x1000000:mmfast,mmfast_memmap,faiss,gemm \
        --dim 768 --k 100 --repeats 1 --json benchmarks/results/similarity_topk.json
    pytest benchmarks/similarity_topk.py --benchmark-enable

Each measurement runs in a fresh interpreter (harness.memory_in_subprocess): a warm-up on a small
problem, then `--repeats` timed searches (harness.timed_runs: median wall time, and median CPU time of
the process: on a machine shared with other jobs the second is the steadier); the extra memory is the
first search's resident high-water mark (VmHWM) over what was resident before it (the inputs), minus
its outputs (harness.peak_extra_mib); "peak MiB" is the whole process's VmHWM (inputs, outputs, the
warm-up and torch itself included). Every provider uses torch's thread count (faiss's OpenMP is set
to it).
Providers: mmfast (backend "auto": the C++ kernels on CPU; on a CPU with bf16 dot products, the
bf16-screened float32 search), mmfast_fp32 (the same with screen="off": float32 GEMMs), mmfast_rank
(also the rank of a [Q] target), mmfast_torch (backend "torch"), mmfast_memmap (the gallery saved as a
.npy file and searched through numpy.load(path, mmap_mode="r"); its resident peak counts the file's
pages, which are page cache the kernel may reclaim, so its anonymous memory, RssAnon, is reported too), faiss
(faiss.IndexFlatIP: add, then search; the time includes the add, which copies the gallery), naive,
and gemm: the bare GEMMs of the search (query · galleryᵀ in tiles of 4096 × 4096, nothing kept) over
the first min(G, --gemm-items) items, scaled to G: the bound at MKL's rate that no float32 search can
beat; gemm_bf16, the same GEMMs on bf16 copies made before the clock starts (oneDNN): the screened
search's bound.
"same %" is the share of each provider's top-k indices that mmfast's top-k also holds.
Naive is never run where its [Q, G] float32 score matrix exceeds this machine's memory: it is
reported as "does not fit", with the bytes it would need.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mmfast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_step, machine, memory_in_subprocess, timed_runs, write_json  # noqa: E402

PROVIDERS = ("mmfast", "mmfast_fp32", "mmfast_rank", "mmfast_torch", "mmfast_memmap", "faiss", "naive", "gemm",
             "gemm_bf16")  # fmt: skip
GEMM_TILE = 4096


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
        elif provider == "faiss":
            import faiss  # the bench extra

            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatIP(query.shape[1])
            index.add(np.asarray(gallery))
            values, indices = index.search(query.numpy(), k)
            state["out"] = (torch.from_numpy(values), torch.from_numpy(indices))
        elif provider in ("gemm", "gemm_bf16"):
            tile = torch.empty(GEMM_TILE, GEMM_TILE, dtype=query.dtype)
            for col in range(0, gallery.shape[0], GEMM_TILE):
                items = gallery[col : col + GEMM_TILE]
                for row in range(0, query.shape[0], GEMM_TILE):
                    rows = query[row : row + GEMM_TILE]
                    torch.mm(rows, items.T, out=tile[: rows.shape[0], : items.shape[0]])
        else:
            backend = "torch" if provider == "mmfast_torch" else "auto"
            rank_target = target if provider == "mmfast_rank" else None
            screen = "off" if provider == "mmfast_fp32" else "auto"
            result = mmfast.similarity_topk(query, gallery, k, target=rank_target, backend=backend, screen=screen)
            state["out"] = tuple(t for t in result if t is not None)

    return search, lambda: state.get("out", ())


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (RssAnon, VmHWM: the process's peak resident memory), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def total_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal not in /proc/meminfo")


def measure(
    provider: str, n_queries: int, n_gallery: int, dim: int, k: int, repeats: int, gemm_items: int, indices_path: str
) -> dict:
    """In this (fresh) process: warm up, then time `repeats` searches; memory from the first. The top-k
    indices go to `indices_path` (torch.save) for the agreement column."""
    warm = make_inputs(64, 256, dim, seed=1)
    search_function(provider, *warm, k)[0]()
    query, gallery, target = make_inputs(n_queries, n_gallery, dim)
    scale = 1.0
    if provider in ("gemm", "gemm_bf16") and n_gallery > gemm_items:
        gallery, scale = gallery[:gemm_items].clone(), n_gallery / gemm_items
    if provider == "gemm_bf16":  # converted before the clock starts: the bare bf16 GEMMs
        query, gallery = query.bfloat16(), gallery.bfloat16()
    with tempfile.TemporaryDirectory(dir=Path(indices_path).parent) as folder:
        if provider == "mmfast_memmap":
            path = Path(folder) / "gallery.npy"
            np.save(path, gallery.numpy())
            del gallery
            gallery = np.load(path, mmap_mode="r")
            anon_before = status_mib("RssAnon")
        search, outputs = search_function(provider, query, gallery, target, k)
        result = timed_runs(search, outputs, repeats)
        if provider == "mmfast_memmap":
            result["rss_anon_extra_mib"] = status_mib("RssAnon") - anon_before
        if provider in ("gemm", "gemm_bf16"):
            result.update(ms=result["ms"] * scale, cpu_ms=result["cpu_ms"] * scale, scaled_from_items=gallery.shape[0])
        if outputs():
            torch.save(outputs()[1], indices_path)
    result["peak_rss_mib"] = status_mib("VmHWM")  # the whole process: inputs, outputs, warm-up included
    return result


def same_share(indices: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the rows' top-k indices that the reference's top-k rows also hold."""
    k = reference.shape[1]
    hits = (indices[:, :, None] == reference[:, None, :]).any(dim=2).sum()
    return float(hits) / (reference.shape[0] * k)


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
    parser.add_argument("--gemm-items", type=int, default=100_000, help="gallery items the gemm bound is timed on")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, *numbers, indices_path = args.memory_child
        print(json.dumps(measure(provider, *map(int, numbers), indices_path)))
        return 0
    memory = total_memory_bytes()
    print(f"# {machine()} | float32, CPU | D={args.dim}, k={args.k} | {memory / 2**30:.1f} GiB")
    print("Q       G         provider        wall ms   CPU ms  GFLOP/s  ÷gemm  CPU÷gemm  same %  extra MiB  peak MiB")
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="mmfast-bench-")
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
                indices_path = str(Path(scratch.name) / f"{provider}.pt")
                child = [provider, str(n_queries), str(n_gallery), str(args.dim), str(args.k), str(repeats),
                         str(args.gemm_items), indices_path]  # fmt: skip
                row.update(memory_in_subprocess(__file__, child))
                if Path(indices_path).exists():
                    row["indices_path"] = indices_path
                if row.get("ms"):
                    row["gflops"] = flops / (row["ms"] * 1e6)
            results[provider] = row
            rows.append(row)
        gemm_ms = results.get("gemm", {}).get("ms")
        reference = results.get("mmfast", {}).get("indices_path")
        for row in results.values():
            if "ms" not in row:
                print(f"{n_queries:<7d} {n_gallery:<9d} {row['provider']:13s}  {row.get('skipped') or row}")
                continue
            if gemm_ms:
                row["over_gemm"] = row["ms"] / gemm_ms
                row["cpu_over_gemm"] = row["cpu_ms"] / results["gemm"]["cpu_ms"]
            if reference and row.get("indices_path"):
                row["same_share"] = same_share(torch.load(row.pop("indices_path")), torch.load(reference))
            ratio = f"{row['over_gemm']:.2f}" if gemm_ms else "-"
            cpu_ratio = f"{row['cpu_over_gemm']:.2f}" if gemm_ms else "-"
            same = f"{100 * row['same_share']:.3f}" if "same_share" in row else "-"
            print(f"{n_queries:<7d} {n_gallery:<9d} {row['provider']:13s} {row['ms']:9.0f} {row['cpu_ms']:8.0f} "
                  f"{row['gflops']:8.1f}  {ratio:5s}  {cpu_ratio:8s}  {same:7s} {row['extra_peak_mib']:9.0f}  "
                  f"{row['peak_rss_mib']:.0f}", flush=True)  # fmt: skip
        for row in results.values():
            row.pop("indices_path", None)
    if args.json:
        write_json(args.json, rows)
    return 0


@pytest.mark.parametrize("provider", ["mmfast", "mmfast_rank", "naive"])
def test_similarity_topk(benchmark, provider):
    search, _ = search_function(provider, *make_inputs(2048, 4096, 256), 10)
    bench_step(benchmark, search, lambda: None, rounds=3)


if __name__ == "__main__":
    sys.exit(main())

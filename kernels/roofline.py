"""A cost model of the contrastive loss on an H100 SXM: the time of one loss evaluation (fwd+bwd,
reduction "mean") on each path of the Triton backend. Pure Python (installed as
mmfast.kernels.roofline): the Triton kernel set asks it which path to run (`choose_path`), and
benchmarks/gpu_report.py prints it. Estimates, not measurements: nobody here has a GPU.

The GPU, each GEMM tile's fraction of peak and a kernel's time are in kernels/roofline_tiles.py
(its docstring gives the sources and the assumptions); the fused path's kernels in
kernels/roofline_fused.py. The paths:
  chunked  per chunk of rows: S = X·Yᵀ (a kernels/matmul.py GEMM, S written in float32), the Triton
           row kernel (S read twice, G written; 2 exps per score), dX = G·Y and dY (+)= Gᵀ·X
  cublas   the same with the three GEMMs in cuBLAS (torch.mm) at CUBLAS_FRACTION of peak
  fused    the row kernel's work in the score GEMM's epilogue and in a G pass or the dX GEMM's
           prologue (kernels/roofline_fused.py)
The GEMM bound, which every path is compared with, is the three GEMMs the math needs at cuBLAS's
fraction (or at peak). `at_peak=True` prices every GEMM of a path at peak on every SM: the
convention of an ideal estimate, leaving only what a path adds to its GEMMs.
"""

from __future__ import annotations

import functools

from mmfast.kernels.roofline_fused import FUSED_TILES, PROLOGUE_MAX_DIM, fused_kernels
from mmfast.kernels.roofline_tiles import (
    CUBLAS_FRACTION,
    H100,
    MATMUL_TILES,
    PRECISION_BYTES,
    TRITON_SOFTWARE,
    Kernel,
    add_gemm_launch,
    add_stored_g_gemms,
    chunks,
    occupancy,
    tile_fraction,
    triton_tile,
    wave_efficiency,
)

__all__ = ["CUBLAS_FRACTION", "FUSED_TILES", "H100", "MATMUL_TILES", "PATHS", "PROLOGUE_MAX_DIM",
           "TRITON_SOFTWARE", "choose_path", "gemm_bound_seconds", "matryoshka_kernels", "occupancy", "path_kernels",
           "path_seconds", "tile_fraction", "wave_efficiency"]  # fmt: skip
PATHS = ("chunked", "cublas", "fused")


def path_kernels(path: str, rows: int, n: int, d: int, precision: str, chunk: int, *, gradients: bool = True,
                 aligned: bool = True, at_peak: bool = False, **fused) -> list[Kernel]:  # fmt: skip
    """The kernels of one loss evaluation of `rows` query rows against `n` candidates of dimension `d`
    on `path`, `chunk` rows at a time (mmfast.backends.chunked.chunk_rows), summed over the chunks.
    `fused`: fused_kernels' own arguments (ids)."""
    if path == "fused":
        return fused_kernels(rows, n, d, precision, chunk, gradients=gradients, aligned=aligned, at_peak=at_peak,
                             **fused)  # fmt: skip
    e = PRECISION_BYTES[precision]
    g_bytes = 4 if e == 4 else 2  # G in the input dtype; for float32 it overwrites S
    cublas = path == "cublas"
    out = {name: Kernel(name) for name in ("scores", "rows", "grad_x", "grad_y")}
    for start, r in chunks(rows, chunk):
        scores, row, grad_x, grad_y = out.values()
        add_gemm_launch(scores, cublas, triton_tile(precision, aligned, "plain", r, n), r, n, d, precision, at_peak)
        scores.bytes += (r + n) * d * e + 4.0 * r * n  # S written in float32
        row.bytes += (8.0 + g_bytes if gradients else 4.0) * r * n  # S read twice (once without G), G written
        row.add_work(exps=(2.0 if gradients else 1.0) * r * n)
        row.cuda_core_flops += 12.0 * r * n
        if gradients:
            add_stored_g_gemms(grad_x, grad_y, cublas, r, n, d, precision, first=start == 0, aligned=aligned,
                               at_peak=at_peak)  # fmt: skip
    return [k for k in out.values() if k.flops or k.bytes]


def path_seconds(path: str, rows: int, n: int, d: int, precision: str, chunk: int, **kw) -> float:
    return sum(k.seconds(precision)[0] for k in path_kernels(path, rows, n, d, precision, chunk, **kw))


def gemm_bound_seconds(rows: int, n: int, d: int, precision: str, *, at_peak: bool = False) -> float:
    """The three GEMMs the math needs (S = X·Yᵀ, G·Y, Gᵀ·X) over the whole problem, at cuBLAS's
    achievable rate (CUBLAS_FRACTION) or at peak: the floor every path is compared with."""
    fraction = 1.0 if at_peak else CUBLAS_FRACTION
    return 3 * 2.0 * rows * n * d / (H100.peak(precision) * fraction)


@functools.lru_cache(maxsize=4096)  # asked on every loss call: the same few shapes, priced once
def choose_path(rows: int, n: int, d: int, precision: str, chunk: int, *, candidates=("chunked", "cublas"),
                **kw) -> str:  # fmt: skip
    """The candidate path this model predicts fastest (ties to the first)."""
    return min(candidates, key=lambda path: path_seconds(path, rows, n, d, precision, chunk, **kw))


def matryoshka_kernels(rows: int, n: int, dims: tuple[int, ...], precision: str, chunk: int, *,
                       aligned: bool = True, at_peak: bool = False) -> list[Kernel]:  # fmt: skip
    """The kernels of one Matryoshka loss evaluation (fwd+bwd, one direction) on the Triton backend
    (mmfast/backends/contrastive_matryoshka.py with kernels/contrastive_loss_matryoshka.py), `chunk`
    rows at a time, its m blocks float32 (the path's work copies are float32: `precision` is "tf32"
    or "fp32"). Per chunk and segment k (width w_k = d_k - d_{k-1}): the score GEMM [r, n] × w_k
    writing P_k; the row kernel, per score and prefix, reads P_k in each of its two passes and writes
    the suffix sum H_k over it once (3 × 4 bytes: the running sums and suffix sums are scans in
    registers), and adds β_k with an atomic into the [m, n] buffer, priced as a read and a write of
    HBM (8 bytes; pessimistic: that buffer, like the column norms and ids each pass rereads, is
    L2-sized); two exps; then dX[:, seg_k] = H_k·Y[:, seg_k] and dY[:, seg_k] (+)= H_kᵀ·X[:, seg_k]
    on the float32 H_k.
    The GEMM tiles' fraction of peak does not depend on K here: the first segments' thin GEMMs
    (K = 64) are priced as efficient as one of K = D, which the model does not know to be false."""
    out = {name: Kernel(name) for name in ("scores", "rows", "grad_x", "grad_y")}
    m = len(dims)
    segment_widths = [hi - lo for lo, hi in zip((0, *dims[:-1]), dims, strict=True)]
    for start, r in chunks(rows, chunk):
        scores, row, grad_x, grad_y = out.values()
        for width in segment_widths:
            add_gemm_launch(scores, False, triton_tile(precision, aligned, "plain", r, n), r, n, width, precision,
                            at_peak)  # fmt: skip
            scores.bytes += (r + n) * width * 4 + 4.0 * r * n
            add_stored_g_gemms(grad_x, grad_y, False, r, n, width, precision, first=start == 0, aligned=aligned,
                               at_peak=at_peak)  # fmt: skip
        row.bytes += (12.0 + 8.0) * m * r * n
        row.add_work(exps=2.0 * m * r * n)
        row.cuda_core_flops += 20.0 * m * r * n
    return [k for k in out.values() if k.flops or k.bytes]

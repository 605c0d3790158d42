"""A cost model of the contrastive loss on an H100 SXM: what each GEMM tile can reach, and the time of
one loss evaluation (fwd+bwd, reduction "mean") on each path. Pure Python (installed as
mmfast.kernels.roofline): the Triton kernel set asks it which path to run (`choose_path`), and
benchmarks/gpu_report.py prints it. Estimates, not measurements: nobody here has a GPU.

Peaks (H100 SXM5 datasheet, dense): bf16/fp16 989 TFLOP/s = 132 SMs × 4096 FLOP/clock × 1.83 GHz,
TF32 495, FP32 67, HBM3 3.35 TB/s. MUFU (ex2): 16 per SM per clock (CUDA C++ Programming Guide,
arithmetic instruction throughput, compute capability 9.0). Assumptions, not sourced to a
measurement: L2→SM bandwidth 10 TB/s (published figures range 9–12 TB/s), a load latency of 600
clocks (between an L2 hit and an HBM access).

A GEMM tile's fraction of peak is the smallest of four rates, times two factors:
  sustained   0.80 of peak: the best any H100 GEMM is measured at (cuBLAS, bf16, best shape: 794.5
              of 989 TFLOP/s, 80.3%; stas00/ml-engineering, compute/accelerator, "Maximum
              Achievable Matmul FLOPS"): clocks under the 700 W limit, not a tile property.
  shared mem  wgmma reads its operands from shared memory, 128 B per clock per SM. A warpgroup
              (4 warps) owning a wm × wn slice of the tile reads (wm + wn)·BK·e bytes per 2·wm·wn·BK
              FLOPs; below 32 FLOP/B (a 64×64 slice in bf16) it cannot feed 4096 FLOP/clock.
  L2          every CTA loads its (BM + BN)·BK operand bytes per k-step from L2 (no multicast in a
              plain Triton kernel): intensity 2·BM·BN / ((BM + BN)·e) against 10 TB/s.
  latency     (stages - 1) k-steps in flight per CTA, `occupancy` CTAs per SM (from the compiled
              registers and shared memory, kernels/aot.py): bytes in flight / latency.
  × waves     tiles / (waves · 132 · occupancy): the last wave's idle SMs.
  × software  Triton's plain kernel (pointer loads through cp.async, not persistent, no TMA, no warp
              specialisation): 0.88 = 1/1.13, the fp16 uplift of tensor descriptors over the plain
              pointer kernel on H100 in triton-lang/triton#5461. cuBLAS: 1.
cuBLAS is priced by a stated fraction, 0.75 of peak for large GEMMs (0.80 at its best shape, see
above; 722 of 989 = 0.73 at 2048×8192×8192 fp16 in triton-lang/triton#2339), with no wave
quantisation: its heuristics pick split-K / stream-K kernels for small outputs with a long K (an
assumption; the Triton kernel has no split-K and pays its last wave, which matters for dX = G·Y,
whose [rows, D] output is small next to its K = N).

Each kernel's time is max(FLOPs / (peak · fraction), HBM bytes / bandwidth, exps / MUFU rate):
compute, memory and transcendentals overlap perfectly (an optimistic floor).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    sms: int = 132
    clock_hz: float = 1.83e9
    flops: tuple = (("bf16", 989e12), ("fp16", 989e12), ("tf32", 495e12), ("fp32", 67e12))
    hbm_bytes_per_s: float = 3.35e12
    l2_bytes_per_s: float = 10e12  # assumption, see the docstring
    smem_bytes_per_clock: int = 128  # per SM
    mufu_per_clock: int = 16  # per SM
    registers_per_sm: int = 65536
    smem_per_sm: int = 227 * 1024
    max_warps_per_sm: int = 64
    load_latency_clocks: int = 600  # assumption
    sustained: float = 0.80

    def peak(self, precision: str) -> float:
        return dict(self.flops)[precision]

    @property
    def mufu_per_s(self) -> float:
        return self.sms * self.mufu_per_clock * self.clock_hz


H100 = Gpu()
TRITON_SOFTWARE = 0.88
CUBLAS_FRACTION = 0.75
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}


@dataclass(frozen=True)
class GemmTile:
    """A Triton GEMM launch: its tile, warps, stages and the compiled registers/shared memory."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int


# The registers and shared memory of kernels/matmul.py's configs on sm_90, the worst over roles and
# 16-bit dtypes ("plain": C written; "accumulate": C read and written), from the AOT compile
# (tests/test_compile.py checks these numbers against it). "hopper" is compiled aligned.
MATMUL_TILES = {
    ("hopper", "plain"): GemmTile(128, 128, 64, 8, 4, 126, 131072),
    ("hopper", "accumulate"): GemmTile(128, 128, 64, 8, 4, 172, 131072),
    ("tensor_core", "plain"): GemmTile(128, 64, 32, 8, 3, 128, 32768),
    ("tensor_core", "accumulate"): GemmTile(128, 64, 32, 8, 3, 216, 32768),
    ("tensor_core_tf32", "plain"): GemmTile(128, 64, 32, 8, 3, 166, 73728),
    ("tensor_core_tf32", "accumulate"): GemmTile(128, 64, 32, 8, 3, 236, 73728),
    ("fp32", "plain"): GemmTile(64, 64, 16, 8, 3, 110, 16384),
    ("fp32", "accumulate"): GemmTile(64, 64, 16, 8, 3, 158, 16384),
}


def occupancy(tile: GemmTile, gpu: Gpu = H100) -> int:
    """CTAs per SM: registers (allocated per warp in units of 256), shared memory and warp slots."""
    per_warp = math.ceil(tile.registers * 32 / 256) * 256
    by_registers = gpu.registers_per_sm // (per_warp * tile.num_warps)
    by_smem = gpu.smem_per_sm // max(1, tile.shared_bytes)
    return max(1, min(by_registers, by_smem, gpu.max_warps_per_sm // tile.num_warps))


def wave_efficiency(m: int, n: int, block_m: int, block_n: int, slots_per_sm: int, gpu: Gpu = H100) -> float:
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    slots = gpu.sms * slots_per_sm
    return tiles / (math.ceil(tiles / slots) * slots)


def tile_fraction(tile: GemmTile, m: int, n: int, precision: str, *, a_bytes: int | None = None,
                  a_in_registers: bool = False, gpu: Gpu = H100) -> dict:  # fmt: skip
    """The fraction of `precision`'s peak a Triton launch of `tile` reaches on an [m, n] output, and
    each limit's share (module docstring). `a_bytes`: the A operand's bytes per element when it is
    not the dot dtype (a float32 score tile turned into G in registers); `a_in_registers`: wgmma
    then reads only B from shared memory."""
    e = PRECISION_BYTES[precision]
    a_e = e if a_bytes is None else a_bytes
    peak_clock = gpu.peak(precision) / (gpu.sms * gpu.clock_hz)
    bm, bn, bk = tile.block_m, tile.block_n, tile.block_k
    occ = occupancy(tile, gpu)
    tensor_cores = precision != "fp32"
    # Warpgroups split M down to 64 rows (wgmma's M), then N.
    groups = max(1, tile.num_warps // 4)
    groups_m = max(1, min(groups, bm // 64))
    wm, wn = bm / groups_m, bn / (groups // groups_m)
    if tensor_cores:
        smem_bytes = (0 if a_in_registers else wm * e) + wn * e
        smem = gpu.smem_bytes_per_clock * (2 * wm * wn / smem_bytes) / peak_clock
    else:  # FMA dots block in registers; shared memory is far from their limit
        smem = math.inf
    step_bytes = (bm * a_e + bn * e) * bk
    intensity = 2 * bm * bn * bk / step_bytes
    l2 = gpu.l2_bytes_per_s * intensity / gpu.peak(precision)
    latency = occ * (tile.num_stages - 1) * step_bytes / gpu.load_latency_clocks * intensity / peak_clock
    waves = wave_efficiency(m, n, bm, bn, occ, gpu)
    limits = {"sustained": gpu.sustained, "shared_memory": smem, "l2": l2, "latency": latency}
    bound = min(limits, key=limits.get)
    fraction = TRITON_SOFTWARE * limits[bound] * waves
    return {"fraction": fraction, "bound": bound, "occupancy": occ, "waves": waves,
            **{k: round(v, 3) for k, v in limits.items() if v != math.inf}}  # fmt: skip


def cublas_fraction(m: int, n: int, gpu: Gpu = H100) -> float:
    return CUBLAS_FRACTION


@dataclass
class Kernel:
    """One kernel of a path, summed over its launches."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0
    compute_seconds: float = 0.0  # each launch's FLOPs over its own achievable rate
    cuda_core_flops: float = 0.0  # row-kernel arithmetic on the FP32 units

    def add_gemm(self, flops: float, fraction: float, precision: str, gpu: Gpu = H100) -> None:
        self.flops += flops
        self.compute_seconds += flops / (gpu.peak(precision) * fraction)

    def fraction(self, precision: str, gpu: Gpu = H100) -> float:
        """The FLOP-weighted fraction of peak of its launches."""
        return self.flops / (gpu.peak(precision) * self.compute_seconds) if self.compute_seconds else 1.0

    def seconds(self, precision: str, gpu: Gpu = H100) -> tuple[float, str]:
        times = {
            "compute": self.compute_seconds + self.cuda_core_flops / gpu.peak("fp32"),
            "memory": self.bytes / gpu.hbm_bytes_per_s,
            "mufu": self.exps / gpu.mufu_per_s,
        }
        bound = max(times, key=times.get)
        return times[bound], bound


def triton_tile(precision: str, aligned: bool, role: str) -> GemmTile:
    """The tile kernels/matmul.matmul_config picks on sm_90 for a large output."""
    if precision == "fp32":
        return MATMUL_TILES[("fp32", role)]
    if precision == "tf32":
        return MATMUL_TILES[("tensor_core_tf32", role)]
    return MATMUL_TILES[("hopper" if aligned else "tensor_core", role)]


# The fused path (kernels/contrastive_loss_fused.py, in progress on another branch), priced from its
# design: (a) the score GEMM's epilogue applies the masks and writes per-tile row max / sum-of-exp
# partials [rows, N / FUSED_BLOCK_N] and S in float32; a merge gives the logsumexp; (b) dX = G·Y with
# G formed in registers from the float32 S tile (one exp per score per D block of FUSED_BLOCK_D), the
# first D block storing G in 16 bits; (c) dY += Gᵀ·X, a plain GEMM on that G. Not compiled on this
# branch: (a) and (c) are priced with the "hopper" tile, (b) with 64 rows × 256 columns of dX and 64
# candidates per step at 3 stages, the configs of the fused branch's work in progress (FUSED_CONFIGS,
# bf16), at one CTA per SM (its registers are not known here: assumed 255).
FUSED_BLOCK_N = 128
FUSED_BLOCK_D = 256
FUSED_GRAD_X_TILE = GemmTile(64, FUSED_BLOCK_D, 64, 8, 3, 255, 3 * (64 * 64 * 4 + 64 * FUSED_BLOCK_D * 2))
PATHS = ("chunked", "cublas", "fused")


def _gemm_fraction(path: str, tile: GemmTile, m: int, n: int, precision: str, **kw) -> float:
    return cublas_fraction(m, n) if path == "cublas" else tile_fraction(tile, m, n, precision, **kw)["fraction"]


def path_kernels(path: str, rows: int, n: int, d: int, precision: str, chunk: int, *, gradients: bool = True,
                 aligned: bool = True) -> list[Kernel]:  # fmt: skip
    """The kernels of one loss evaluation of `rows` query rows against `n` candidates of dimension `d`
    on `path`, `chunk` rows at a time (mmfast.backends.chunked.chunk_rows), summed over the chunks."""
    e = PRECISION_BYTES[precision]
    g_bytes = 4 if e == 4 else 2  # G in the input dtype; for float32 it overwrites S
    out = {name: Kernel(name) for name in ("scores", "rows", "grad_x", "grad_y")}
    for start in range(0, rows, chunk):
        r = min(chunk, rows - start)
        scores, row, grad_x, grad_y = out.values()
        gemm = 2.0 * r * n * d
        plain, accumulate = triton_tile(precision, aligned, "plain"), triton_tile(precision, aligned, "accumulate")
        scores.add_gemm(gemm, _gemm_fraction(path, plain, r, n, precision), precision)
        # S written in float32; the fused forward without a gradient keeps only the tile statistics
        scores.bytes += (r + n) * d * e + (4.0 * r * n if gradients or path != "fused" else 0.0)
        if path == "fused":
            partials = 8.0 * r * math.ceil(n / FUSED_BLOCK_N)
            scores.exps += r * n
            scores.bytes += partials
            row.name = "lse_merge"
            row.bytes += partials + 4.0 * r
        else:
            row.bytes += (8.0 + g_bytes if gradients else 4.0) * r * n  # S read twice (once without G), G written
            row.exps += (2.0 if gradients else 1.0) * r * n
            row.cuda_core_flops += 12.0 * r * n
        if not gradients:
            continue
        if path == "fused":
            fused = tile_fraction(FUSED_GRAD_X_TILE, r, d, precision, a_bytes=4, a_in_registers=True)
            grad_x.add_gemm(gemm, fused["fraction"], precision)
            grad_x.exps += r * n * math.ceil(d / FUSED_BLOCK_D)
            grad_x.bytes += 4.0 * r * n + g_bytes * r * n + n * d * e + 4.0 * r * d  # S in, G out (once from HBM)
        else:
            grad_x.add_gemm(gemm, _gemm_fraction(path, plain, r, d, precision), precision)
            grad_x.bytes += g_bytes * r * n + n * d * e + 4.0 * r * d
        grad_y.add_gemm(gemm, _gemm_fraction(path, accumulate if start else plain, n, d, precision), precision)
        grad_y.bytes += g_bytes * r * n + r * d * e + (8.0 if start else 4.0) * n * d  # dY read-modify-written
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

"""The H100 SXM of the cost model (kernels/roofline.py): its peaks, what each Triton GEMM tile can
reach of them, and one kernel's time. Pure Python. Estimates, not measurements: nobody here has a GPU.

Peaks (H100 SXM5 datasheet, dense): bf16/fp16 989 TFLOP/s = 132 SMs × 4096 FLOP/clock × 1.83 GHz,
TF32 495, FP32 67, HBM3 3.35 TB/s. MUFU (ex2): 16 per SM per clock (CUDA C++ Programming Guide,
arithmetic instruction throughput, compute capability 9.0). Assumptions, not sourced to a
measurement: L2→SM bandwidth 10 TB/s (published figures range 9–12 TB/s), a load latency of 600
clocks (between an L2 hit and an HBM access), and an instruction issue rate of 132 SMs × 4 schedulers
× 32 lanes × 1.98 GHz = 3.3e13 lane-instructions/s (one warp instruction per scheduler per clock at
the 1.98 GHz boost clock), against which the fused kernels' epilogue and prologue SASS are priced.

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

Each kernel's time is max(FLOPs / (peak · fraction), HBM bytes / bandwidth, exps / MUFU rate,
instructions / issue rate): compute, memory, transcendentals and issue overlap perfectly (an
optimistic floor), except an epilogue that runs after the K loop with one CTA per SM: nothing
overlaps it, so its issue (or MUFU) time adds to the tensor time. A launch that leaves SMs idle in
its last wave issues (and exps) on the busy ones only.
"""

from __future__ import annotations

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
    schedulers_per_sm: int = 4
    issue_clock_hz: float = 1.98e9  # assumption: the boost clock, see the docstring

    def peak(self, precision: str) -> float:
        return dict(self.flops)[precision]

    @property
    def mufu_per_s(self) -> float:
        return self.sms * self.mufu_per_clock * self.clock_hz

    @property
    def issue_per_s(self) -> float:
        """Lane-instructions per second: one warp instruction per scheduler per clock."""
        return self.sms * self.schedulers_per_sm * 32 * self.issue_clock_hz


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
# (tests/test_compile.py checks these numbers against it). The "hopper" tiles are compiled aligned;
# a launch that writes C takes "hopper_wide", one that accumulates into it "hopper".
MATMUL_TILES = {
    ("hopper_wide", "plain"): GemmTile(128, 256, 64, 8, 3, 208, 147456),
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
    instructions: float = 0.0  # SASS lane-instructions of its non-GEMM work (fused epilogue/prologue)
    compute_seconds: float = 0.0  # each launch's FLOPs over its own achievable rate
    cuda_core_flops: float = 0.0  # row-kernel arithmetic on the FP32 units
    mufu_seconds: float = 0.0  # each launch's exps over the MUFU rate of the SMs it keeps busy
    issue_seconds: float = 0.0  # each launch's instructions over the issue rate of its busy SMs
    serial_epilogue: bool = False  # its epilogue/issue time adds to the tensor time (module docstring)

    def add_gemm(self, flops: float, fraction: float, precision: str, gpu: Gpu = H100) -> None:
        self.flops += flops
        self.compute_seconds += flops / (gpu.peak(precision) * fraction)

    def add_work(self, *, exps: float = 0.0, instructions: float = 0.0, busy: float = 1.0, gpu: Gpu = H100) -> None:
        """Exps and instructions of one launch whose busy SMs are the `busy` share of them (waves)."""
        self.exps += exps
        self.instructions += instructions
        self.mufu_seconds += exps / (gpu.mufu_per_s * busy)
        self.issue_seconds += instructions / (gpu.issue_per_s * busy)

    def fraction(self, precision: str, gpu: Gpu = H100) -> float:
        """The FLOP-weighted fraction of peak of its launches."""
        return self.flops / (gpu.peak(precision) * self.compute_seconds) if self.compute_seconds else 1.0

    def seconds(self, precision: str, gpu: Gpu = H100) -> tuple[float, str]:
        compute = self.compute_seconds + self.cuda_core_flops / gpu.peak("fp32")
        times = {
            "compute": compute,
            "memory": self.bytes / gpu.hbm_bytes_per_s,
            "mufu": self.mufu_seconds,
            "issue": self.issue_seconds,
        }
        if self.serial_epilogue:
            times["compute+epilogue"] = compute + max(self.mufu_seconds, self.issue_seconds)
        bound = max(times, key=times.get)
        return times[bound], bound


def triton_tile(precision: str, aligned: bool, role: str, m: int = 1 << 20, n: int = 1 << 20) -> GemmTile:
    """The tile kernels/matmul.matmul_config picks on sm_90 for an [m, n] output (not a small one)."""
    if precision == "fp32":
        return MATMUL_TILES[("fp32", role)]
    if precision == "tf32":
        return MATMUL_TILES[("tensor_core_tf32", role)]
    if not aligned:
        return MATMUL_TILES[("tensor_core", role)]
    return MATMUL_TILES[("hopper_wide" if role == "plain" and wide_tile_pays(m, n) else "hopper", role)]


def wide_tile_pays(m: int, n: int) -> bool:
    """Whether the 128×256 Hopper tile reaches more of the peak than 128×128 on an [m, n] output
    (kernels/matmul.matmul_config asks this for the launches that write C)."""
    wide, narrow = (tile_fraction(MATMUL_TILES[(name, "plain")], m, n, "bf16") for name in ("hopper_wide", "hopper"))
    return wide["fraction"] > narrow["fraction"]


def gemm_fraction(cublas: bool, tile: GemmTile, m: int, n: int, precision: str, *, at_peak: bool = False,
                  **kw) -> tuple[float, float]:  # fmt: skip
    """(fraction of peak, busy share of the SMs) of one GEMM launch: cuBLAS's stated fraction or the
    Triton tile's; `at_peak`: every GEMM at peak on every SM (the convention of an ideal estimate)."""
    if at_peak:
        return 1.0, 1.0
    if cublas:
        return cublas_fraction(m, n), 1.0
    r = tile_fraction(tile, m, n, precision, **kw)
    return r["fraction"], r["waves"]


def chunks(rows: int, chunk: int):
    """(first row, rows) of each chunk of the chunk loop."""
    for start in range(0, rows, chunk):
        yield start, min(chunk, rows - start)


def add_gemm_launch(kernel: Kernel, cublas: bool, tile: GemmTile, m: int, n: int, k: int, precision: str,
                    at_peak: bool) -> float:  # fmt: skip
    """One [m, n] × k GEMM launch (cuBLAS or the Triton tile) added to `kernel`; returns its busy share."""
    fraction, busy = gemm_fraction(cublas, tile, m, n, precision, at_peak=at_peak)
    kernel.add_gemm(2.0 * m * n * k, fraction, precision)
    return busy


def add_stored_g_gemms(grad_x: Kernel | None, grad_y: Kernel, cublas: bool, r: int, n: int, d: int, precision: str,
                       *, first: bool, aligned: bool, at_peak: bool) -> None:  # fmt: skip
    """dX = G·Y (into grad_x; None: priced elsewhere) and dY (+)= Gᵀ·X (grad_y) on a stored G of one
    chunk of r rows (kernels/matmul.py's tiles, or cuBLAS); dY, float32, is read and written after
    the first chunk."""
    e = PRECISION_BYTES[precision]
    g_bytes = 4 if e == 4 else 2  # G in the input dtype
    if grad_x is not None:
        add_gemm_launch(grad_x, cublas, triton_tile(precision, aligned, "plain", r, d), r, d, n, precision, at_peak)
        grad_x.bytes += g_bytes * r * n + n * d * e + 4.0 * r * d
    role = "plain" if first else "accumulate"
    add_gemm_launch(grad_y, cublas, triton_tile(precision, aligned, role, n, d), n, d, r, precision, at_peak)
    grad_y.bytes += g_bytes * r * n + r * d * e + (4.0 if first else 8.0) * n * d

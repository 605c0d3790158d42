"""A strided Triton GEMM, C (+)= A·B with float32 accumulation, used by every chunked op.

It is the triton backend's "chunked" path. The contrastive loss also has a "cublas" path
(mmfast.backends.chunked.CublasGemms): torch.mm / torch.addmm with out_dtype=torch.float32, which
give float32 scores and accumulate bf16/fp16 products into a float32 gradient on CUDA (the two
things plain torch.mm cannot: it rounds its output to the inputs' dtype). Which one runs is the cost
model's choice (kernels/roofline.py). Transposes are free here: every operand is addressed through
its strides.

Both operands are cast to DOT_DTYPE (the embeddings' dtype) before tl.dot, so bf16/fp16 run on tensor
cores (wgmma on sm_90). Under the Triton interpreter (TRITON_INTERPRET=1) a bf16×bf16 tl.dot returns
garbage in triton 3.9, so there DOT_DTYPE is float32: the interpreter checks the arithmetic, the AOT
compile (tests/test_compile.py) checks the real bf16 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mmfast.kernel_contract import triton_interpreter_enabled
from mmfast.kernels.compile_spec import CompileSpec
from mmfast.kernels.roofline_tiles import wide_tile_pays


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Every config `matmul_config` can return; tests/test_compile.py compiles each for the targets it
# launches on, and none spills a register (ptxas -v; see benchmarks/gpu_report.py). Full-fp32
# ("ieee") dots run on FMA units with far more registers per product, hence their small tile.
#
# "hopper_wide" and "hopper" (sm_90 and newer, bf16/fp16 dots, aligned operands; TF32 operands would
# need 256 KiB of shared memory at 4 stages): the tiles of Triton's own Hopper matmul tutorials.
# They need the launch to be *aligned*: every pointer 16-byte aligned and every integer argument a
# multiple of 16, which is what Triton's JIT specialises on (tt.divisibility = 16) and what lets the
# loads go straight to shared memory with cp.async.
# A launch that writes C (scores, and the first gradient GEMM of a chunk loop) takes 128×256×64 at 3
# stages, 8 warps (the largest tile the tutorial's autotuner tries; compiled aligned: <= 208
# registers, 144 KiB of shared memory, 0 spills) where the cost model (kernels/roofline_tiles.py
# wide_tile_pays) puts it ahead of 128×128×64: an output of few tiles (dX = G·Y of a 1365-row chunk
# at D = 1024: 44 wide tiles on 132 SMs) fills more SMs with the narrower one. A launch that
# accumulates into C keeps 128×128×64 at 4 stages (<= 172 registers, 128 KiB, 0 spills): at
# 128×256×64 the C tile loaded into the accumulator spills 8 bytes (255 registers). Compiled
# without alignment knowledge (an odd D or N), a 128×128×64 tile spills 376 bytes once C is
# accumulated into, so unaligned launches keep the 128×64×32 "tensor_core" tile.
MATMUL_CONFIGS = {
    "hopper_wide": MatmulConfig(128, 256, 64, 8, 8, 3),  # sm_90+, aligned launches that write C
    "hopper": MatmulConfig(128, 128, 64, 8, 8, 4),  # sm_90+, aligned launches that accumulate into C
    "tensor_core": MatmulConfig(128, 64, 32, 8, 8, 3),  # bf16/fp16, and fp32 with TF32 allowed
    "fp32": MatmulConfig(64, 64, 16, 8, 8, 3),  # full-precision fp32 (FMA)
    "small": MatmulConfig(64, 64, 16, 8, 4, 2),  # small problems, and the interpreter
}
# The smallest compute capability each config is compiled for and launched on.
CONFIG_MIN_ARCH = {"hopper_wide": 90, "hopper": 90}

TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def grouped_tile(pid, blocks_m, blocks_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` in grouped launch order: GROUP_M row blocks share
    each B column block while it is in L2."""
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def accumulate_dot(acc, a_ptrs, b_ptrs, K, stride_ak, stride_bk, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """acc + A·B over the shared dimension K, BLOCK_K at a time: a_ptrs [BM, BK] and b_ptrs [BK, BN]
    point at the first step; steps past K load zeros."""
    rk = tl.arange(0, BLOCK_K)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    # Rows and columns past the edge wrap around (modulo) instead of being masked: the loads stay
    # unmasked along M and N, which keeps the 128×128 tiles free of register spills; the store below
    # drops the wrapped rows.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # [BM]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    # 64-bit row offsets: a [N, D] candidate matrix can exceed 2^31 elements.
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn  # [BK, BN]
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + cm[:, None].to(tl.int64) * stride_cm + cn[None, :] * stride_cn  # [BM, BN]
    c_mask = (cm[:, None] < M) & (cn[None, :] < N)
    # Accumulating starts from C rather than adding it at the end, so no second tile is live.
    if ACCUMULATE:
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)  # [BM, BN]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_dot(acc, a_ptrs, b_ptrs, K, stride_ak, stride_bk, BLOCK_K, DOT_DTYPE, INPUT_PRECISION)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul_config(m: int, n: int, dot_dtype, input_precision: str, arch: int = 80, aligned: bool = False,
                  accumulate: bool = False):  # fmt: skip
    """The launch config for an [m, n] output; `arch` is the device's compute capability as an integer
    (90 for sm_90), `aligned` whether Triton specialises the launch as aligned (`launch_is_aligned`),
    `accumulate` whether it adds into C."""
    full_fp32 = dot_dtype == tl.float32 and input_precision == "ieee"
    if full_fp32 and not triton_interpreter_enabled():
        return MATMUL_CONFIGS["fp32"]
    if triton_interpreter_enabled() or m * n <= 256 * 256:
        return MATMUL_CONFIGS["small"]
    if arch >= CONFIG_MIN_ARCH["hopper"] and aligned and dot_dtype != tl.float32:
        return MATMUL_CONFIGS["hopper" if accumulate or not wide_tile_pays(m, n) else "hopper_wide"]
    return MATMUL_CONFIGS["tensor_core"]


def launch_is_aligned(tensors, integers) -> bool:
    """Triton's own rule for tt.divisibility = 16: pointers 16-byte aligned, integers multiples of 16
    (a stride of 1 is a constexpr and does not count)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(i % 16 == 0 for i in integers if i != 1)


def device_arch(device: torch.device) -> int:
    """The compute capability of `device` as an integer (90 for sm_90); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_dtype_for(embedding_dtype: torch.dtype):
    if triton_interpreter_enabled():
        return tl.float32
    return TORCH_TO_TRITON[embedding_dtype]


def fp32_matmul_allows_tf32() -> bool:
    """torch's own setting for CUDA fp32 matmuls: the newer fp32_precision API when set, else the
    legacy allow_tf32 flag (which raises once the two APIs have been mixed)."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", "none")
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return torch.get_float32_matmul_precision() != "highest"


def input_precision_for(dot_dtype) -> str:
    # fp32 inputs follow torch's own setting (full fp32 unless TF32 is allowed); moot for 16-bit.
    return "tf32" if dot_dtype == tl.float32 and fp32_matmul_allows_tf32() else "ieee"


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, accumulate: bool, embedding_dtype: torch.dtype):
    """c (+)= a @ b for 2-D strided tensors; `embedding_dtype` picks the tensor-core input type."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    dot_dtype = dot_dtype_for(embedding_dtype)
    precision = input_precision_for(dot_dtype)
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    aligned = launch_is_aligned((a, b, c), (m, n, k, *strides))
    cfg = matmul_config(m, n, dot_dtype, precision, device_arch(a.device), aligned, accumulate)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    matmul_kernel[grid](
        a, b, c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


class TritonGemms:
    """The GEMMs of the chunked ops with `matmul`: float32 scores and accumulated gradients from
    bf16/fp16 operands, and G kept in the embeddings' dtype so the gradient GEMMs use tensor cores.
    float64 goes to `fallback` (the torch.mm GEMMs, mmfast.backends.chunked.TorchGemms: tl.dot has
    no float64), which the chunk loop hands in, so this floor needs nothing from the one above."""

    native_low_precision = True

    def __init__(self, fallback):
        self.fallback = fallback

    def grad_dtype(self, score_dtype, embedding_dtype):
        return score_dtype if embedding_dtype == torch.float64 else embedding_dtype

    def matmul(self, a, b, out, accumulate: bool) -> None:
        """out (+)= a @ b (the Matryoshka loop's accumulating score GEMM)."""
        if a.dtype == torch.float64:
            return self.fallback.matmul(a, b, out, accumulate)
        matmul(a, b, out, accumulate=accumulate, embedding_dtype=a.dtype)

    def scores(self, x, pieces, out):
        if x.dtype == torch.float64:
            return self.fallback.scores(x, pieces, out)
        col = 0
        for piece in pieces:
            matmul(x, piece.T, out[:, col : col + piece.shape[0]], accumulate=False, embedding_dtype=x.dtype)
            col += piece.shape[0]

    def dense_grads(self, grad_scores, x, pieces, grad_x, grad_pieces, accumulate_x, accumulate_pieces):
        if x.dtype == torch.float64:
            fallback = self.fallback
            return fallback.dense_grads(grad_scores, x, pieces, grad_x, grad_pieces, accumulate_x, accumulate_pieces)
        col = 0
        for i, piece in enumerate(pieces):
            g = grad_scores[:, col : col + piece.shape[0]]
            col += piece.shape[0]
            if grad_x is not None:
                matmul(g, piece, grad_x, accumulate=accumulate_x or i > 0, embedding_dtype=x.dtype)
            if grad_pieces[i] is not None:
                matmul(g.T, x, grad_pieces[i], accumulate=accumulate_pieces, embedding_dtype=x.dtype)


# Unit strides of each way the chunked ops call `matmul` (a Python int equal to 1 is specialised to a
# constexpr at launch, so each pattern is its own compiled kernel):
#   scores   S = X·Yᵀ    A = X [r, D] row-major, B = Yᵀ (a view of [N, D]), C = S
#   grad_x   dX = G·Y     A = G [r, N] row-major, B = Y [N, D],              C = dX
#   grad_y   dY += Gᵀ·X   A = Gᵀ (a view of G),   B = X [r, D],              C = dY
# G is in the embeddings' dtype (the row kernel writes it so), as are X and Y; C is float32.
MATMUL_ROLES = {
    "scores": ("stride_ak", "stride_bk", "stride_cn"),
    "grad_x": ("stride_ak", "stride_bn", "stride_cn"),
    "grad_y": ("stride_am", "stride_bn", "stride_cn"),
}
_ARGS = ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
         "stride_cn"]  # fmt: skip
_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# Outputs that reach every config: small, huge, and one of few 128×256 tiles (a 1365-row chunk's dX
# at D = 1024), where 128×128 fills more SMs.
OUTPUT_SHAPES = ((1, 1), (1 << 20, 1 << 20), (1365, 1024))


def compile_specs():
    """Every (role, dtype, config, accumulate, precision) `matmul` can launch on a GPU. The "hopper"
    configs only launch aligned on sm_90+, so they are compiled so (for sm_90, with every non-constexpr
    argument marked divisible by 16); the others are compiled without alignment knowledge, the worst
    case for registers (aligned launches of the same tile use fewer)."""
    for role, unit_strides in MATMUL_ROLES.items():
        for dtype, name in _TYPE_NAMES.items():
            # fp32 dots follow torch.backends.cuda.matmul.allow_tf32: both precisions can launch.
            precisions = ["ieee", "tf32"] if dtype == torch.float32 else ["ieee"]
            for precision in precisions:
                dot = TORCH_TO_TRITON[dtype]
                for config_name, cfg in MATMUL_CONFIGS.items():
                    min_arch = CONFIG_MIN_ARCH.get(config_name)
                    for accumulate in (False,) if role == "scores" else (False, True):
                        launchable = {
                            matmul_config(m, n, dot, precision, arch, aligned, accumulate)
                            for m, n in OUTPUT_SHAPES for arch in (80, 90) for aligned in (False, True)
                        }  # fmt: skip
                        if cfg not in launchable:
                            continue
                        signature = {arg: "i32" for arg in _ARGS}
                        signature.update({"a_ptr": f"*{name}", "b_ptr": f"*{name}", "c_ptr": "*fp32"})
                        constexprs = {stride: 1 for stride in unit_strides}
                        signature.update({stride: "constexpr" for stride in unit_strides})
                        constexprs.update(
                            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                            ACCUMULATE=accumulate, DOT_DTYPE=TORCH_TO_TRITON[dtype], INPUT_PRECISION=precision,
                        )  # fmt: skip
                        signature.update({k: "constexpr" for k in constexprs})
                        divisible = [arg for arg in _ARGS if signature[arg] != "constexpr"] if min_arch else []
                        yield CompileSpec(
                            name=f"matmul[{role},{name},{config_name},acc={int(accumulate)},{precision}]",
                            kernel=matmul_kernel, signature=signature, constexprs=constexprs,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                            archs=(min_arch,) if min_arch else (80, 90), divisible_by_16=tuple(divisible),
                        )  # fmt: skip

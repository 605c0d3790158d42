"""A strided Triton GEMM, C (+)= A·B with float32 accumulation, used by every chunked op.

Why not torch.mm on CUDA: the chunked losses need (1) float32 scores from bf16/fp16 inputs, which
cuBLAS through torch.mm would round back to 16 bits, and (2) `grad += Gᵀ·X` with a float32 G and a
bf16 X accumulated into a float32 buffer, which torch.addmm rejects as mixed dtypes. Transposes are
free: every operand is addressed through its strides.

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

from mmfast.backends import triton_interpreter_enabled


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Every config `matmul_config` can return; tests/test_compile.py compiles each for sm_80 and sm_90.
MATMUL_CONFIGS = {
    "large16": MatmulConfig(128, 128, 64, 8, 8, 3),  # bf16/fp16 operands
    "large32": MatmulConfig(128, 128, 32, 8, 8, 3),  # fp32 operands
    "small": MatmulConfig(64, 64, 32, 8, 4, 2),  # small problems, and the interpreter
}

TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Grouped launch order: GROUP_M row blocks share each B column block while it is in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul_config(m: int, n: int, dot_dtype: torch.dtype) -> MatmulConfig:
    if triton_interpreter_enabled() or m * n <= 256 * 256:
        return MATMUL_CONFIGS["small"]
    return MATMUL_CONFIGS["large32" if dot_dtype == torch.float32 else "large16"]


def dot_dtype_for(embedding_dtype: torch.dtype):
    if triton_interpreter_enabled():
        return tl.float32
    return TORCH_TO_TRITON[embedding_dtype]


def input_precision_for(dot_dtype) -> str:
    # fp32 inputs follow torch's own default (full fp32 unless TF32 is allowed); it is moot for 16-bit.
    return "tf32" if dot_dtype == tl.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, accumulate: bool, embedding_dtype: torch.dtype):
    """c (+)= a @ b for 2-D strided tensors; `embedding_dtype` picks the tensor-core input type."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    dot_dtype = dot_dtype_for(embedding_dtype)
    cfg = matmul_config(m, n, embedding_dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    matmul_kernel[grid](
        a, b, c, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        ACCUMULATE=accumulate, DOT_DTYPE=dot_dtype, INPUT_PRECISION=input_precision_for(dot_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip

"""Triton kernels of mmfast.last_token_pool / mean_pool (the API is mmfast/pooling.py).

forward   pool_kernel        grid (B, D / BLOCK_D): finds the row's last real token (or walks its
                             real tokens, padding is never loaded), accumulates in float32
          normalize_kernel   grid (B,): norm, normalisation, output in the input dtype
backward  grad_pooled_kernel grid (B,): dLoss/dpooled through the normalisation ([B, D] float32)
          scatter_kernel     grid (B, T / BLOCK_T, D / BLOCK_D): writes every element of the dense
                             gradient once (zeros included), nothing else of its size is allocated
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.kernel_contract import POOLING_EPS, POOLING_MODE_CODES, pooling_forward_outputs
from mmfast.kernels.compile_spec import CompileSpec

BLOCK_D = 256
BLOCK_T = 32  # tokens per step of the forward's mean: 32×256 loads in flight per program
SCATTER_BLOCK_T = 8  # the backward's writes: 8×256 per program keeps it at ~64 registers
NUM_WARPS = 4


@triton.jit
def _last_token(mask_row, tokens, BLOCK_T: tl.constexpr):
    last = tl.full((), -1, tl.int32)
    for start in range(0, tokens, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        m = tl.load(mask_row + t, mask=t < tokens, other=0)
        last = tl.maximum(last, tl.max(tl.where(m != 0, t, -1), axis=0))
    return last


@triton.jit
def pool_kernel(
    h_ptr, stride_b, stride_t, stride_d, mask_ptr, tokens, dim,
    pooled_ptr, index_ptr, count_ptr,
    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    mask_row = mask_ptr + b * tokens
    h_row = h_ptr + b.to(tl.int64) * stride_b
    acc_type = pooled_ptr.dtype.element_ty
    if MODE == 0:
        last = _last_token(mask_row, tokens, BLOCK_T)
        pooled = tl.load(h_row + last.to(tl.int64) * stride_t + d * stride_d, mask=d < dim, other=0.0).to(acc_type)
        if tl.program_id(1) == 0:
            tl.store(index_ptr + b, last.to(tl.int64))
    else:
        total = tl.zeros((BLOCK_D,), dtype=acc_type)
        count = tl.zeros((), dtype=acc_type)
        for start in range(0, tokens, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)  # [BT]
            real = tl.load(mask_row + t, mask=t < tokens, other=0) != 0
            ptrs = h_row + t[:, None].to(tl.int64) * stride_t + d[None, :] * stride_d  # [BT, BD]
            rows = tl.load(ptrs, mask=real[:, None] & (d[None, :] < dim), other=0.0)  # padding: not loaded
            total += tl.sum(rows.to(acc_type), axis=0)
            count += tl.sum(real.to(acc_type), axis=0)
        pooled = total / count
        if tl.program_id(1) == 0:
            tl.store(count_ptr + b, count)
    tl.store(pooled_ptr + b * dim + d, pooled, mask=d < dim)


@triton.jit
def normalize_kernel(unit_ptr, norm_ptr, out_ptr, dim, eps, NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    row = unit_ptr + b * dim
    squares = tl.zeros((BLOCK_D,), dtype=unit_ptr.dtype.element_ty)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        p = tl.load(row + d, mask=d < dim, other=0.0)
        squares += p * p
    norm = tl.sqrt(tl.sum(squares, axis=0))
    tl.store(norm_ptr + b, norm)
    scale = 1.0 / tl.maximum(norm, eps)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        y = tl.load(row + d, mask=d < dim, other=0.0)
        if NORMALIZE:
            y = y * scale
        tl.store(row + d, y, mask=d < dim)
        tl.store(out_ptr + b * dim + d, y.to(out_ptr.dtype.element_ty), mask=d < dim)


@triton.jit
def grad_pooled_kernel(grad_ptr, unit_ptr, norm_ptr, dp_ptr, dim, eps, NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    acc_type = unit_ptr.dtype.element_ty
    g_row, y_row, dp_row = grad_ptr + b * dim, unit_ptr + b * dim, dp_ptr + b * dim
    if NORMALIZE:
        norm = tl.load(norm_ptr + b)
        dot = tl.zeros((BLOCK_D,), dtype=acc_type)
        for start in range(0, dim, BLOCK_D):
            d = start + tl.arange(0, BLOCK_D)
            g = tl.load(g_row + d, mask=d < dim, other=0.0).to(acc_type)
            dot += g * tl.load(y_row + d, mask=d < dim, other=0.0)
        projection = tl.sum(dot, axis=0)
        clamped = norm <= eps
        inv_norm = 1.0 / tl.maximum(norm, eps)
    for start in range(0, dim, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        g = tl.load(g_row + d, mask=d < dim, other=0.0).to(acc_type)
        if NORMALIZE:
            y = tl.load(y_row + d, mask=d < dim, other=0.0)
            g = tl.where(clamped, g * inv_norm, (g - y * projection) * inv_norm)
        tl.store(dp_row + d, g, mask=d < dim)


@triton.jit
def scatter_kernel(
    dp_ptr, index_ptr, count_ptr, mask_ptr, grad_ptr, tokens, dim,
    MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    dp = tl.load(dp_ptr + b * dim + d, mask=d < dim, other=0.0)  # [BD]
    if MODE == 0:
        weight = (t == tl.load(index_ptr + b)).to(dp.dtype)  # [BT]
    else:
        real = tl.load(mask_ptr + b * tokens + t, mask=t < tokens, other=0) != 0
        weight = real.to(dp.dtype) / tl.load(count_ptr + b)
    g = weight[:, None] * dp[None, :]  # [BT, BD]
    ptrs = grad_ptr + (b.to(tl.int64) * tokens + t[:, None]) * dim + d[None, :]
    tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=(t[:, None] < tokens) & (d[None, :] < dim))


class TritonPoolingKernels:
    def forward(self, hidden, mask, mode, normalize):
        out, unit, norm, index, count = pooling_forward_outputs(hidden, mode)
        batch, tokens, dim = hidden.shape
        index_arg = index if mode == "last" else norm  # an unused pointer still needs a tensor
        count_arg = count if mode == "mean" else norm
        pool_kernel[(batch, triton.cdiv(dim, BLOCK_D))](
            hidden, hidden.stride(0), hidden.stride(1), hidden.stride(2), mask, tokens, dim,
            unit, index_arg, count_arg,
            MODE=POOLING_MODE_CODES[mode], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )  # fmt: skip
        normalize_kernel[(batch,)](
            unit, norm, out, dim, POOLING_EPS, NORMALIZE=normalize, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS
        )
        return out, unit, norm, index, count

    def backward(self, grad_out, unit, norm, index, count, mask, mode, normalize, shape, dtype):
        batch, tokens, dim = shape
        grad_out = grad_out.contiguous()
        grad_pooled = torch.empty_like(unit)
        grad_pooled_kernel[(batch,)](grad_out, unit, norm, grad_pooled, dim, POOLING_EPS, NORMALIZE=normalize,
                                     BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)  # fmt: skip
        grad_hidden = torch.empty(shape, dtype=dtype, device=grad_out.device)
        grid = (batch, triton.cdiv(tokens, SCATTER_BLOCK_T), triton.cdiv(dim, BLOCK_D))
        scatter_kernel[grid](
            grad_pooled, index if mode == "last" else norm, count if mode == "mean" else norm, mask, grad_hidden,
            tokens, dim, MODE=POOLING_MODE_CODES[mode], BLOCK_T=SCATTER_BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )  # fmt: skip
        return grad_hidden


def compile_specs():
    """Every variant: hidden dtype (accumulating in float32, or float64) × mode (× normalize)."""
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for mode, code in POOLING_MODE_CODES.items():
            yield CompileSpec(
                name=f"pool[{dtype},{mode}]", kernel=pool_kernel,
                signature={"h_ptr": f"*{dtype}", "stride_b": "i32", "stride_t": "i32", "stride_d": "i32",
                           "mask_ptr": "*i32", "tokens": "i32", "dim": "i32", "pooled_ptr": f"*{acc}",
                           "index_ptr": "*i64" if mode == "last" else f"*{acc}", "count_ptr": f"*{acc}",
                           "MODE": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"MODE": code, "BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D},
                num_warps=NUM_WARPS, num_stages=2,
            )  # fmt: skip
            yield CompileSpec(
                name=f"pool_scatter[{dtype},{mode}]", kernel=scatter_kernel,
                signature={"dp_ptr": f"*{acc}", "index_ptr": "*i64" if mode == "last" else f"*{acc}",
                           "count_ptr": f"*{acc}", "mask_ptr": "*i32", "grad_ptr": f"*{dtype}", "tokens": "i32",
                           "dim": "i32", "MODE": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"MODE": code, "BLOCK_T": SCATTER_BLOCK_T, "BLOCK_D": BLOCK_D},
                num_warps=NUM_WARPS, num_stages=2,
            )  # fmt: skip
        for normalize in (False, True):
            yield CompileSpec(
                name=f"pool_normalize[{dtype},normalize={int(normalize)}]", kernel=normalize_kernel,
                signature={"unit_ptr": f"*{acc}", "norm_ptr": f"*{acc}", "out_ptr": f"*{dtype}", "dim": "i32",
                           "eps": "fp32", "NORMALIZE": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"NORMALIZE": normalize, "BLOCK_D": BLOCK_D}, num_warps=NUM_WARPS, num_stages=1,
            )  # fmt: skip
            yield CompileSpec(
                name=f"pool_grad_pooled[{dtype},normalize={int(normalize)}]", kernel=grad_pooled_kernel,
                signature={"grad_ptr": f"*{dtype}", "unit_ptr": f"*{acc}", "norm_ptr": f"*{acc}", "dp_ptr": f"*{acc}",
                           "dim": "i32", "eps": "fp32", "NORMALIZE": "constexpr", "BLOCK_D": "constexpr"},
                constexprs={"NORMALIZE": normalize, "BLOCK_D": BLOCK_D}, num_warps=NUM_WARPS, num_stages=1,
            )  # fmt: skip

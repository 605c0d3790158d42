"""Triton row kernel of mmfast.sigmoid_loss (the chunk loop is mmfast/backends/sigmoid_loss.py; the score
and gradient GEMMs are kernels/matmul.py).

One program per row, one pass over its scores: the logits t·s + b, the labels (z = +1 for the row's
positive, or with HAS_IDS every candidate sharing its id), the loss Σ_j softplus(-z·logit) and, with
HAS_GRAD, G = t·g in the gradient buffer's dtype (the embeddings' for bf16/fp16: the gradient GEMMs
read it on tensor cores), g = c·(-z)·σ(-z·logit); with PARAMETER_GRADS also Σ_j g_j·s_j and Σ_j g_j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfast.kernels.compile_spec import CompileSpec
from mmfast.kernels.matmul import TritonGemms

ROW_BLOCK_N = 1024
ROW_NUM_WARPS = 4


@triton.jit
def pair_rows_kernel(
    s_ptr, stride_s, g_ptr, stride_g, ids_ptr, n, row_offset, params_ptr, row_scale_ptr, loss_ptr, scale_grad_ptr,
    bias_grad_ptr, BLOCK_N: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_IDS: tl.constexpr,
    PARAMETER_GRADS: tl.constexpr,
):  # fmt: skip
    scale = tl.load(params_ptr)  # t and b in the scores' dtype (not as float32 arguments)
    bias = tl.load(params_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    positive_col = row + row_offset
    s_row, g_row = s_ptr + row * stride_s, g_ptr + row * stride_g
    offsets = tl.arange(0, BLOCK_N)
    zero = scale * 0.0
    coef = tl.load(row_scale_ptr + row) if HAS_GRAD else zero
    if HAS_IDS:
        positive_id = tl.load(ids_ptr + positive_col)
    loss, sum_g, sum_gs = zero, zero, zero
    for start in range(0, n, BLOCK_N):
        cols = start + offsets
        valid = cols < n
        s = tl.load(s_row + cols, mask=valid, other=0.0)
        positive = tl.load(ids_ptr + cols, mask=valid, other=-1) == positive_id if HAS_IDS else cols == positive_col
        logit = s * scale + bias
        u = tl.where(positive, logit, -logit)  # z·logit
        e = tl.exp(-tl.abs(u))
        w = 1.0 + e
        # softplus(-u) = max(-u, 0) + log1p(e); log1p as log(w) corrected for the rounding of w.
        term = tl.maximum(-u, 0.0) + tl.log(w) + (e - (w - 1.0)) / w
        loss += tl.sum(tl.where(valid, term, 0.0), axis=0)
        if HAS_GRAD:
            sigmoid = tl.where(u >= 0, e, 1.0) / w  # σ(-u)
            g = tl.where(valid, tl.where(positive, -sigmoid, sigmoid) * coef, 0.0)
            if PARAMETER_GRADS:
                sum_g += tl.sum(g, axis=0)
                sum_gs += tl.sum(g * s, axis=0)
            tl.store(g_row + cols, (g * scale).to(g_row.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, loss)
    if PARAMETER_GRADS:
        tl.store(scale_grad_ptr + row, sum_gs)
        tl.store(bias_grad_ptr + row, sum_g)


class TritonSigmoidKernels(TritonGemms):
    """Triton GEMMs (float64: the torch `fallback`) and row kernel."""

    bytes_per_score = 6  # float32 scores + a 16-bit G

    def pair_rows(self, scores, row_offset, scale, bias, row_scale, loss, grad_out, scale_grad=None,
                  bias_grad=None, ids=None):  # fmt: skip
        has_grad = row_scale is not None
        grad_out = scores if grad_out is None else grad_out
        tensors = [p for p in (scale, bias) if isinstance(p, torch.Tensor)]
        if tensors:  # a tensor stays on the device: no sync (a number joins it as one)
            params = torch.stack([p if isinstance(p, torch.Tensor) else tensors[0] * 0.0 + p for p in (scale, bias)])
            params = params.to(scores.dtype)
        else:
            params = torch.tensor([scale, bias], dtype=scores.dtype).to(scores.device)
        parameter_grads = scale_grad is not None or bias_grad is not None
        # The kernel writes both sums: a missing one goes to a throwaway buffer.
        spare = torch.empty(loss.shape, dtype=loss.dtype, device=loss.device) if parameter_grads else loss
        pair_rows_kernel[(scores.shape[0],)](
            scores, scores.stride(0), grad_out, grad_out.stride(0), loss if ids is None else ids, scores.shape[1],
            row_offset, params, row_scale if has_grad else loss, loss,
            spare if scale_grad is None else scale_grad, spare if bias_grad is None else bias_grad,
            BLOCK_N=ROW_BLOCK_N, HAS_GRAD=has_grad, HAS_IDS=ids is not None, PARAMETER_GRADS=parameter_grads,
            num_warps=ROW_NUM_WARPS,
        )  # fmt: skip


def compile_specs():
    """Every variant: scores dtype × G dtype (None = loss only) × HAS_IDS × PARAMETER_GRADS (with a G)."""
    for scores, grads in [("fp32", None), ("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("fp64", None),
                          ("fp64", "fp64")]:  # fmt: skip
        for has_ids in (False, True):
            for parameter_grads in (False, True) if grads else (False,):
                signature = {
                    "s_ptr": f"*{scores}", "stride_s": "i32", "g_ptr": f"*{grads or scores}", "stride_g": "i32",
                    "ids_ptr": "*i32" if has_ids else f"*{scores}", "n": "i32", "row_offset": "i32",
                    "params_ptr": f"*{scores}", "row_scale_ptr": f"*{scores}", "loss_ptr": f"*{scores}",
                    "scale_grad_ptr": f"*{scores}", "bias_grad_ptr": f"*{scores}", "BLOCK_N": "constexpr",
                    "HAS_GRAD": "constexpr", "HAS_IDS": "constexpr", "PARAMETER_GRADS": "constexpr",
                }  # fmt: skip
                options = f"{',ids' if has_ids else ''}{',parameters' if parameter_grads else ''}"
                yield CompileSpec(
                    name=f"sigmoid_pair_rows[{scores},grad={grads}{options}]",
                    kernel=pair_rows_kernel, signature=signature,
                    constexprs={"BLOCK_N": ROW_BLOCK_N, "HAS_GRAD": grads is not None, "HAS_IDS": has_ids,
                                "PARAMETER_GRADS": parameter_grads},
                    num_warps=ROW_NUM_WARPS, num_stages=1,
                )  # fmt: skip

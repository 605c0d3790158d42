"""Triton row kernel of mmfast.distillation_loss (the chunk loop is mmfast/backends/distillation_loss.py;
the score and gradient GEMMs are kernels/matmul.py).

One program per row, two passes over its student and teacher scores: online max / sum-of-exp for
both (pass 1), then KL(p_t ‖ p_s) and G = c·(p_s - p_t)/τ_s in the student's input dtype (pass 2),
and with TEMPERATURE_GRAD w = Σ_j G_j·z_j over the student logits z = s/τ_s (dLoss/dτ_s = -Σ w).
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
def kl_rows_kernel(
    s_ptr, stride_s, t_ptr, stride_t, g_ptr, stride_g, n, params_ptr, row_scale_ptr, loss_ptr, temperature_grad_ptr,
    BLOCK_N: tl.constexpr, HAS_GRAD: tl.constexpr, TEMPERATURE_GRAD: tl.constexpr,
):  # fmt: skip
    inv_ts = tl.load(params_ptr)  # 1/τ_s and 1/τ_t in the scores' dtype (not as float32 arguments)
    inv_tt = tl.load(params_ptr + 1)
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row = s_ptr + row * stride_s, t_ptr + row * stride_t
    offsets = tl.arange(0, BLOCK_N)
    zero = inv_ts * 0.0
    max_s = zero + float("-inf")
    max_t = zero + float("-inf")
    sum_s, sum_t = zero, zero
    for start in range(0, n, BLOCK_N):  # pass 1: both logsumexps, online
        cols = start + offsets
        valid = cols < n
        s = tl.where(valid, tl.load(s_row + cols, mask=valid, other=0.0) * inv_ts, float("-inf"))
        t = tl.where(valid, tl.load(t_row + cols, mask=valid, other=0.0) * inv_tt, float("-inf"))
        new_s = tl.maximum(max_s, tl.max(s, axis=0))
        new_t = tl.maximum(max_t, tl.max(t, axis=0))
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(s - new_s), axis=0)
        sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(tl.exp(t - new_t), axis=0)
        max_s, max_t = new_s, new_t
    log_sum_s = tl.log(sum_s)
    log_sum_t = tl.log(sum_t)
    # Pass 2: KL = Σ p_t·(log p_t - log p_s), both logs relative to their own logsumexp so no large
    # terms cancel ((x - max) - log Σ, never x - (max + log Σ)); and G = c·(p_s - p_t)/τ_s.
    coef = tl.load(row_scale_ptr + row) * inv_ts if HAS_GRAD else zero
    g_row = g_ptr + row * stride_g
    kl = zero
    weighted = zero
    for start in range(0, n, BLOCK_N):
        cols = start + offsets
        valid = cols < n
        z = tl.load(s_row + cols, mask=valid, other=0.0) * inv_ts
        log_ps = (z - max_s) - log_sum_s
        log_pt = (tl.load(t_row + cols, mask=valid, other=0.0) * inv_tt - max_t) - log_sum_t
        p_t = tl.where(valid, tl.exp(log_pt), 0.0)
        kl += tl.sum(p_t * (log_pt - log_ps), axis=0)
        if HAS_GRAD:
            g = coef * (tl.exp(log_ps) - p_t)
            if TEMPERATURE_GRAD:
                weighted += tl.sum(tl.where(valid, g * (z - max_s), 0.0), axis=0)  # Σ_j G_j = 0: shifted z
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=valid)
    tl.store(loss_ptr + row, kl)
    if TEMPERATURE_GRAD:
        tl.store(temperature_grad_ptr + row, weighted)


class TritonDistillationKernels(TritonGemms):
    """Triton GEMMs (float64: the torch `fallback`) and row kernel."""

    bytes_per_score = 10  # float32 student and teacher scores + a 16-bit G

    def kl_rows(self, student, teacher, inv_student_t, inv_teacher_t, row_scale, loss, grad_out,
                temperature_grad=None):  # fmt: skip
        has_grad = row_scale is not None
        grad_out = student if grad_out is None else grad_out
        if isinstance(inv_student_t, torch.Tensor):  # a temperature tensor: stays on the device, no sync
            params = torch.stack([inv_student_t, inv_student_t * 0.0 + inv_teacher_t]).to(student.dtype)
        else:
            params = torch.tensor([inv_student_t, inv_teacher_t], dtype=student.dtype).to(student.device)
        kl_rows_kernel[(student.shape[0],)](
            student, student.stride(0), teacher, teacher.stride(0), grad_out, grad_out.stride(0), student.shape[1],
            params, row_scale if has_grad else loss, loss, loss if temperature_grad is None else temperature_grad,
            BLOCK_N=ROW_BLOCK_N, HAS_GRAD=has_grad, TEMPERATURE_GRAD=temperature_grad is not None,
            num_warps=ROW_NUM_WARPS,
        )  # fmt: skip


def compile_specs():
    """Every variant: scores dtype × G dtype (None = loss only) × TEMPERATURE_GRAD (with a G only)."""
    for scores, grads in [("fp32", None), ("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("fp64", None),
                          ("fp64", "fp64")]:  # fmt: skip
        for temperature_grad in (False, True) if grads else (False,):
            signature = {
                "s_ptr": f"*{scores}", "stride_s": "i32", "t_ptr": f"*{scores}", "stride_t": "i32",
                "g_ptr": f"*{grads or scores}", "stride_g": "i32", "n": "i32", "params_ptr": f"*{scores}",
                "row_scale_ptr": f"*{scores}", "loss_ptr": f"*{scores}", "temperature_grad_ptr": f"*{scores}",
                "BLOCK_N": "constexpr", "HAS_GRAD": "constexpr", "TEMPERATURE_GRAD": "constexpr",
            }  # fmt: skip
            yield CompileSpec(
                name=f"distillation_kl_rows[{scores},grad={grads}{',temperature' if temperature_grad else ''}]",
                kernel=kl_rows_kernel, signature=signature,
                constexprs={"BLOCK_N": ROW_BLOCK_N, "HAS_GRAD": grads is not None,
                            "TEMPERATURE_GRAD": temperature_grad},
                num_warps=ROW_NUM_WARPS, num_stages=1,
            )  # fmt: skip

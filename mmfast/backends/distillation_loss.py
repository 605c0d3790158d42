"""The chunked similarity-distillation loss, shared by the torch, cpu and triton backends.

Per chunk of rows (the same rows of the student's and the teacher's queries):

    S = sq[chunk] · stᵀ,  T = tq[chunk] · ttᵀ       two score blocks [rows, N], never [B, N]
    loss, G = row kernel(S, T)                       both exact logsumexps, KL(p_t ‖ p_s), and
                                                     G = c·(p_s - p_t)/τ_s written over S
    d sq[chunk] = G · st ;  d st += Gᵀ · sq[chunk]   the student's gradient GEMMs

The teacher only costs its score GEMM: it gets no gradient. Its dimension may differ from the
student's (precomputed 4096-d NV-Embed-v2 vectors against a 1536-d student, say).

A student temperature tensor that wants a gradient adds one reduction per row to the row kernel:
w_i = Σ_j G_ij·z_ij over the student logits z = s/τ_s, and dTotal/dτ_s = -Σ_i w_i.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from mmfast._extension import load_extension
from mmfast.backends.chunked import TorchGemms, chunk_rows, scratch, work_copy
from mmfast.kernel_contract import compute_dtype


class GradientNeeds(NamedTuple):
    """Which of the student's inputs want a gradient (the teacher never gets one)."""

    student_query: bool = False
    student_target: bool = False
    student_temperature: bool = False


NO_GRADIENTS = GradientNeeds()


class TorchDistillationKernels(TorchGemms):
    bytes_per_score = 12  # student and teacher scores, plus log_softmax's temporary

    def kl_rows(self, student, teacher, inv_student_t, inv_teacher_t, row_scale, loss, grad_out,
                temperature_grad=None):  # fmt: skip
        """Loss of each row into `loss`; with row_scale, G into grad_out (here always `student`), and
        with `temperature_grad` w_i = Σ_j G_ij·z_ij into it."""
        log_student = torch.log_softmax(student.mul_(inv_student_t), dim=1)
        log_teacher = torch.log_softmax(teacher.mul_(inv_teacher_t), dim=1)
        p_teacher = log_teacher.exp()
        torch.sum(p_teacher * (log_teacher - log_student), dim=1, out=loss)
        if row_scale is not None:
            coef = row_scale * inv_student_t
            difference = log_student.exp_().sub_(p_teacher)
            if temperature_grad is not None:  # before G overwrites the logits; Σ_j G_j = 0, so z - max z
                shifted = student.sub_(student.amax(dim=1, keepdim=True))
                torch.mul(torch.einsum("rn,rn->r", difference, shifted), coef, out=temperature_grad)
            torch.mul(difference, coef[:, None], out=student)


class CpuDistillationKernels(TorchDistillationKernels):
    """The C++ row kernel (csrc/distillation_loss.cpp); GEMMs on MKL through torch.mm."""

    bytes_per_score = 8

    def __init__(self, extension):
        self.ext = extension

    def kl_rows(self, student, teacher, inv_student_t, inv_teacher_t, row_scale, loss, grad_out,
                temperature_grad=None):  # fmt: skip
        # A temperature tensor is on the CPU here: float() reads it without a device sync.
        self.ext.distillation_kl_rows(
            student, teacher, float(inv_student_t), inv_teacher_t, row_scale, loss, temperature_grad
        )


@functools.cache
def distillation_kernels(backend: str):
    """The kernel set of a resolved backend (one instance per backend)."""
    if backend == "cpu":
        return CpuDistillationKernels(load_extension())
    if backend == "triton":
        from mmfast.kernels.distillation_loss import TritonDistillationKernels  # needs triton: imported when asked

        return TritonDistillationKernels(fallback=TorchDistillationKernels())
    return TorchDistillationKernels()


def distillation_loss_rows(
    backend: str,
    student_query: torch.Tensor,
    student_target: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_target: torch.Tensor,
    *,
    student_temperature: float | torch.Tensor,
    teacher_temperature: float,
    row_scale: torch.Tensor | None,
    needs: GradientNeeds,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-row KL [B] (float32, float64 for float64 students) and, with `row_scale`, the gradients of
    Σ_i row_scale_i·loss_i for the student query, target and temperature flagged in `needs` (a
    student_temperature tensor: 0-d, its gradient in its dtype; a number gets none).

    The student's candidates are `student_target` [N, D_s] and the teacher's `teacher_target`
    [N, D_t]: with cross-device negatives these are the global batches, the queries local.
    """
    kernels = distillation_kernels(backend)
    score_dtype = compute_dtype(student_query.dtype)
    inputs = (student_query, student_target, teacher_query, teacher_target)
    sq, st, tq, tt = (work_copy(t, score_dtype, kernels.native_low_precision) for t in inputs)
    n_rows, n_candidates = sq.shape[0], st.shape[0]
    want = row_scale is not None
    grad_sq = torch.empty(sq.shape, dtype=score_dtype, device=sq.device) if want and needs.student_query else None
    grad_st = torch.empty(st.shape, dtype=score_dtype, device=sq.device) if want and needs.student_target else None
    chunk = chunk_rows(n_rows, n_candidates, kernels.bytes_per_score, score_dtype, sq.device)
    student_scores = scratch("scores", chunk, n_candidates, score_dtype, sq.device)
    teacher_scores = scratch("teacher", chunk, n_candidates, score_dtype, sq.device)
    grad_dtype = kernels.grad_dtype(score_dtype, sq.dtype)
    separate = want and grad_dtype != score_dtype
    grad_scratch = scratch("grads", chunk, n_candidates, grad_dtype, sq.device) if separate else None
    loss = torch.empty(n_rows, dtype=score_dtype, device=sq.device)
    scale = None if row_scale is None else row_scale.to(score_dtype).contiguous()
    tensor = isinstance(student_temperature, torch.Tensor)
    inv_student_t = 1.0 / (student_temperature.to(score_dtype) if tensor else student_temperature)
    want_temperature = want and tensor and needs.student_temperature
    w = torch.empty(n_rows, dtype=score_dtype, device=sq.device) if want_temperature else None
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        s, t = student_scores[: stop - start], teacher_scores[: stop - start]
        kernels.scores(sq[start:stop], [st], s)
        kernels.scores(tq[start:stop], [tt], t)
        grads = None if not want else s if grad_scratch is None else grad_scratch[: stop - start]
        row_scale_chunk = None if scale is None else scale[start:stop]
        kernels.kl_rows(
            s, t, inv_student_t, 1.0 / teacher_temperature, row_scale_chunk, loss[start:stop], grads,
            None if w is None else w[start:stop],
        )  # fmt: skip
        if grads is not None:
            grad_sq_chunk = None if grad_sq is None else grad_sq[start:stop]
            kernels.dense_grads(grads, sq[start:stop], [st], grad_sq_chunk, [grad_st], False, start > 0)
    return (
        loss,
        None if grad_sq is None else grad_sq.to(student_query.dtype),
        None if grad_st is None else grad_st.to(student_target.dtype),
        None if w is None else (-w.sum(dtype=torch.float64)).to(student_temperature.dtype),
    )

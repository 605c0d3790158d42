"""Naive similarity distillation (UniME stage 1): materialises both B×B similarity matrices.

    p_teacher_i = softmax_j(tq_i · tt_j / τ_t),  p_student_i = softmax_j(sq_i · st_j / τ_s)
    loss_i = KL(p_teacher_i ‖ p_student_i) = Σ_j p_t,ij (log p_t,ij - log p_s,ij)

The teacher receives no gradient. The test oracle (float64); the benchmarks time it as their
"reference" provider, beside the F.kl_div code users write.
"""

from __future__ import annotations

import torch


def distillation_loss_reference(
    student_query: torch.Tensor,
    student_target: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_target: torch.Tensor,
    *,
    student_temperature: float | torch.Tensor = 0.02,
    teacher_temperature: float = 0.02,
    reduction: str = "mean",
) -> torch.Tensor:
    log_student = torch.log_softmax(student_query @ student_target.T / student_temperature, dim=1)
    teacher_scores = teacher_query.detach() @ teacher_target.detach().T / teacher_temperature
    log_teacher = torch.log_softmax(teacher_scores.to(log_student.dtype), dim=1)
    rows = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows

"""How the chunked losses hand gradients to autograd, shared by their Functions.

With reduction "mean" or "sum" the coefficient of each row's loss in the total is known in forward
(`row_scale`), so forward computes the gradients with the loss (three GEMMs, no recomputation, as
Liger's fused linear cross-entropy does) and backward only multiplies them, in place, by the scalar
output gradient. With "none" that coefficient is the per-row output gradient, known only in
backward, which then recomputes the scores.
"""

from __future__ import annotations

import torch


def row_scale(reduction: str, n_rows: int, weight: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor:
    """d(reduced loss)/d(loss_i), in the loss dtype (kernel_contract.compute_dtype; a float32 1/B would
    cost float64 inputs digits)."""
    scale = torch.ones(n_rows, dtype=dtype, device=device) if weight is None else weight.detach().to(dtype)
    return scale / n_rows if reduction == "mean" else scale


def reduce_rows(rows: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def scale_saved_gradients(ctx, op: str, grad_output: torch.Tensor) -> list[torch.Tensor]:
    """The gradients saved by a fused forward, times the scalar grad_output, in place (no copy of a
    [N, D] gradient). A second backward would scale them twice, so it is refused (before the saved
    tensors are unpacked, which autograd would refuse less clearly). Extra saved tensors after the
    gradients (ctx.extra_saved of them) are returned unscaled at the end."""
    if getattr(ctx, "scaled", False):
        raise RuntimeError(
            f"mmfast.{op}: backward ran twice through a mean/sum loss (retain_graph); its gradients are computed "
            "in forward and scaled in place once. Use reduction='none' and reduce yourself to backpropagate twice."
        )
    ctx.scaled = True
    saved = list(ctx.saved_tensors)
    extra = getattr(ctx, "extra_saved", 0)
    grads = saved[: len(saved) - extra]
    return [g.mul_(grad_output.to(g.dtype)) if g.numel() else g for g in grads] + saved[len(saved) - extra :]

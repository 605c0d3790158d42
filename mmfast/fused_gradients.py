"""How the chunked losses hand gradients to autograd, shared by their Functions.

With reduction "mean" or "sum" the coefficient of each row's loss in the total is known in forward
(`row_scale`), so forward computes the gradients with the loss (three GEMMs, no recomputation, as
Liger's fused linear cross-entropy does) and backward only multiplies them, in place, by the scalar
output gradient. With "none" that coefficient is the per-row output gradient, known only in
backward, which then recomputes the scores. A second backward through a mean/sum loss
(retain_graph=True, gradcheck) recomputes too: the first one handed its gradients to autograd.
"""

from __future__ import annotations

import functools

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


def take_fused_gradients(ctx, grad_output: torch.Tensor) -> list[torch.Tensor] | None:
    """The gradients a fused forward left in ctx.fused_gradients, times the scalar grad_output, in
    place (no copy of a [N, D] gradient); None when a backward already took them, so that a second
    one recomputes. They are a ctx attribute rather than saved tensors: autograd would refuse to
    unpack a saved tensor modified in place, and the first backward releases them."""
    gradients = getattr(ctx, "fused_gradients", None)
    if gradients is None:
        return None
    ctx.fused_gradients = None
    return [g.mul_(grad_output.to(g.dtype)) if g.numel() else g for g in gradients]


def once_differentiable(op: str):
    """torch.autograd.function.once_differentiable with an mmfast message: the backward runs without
    autograd, and under create_graph=True its gradients carry a node that raises, naming the op, if
    anything differentiates them again (double backward)."""
    message = (
        f"mmfast.{op}: double backward (differentiating its gradient, create_graph=True) is not supported: the "
        "fused kernels compute the gradient outside autograd. backend='reference' is plain autograd and "
        "differentiates twice (it holds the full score matrix)."
    ).encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            error = torch._C._functions.DelayedError(message, len(grads))
            return error(*(None if g is None else g.detach().requires_grad_() for g in grads))

        return wrapper

    return decorate

"""mmfast.sigmoid_loss: SigLIP's pairwise sigmoid loss, with a learnable logit scale and bias, shared
hard negatives, duplicate positives (candidate_ids) and cross-device candidates; fused and chunked so
the B×N logit matrix never exists, forward or backward.

    logit_ij = logit_scale · ⟨query_i, candidate_j⟩ + logit_bias,  candidates = [targets; negatives]
    loss_i = -Σ_j log σ(z_ij · logit_ij),  z_ij = +1 for a positive of row i, -1 otherwise

Layers, top to bottom:
  sigmoid_loss() / SigmoidLoss           validate inputs, build SigmoidLossOptions
  SigmoidLossFunction                    the one autograd.Function, for every backend
  torch.ops.mmfast.sigmoid_loss_rows     a custom op, so torch.compile traces through
  mmfast.backends.sigmoid_loss           the chunk loop; row kernels per backend (csrc/, kernels/)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mmfast.backends import autocast_disabled, resolve_backend
from mmfast.backends.sigmoid_loss import NO_GRADIENTS, GradientNeeds, sigmoid_loss_rows
from mmfast.distributed import Gathered, gather_candidates, process_group_active, warn_single_process
from mmfast.duplicate_ids import check_duplicate_ids, class_index, gather_duplicate_ids
from mmfast.fused_gradients import once_differentiable, reduce_rows, row_scale, take_fused_gradients
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.sigmoid_loss import sigmoid_loss_reference
from mmfast.validation import (
    check_backend_name,
    check_bias,
    check_embeddings,
    check_reduction,
    check_temperature,
    check_temperature_value,
)


@dataclass(frozen=True)
class SigmoidLossOptions:
    """Every option of the loss; validated on construction. `logit_scale` and `logit_bias` may be 0-d
    tensors (learnable); the embeddings' device is checked when the loss is computed. The defaults
    are SigLIP's initial values (t = 10, b = -10)."""

    logit_scale: float | torch.Tensor = 10.0
    logit_bias: float | torch.Tensor = -10.0
    reduction: str = "mean"
    backend: str = "auto"
    cross_device: bool = False

    def __post_init__(self):
        check_temperature("logit_scale", self.logit_scale, device=None)
        check_bias("logit_bias", self.logit_bias, device=None)
        check_reduction(self.reduction)
        check_backend_name(self.backend)
        if not isinstance(self.cross_device, bool):
            raise TypeError(f"cross_device must be a bool, got {type(self.cross_device).__name__}")


def _gathered(negatives, gathered_targets, positive_offset: int) -> Gathered | None:
    """The Gathered that the flat arguments of the custom op and of the Function stand for."""
    return None if gathered_targets is None else Gathered(gathered_targets, negatives, None, positive_offset)


@torch.library.custom_op("mmfast::sigmoid_loss_rows", mutates_args=())
def _sigmoid_loss_rows_op(
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    gathered_targets: torch.Tensor | None,
    logit_scale_tensor: torch.Tensor | None,
    logit_bias_tensor: torch.Tensor | None,
    positive_offset: int,
    logit_scale: float,
    logit_bias: float,
    backend: str,
    needs: list[bool],
    candidate_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked loss as a custom op, so torch.compile traces through it. The arguments are
    SigmoidLossOptions' fields (a tensor scale or bias replaces the number), the parts of a
    Gathered (across devices `negatives` is Gathered.negatives), GradientNeeds as a list and the
    ids of the candidates the rows see."""
    if logit_scale_tensor is not None and logit_scale_tensor.device.type == "cpu":
        check_temperature_value("logit_scale", logit_scale_tensor)  # also under torch.compile
    with autocast_disabled(query.device):
        loss, *grads = sigmoid_loss_rows(
            backend, query, target, negatives,
            logit_scale=logit_scale if logit_scale_tensor is None else logit_scale_tensor,
            logit_bias=logit_bias if logit_bias_tensor is None else logit_bias_tensor,
            row_scale=row_scale, needs=GradientNeeds(*needs),
            gathered=_gathered(negatives, gathered_targets, positive_offset), ids=class_index(candidate_ids),
        )  # fmt: skip
    # A custom op returns tensors only: a gradient that was not computed comes back empty.
    return (loss, *(g if g is not None else query.new_empty(0) for g in grads))


@_sigmoid_loss_rows_op.register_fake
def _(query, target, negatives, row_scale, gathered_targets, logit_scale_tensor, logit_bias_tensor, positive_offset,
      logit_scale, logit_bias, backend, needs, candidate_ids=None):  # fmt: skip
    returned = GradientNeeds(*needs).returned(local=gathered_targets is None)
    inputs = (query, target, negatives, gathered_targets, logit_scale_tensor, logit_bias_tensor)

    def grad(flag: bool, like: torch.Tensor | None) -> torch.Tensor:
        if row_scale is None or not flag or like is None:
            return query.new_empty(0)
        return like.new_empty(like.shape)  # contiguous, as the real op returns

    loss = query.new_empty(query.shape[0], dtype=compute_dtype(query.dtype))
    return (loss, *(grad(flag, like) for flag, like in zip(returned, inputs, strict=True)))


def _rows(query, target, negatives, gathered_targets, offset, scale, bias, options: SigmoidLossOptions, backend,
          candidate_ids, row_scale=None, needs: GradientNeeds = NO_GRADIENTS):  # fmt: skip
    """The custom op on named arguments; `scale`, `bias`: the tensors, or None for the options' numbers."""
    return _sigmoid_loss_rows_op(
        query, target, negatives, row_scale, gathered_targets, scale, bias, offset, options.logit_scale,
        options.logit_bias, backend, list(needs), candidate_ids,
    )  # fmt: skip


# The Function's tensor inputs, in its argument order; `needs` follows GradientNeeds' order.
_NEEDS_INPUTS = (0, 1, 2, 4, 5, 6)


class SigmoidLossFunction(torch.autograd.Function):
    """One Function for every backend; `backend` is already resolved to a concrete one.

    With reduction "mean"/"sum" the forward also computes the gradients (three GEMMs in all, no
    recomputation) and the first backward only scales them; with "none", or in a second backward,
    backward recomputes the scores chunk by chunk (mmfast/fused_gradients.py). Across devices
    gathered_targets (and negatives) are all ranks' tensors from an autograd-aware all-gather, and
    query i's positive is gathered target positive_offset + i. `logit_scale` / `logit_bias` are the
    0-d tensors (None for numbers, which are in `options`). `candidate_ids` (no gradient) are those
    of the candidates the rows see."""

    @staticmethod
    def forward(ctx, query, target, negatives, weight, gathered_targets, logit_scale, logit_bias, positive_offset,
                options: SigmoidLossOptions, backend: str, candidate_ids=None):  # fmt: skip
        needs = GradientNeeds(*(ctx.needs_input_grad[i] for i in _NEEDS_INPUTS))
        ctx.options, ctx.backend, ctx.needs, ctx.offset, ctx.candidate_ids = (
            options, backend, needs, positive_offset, candidate_ids
        )  # fmt: skip
        common = (query, target, negatives, gathered_targets, positive_offset, logit_scale, logit_bias, options,
                  backend, candidate_ids)  # fmt: skip
        if options.reduction != "none":
            scale = row_scale(options.reduction, query.shape[0], weight, compute_dtype(query.dtype), query.device)
            rows, *ctx.fused_gradients = _rows(*common, scale, needs)
        else:
            rows = _rows(*common)[0]
        # d loss / d weight_i is row i's loss (over B for "mean"): keep the [B] rows when asked.
        ctx.weight_grad = weight is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(query, target, negatives, weight, gathered_targets, logit_scale, logit_bias,
                              rows if ctx.weight_grad else None)  # fmt: skip
        return reduce_rows(rows, weight, options.reduction)

    @staticmethod
    @once_differentiable("sigmoid_loss")
    def backward(ctx, grad_output):
        query, target, negatives, weight, gathered_targets, logit_scale, logit_bias, rows = ctx.saved_tensors
        grads = take_fused_gradients(ctx, grad_output)
        if grads is None:  # reduction "none", or a second backward
            dtype = compute_dtype(query.dtype)
            scale = row_scale(ctx.options.reduction, query.shape[0], weight, dtype, query.device) * grad_output
            grads = _rows(query, target, negatives, gathered_targets, ctx.offset, logit_scale, logit_bias, ctx.options,
                          ctx.backend, ctx.candidate_ids, scale.detach(), ctx.needs)[1:]  # fmt: skip
        # Real gradients are 2-D (the scale's and bias's 0-d); 1-D empty placeholders mean "not computed".
        grad_query, grad_target, grad_negatives, grad_gathered_targets, grad_scale, grad_bias = (
            g if need and g.dim() != 1 else None for g, need in zip(grads, ctx.needs, strict=True)
        )
        grad_weight = None
        if ctx.weight_grad:
            grad_weight = grad_output * (rows / rows.shape[0] if ctx.options.reduction == "mean" else rows)
        return (grad_query, grad_target, grad_negatives, grad_weight, grad_gathered_targets, grad_scale, grad_bias,
                None, None, None, None)  # fmt: skip


def sigmoid_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    logit_scale: float | torch.Tensor = 10.0,
    logit_bias: float | torch.Tensor = -10.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    cross_device: bool = False,
    candidate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss of B queries against their B targets plus shared hard negatives.

    Args:
        query, target: [B, D]; target i is the positive of query i. Not normalised here.
        negatives: None, [B, K, D] or [M, D]; every query sees all of them. Candidates are the B
            targets, then the negatives flattened row-major (N = B + M).
        logit_scale: t, the logits are t·s_ij + b (SigLIP's t = exp(t'), open_clip's
            `logit_scale.exp()`). A positive number, or a 0-d floating tensor on the embeddings'
            device that may require grad (dLoss/dt = Σ_ij g_ij·s_ij, g = dLoss/dlogit). Its value
            is checked (> 0) only on the CPU, where that costs no device sync.
        logit_bias: b; a finite number or a 0-d floating tensor that may require grad
            (dLoss/db = Σ_ij g_ij).
        weight: [B] per-row multipliers applied before the reduction; "mean" divides the weighted
            sum by B. It gets a gradient when it requires one (each row's unweighted loss).
        reduction: "mean" (Σ_i loss_i / B, as SigLIP and open_clip normalise), "sum" or "none" ([B]).
        backend: "auto", "triton", "cpu", "torch" or "reference".
        cross_device: with an initialised torch.distributed group, targets and negatives are
            all-gathered with gradient; each rank's queries see every rank's candidates, query i's
            positive being the gathered target at this rank's offset + i. Each rank's loss is the
            reduction over its own rows; after every rank's backward each rank holds the gradient of
            the sum of all ranks' losses. Without a group: this process's batch, with one warning.
        candidate_ids: None or [N] integer ids of the candidates (the B targets, then the negatives
            flattened). For query i every candidate j with candidate_ids[j] equal to the id of its
            positive is a positive too (label +1): a duplicate positive is a positive, not a
            negative. Across devices the ids are gathered with the candidates.

    Returns the loss in float32 (float64 for float64 inputs). Gradients reach query, target,
    negatives, logit_scale and logit_bias in their own dtypes. A second backward (retain_graph)
    recomputes; the gradient is not differentiable again (create_graph: a clear error if used). The
    B×N logit matrix is never held: memory is one chunk of score rows (a fixed byte budget).

    Bad input raises ValueError/TypeError naming the argument.
    """
    options = SigmoidLossOptions(logit_scale, logit_bias, reduction, backend, cross_device)
    return _sigmoid_loss(query, target, negatives, weight, options, candidate_ids)


def _sigmoid_loss(query, target, negatives, weight, options: SigmoidLossOptions, candidate_ids=None) -> torch.Tensor:
    flat_negatives = check_embeddings(query, target, negatives, weight)
    check_temperature("logit_scale", options.logit_scale, device=query.device)
    check_bias("logit_bias", options.logit_bias, device=query.device)
    n_candidates = query.shape[0] + (0 if flat_negatives is None else flat_negatives.shape[0])
    ids = check_duplicate_ids(candidate_ids, None, batch_size=query.shape[0], n_candidates=n_candidates,
                              symmetric=False, device=query.device)  # fmt: skip
    backend = resolve_backend(options.backend, query.device)
    gathered = None
    if options.cross_device:
        if process_group_active():
            gathered = gather_candidates(query, target, flat_negatives, symmetric=False)
            ids = gather_duplicate_ids(ids, query.shape[0])[0]
        else:
            warn_single_process("sigmoid_loss")
    ids = ids.candidate
    if backend == "reference":
        return sigmoid_loss_reference(
            query, target, flat_negatives, logit_scale=options.logit_scale, logit_bias=options.logit_bias,
            weight=weight, reduction=options.reduction, candidate_ids=ids, gathered=gathered,
        ).to(compute_dtype(query.dtype))  # fmt: skip
    # Autograd and the custom op track tensors only as direct arguments: the Gathered's parts, and the
    # scale and bias tensors apart from the options (which then hold placeholder numbers).
    gathered_targets, offset = (None, 0) if gathered is None else (gathered.targets, gathered.offset)
    rows_negatives = flat_negatives if gathered is None else gathered.negatives
    scale = options.logit_scale if isinstance(options.logit_scale, torch.Tensor) else None
    bias = options.logit_bias if isinstance(options.logit_bias, torch.Tensor) else None
    options = dataclasses.replace(options, logit_scale=1.0 if scale is not None else options.logit_scale,
                                  logit_bias=0.0 if bias is not None else options.logit_bias)  # fmt: skip
    tensors = (query, target, rows_negatives, weight, gathered_targets, scale, bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # No gradient wanted: the loss alone, one GEMM per chunk and no gradient buffers.
        rows = _rows(query, target, rows_negatives, gathered_targets, offset, scale, bias, options, backend, ids)[0]
        return reduce_rows(rows, weight, options.reduction)
    return SigmoidLossFunction.apply(*tensors, offset, options, backend, ids)


class SigmoidLoss(torch.nn.Module):
    """nn.Module form of `sigmoid_loss`; the keyword options are fixed at construction. A logit_scale or
    logit_bias that is an nn.Parameter is registered as the module's parameter of that name (so it is
    in .parameters(), the state dict and .to())."""

    def __init__(self, **options):
        super().__init__()
        self.options = SigmoidLossOptions(**options)
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(self.options, name), torch.nn.Parameter):
                setattr(self, name, getattr(self.options, name))

    def forward(self, query, target, negatives=None, weight=None, candidate_ids=None):
        options = self.options
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(self, name, None), torch.nn.Parameter):  # whatever .to() made of it
                options = dataclasses.replace(options, **{name: getattr(self, name)})
        return _sigmoid_loss(query, target, negatives, weight, options, candidate_ids)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())

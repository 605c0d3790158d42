"""mmfast.distillation_loss: UniME stage 1, a KL divergence between the teacher's and the student's
in-batch similarity distributions, fused and chunked so neither B×B matrix exists.

    p_teacher_i = softmax_j(tq_i · tt_j / τ_t),  p_student_i = softmax_j(sq_i · st_j / τ_s)
    loss_i = KL(p_teacher_i ‖ p_student_i)

No duplicate ids (unlike contrastive_loss's candidate_ids), by choice: there is no positive to
protect. A copy j of candidate i has the same teacher score and, with equal student embeddings, the
same student score as i, so both distributions give the two equal shares; KL(p_t ‖ p_s) is then
exactly the KL over the distinct candidates with each copy's share merged into one. No copy pulls
the student away from what the teacher says (a duplicate positive in the contrastive loss pushes
the query from its own answer). Masking copies from both distributions would be consistent too,
but it would only reweight the target (each content once rather than by its copies), for a cost.

Layers: distillation_loss() / DistillationLoss -> DistillationLossFunction ->
torch.ops.mmfast.distillation_loss_rows (custom op) -> mmfast/backends/distillation_loss.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mmfast.backends import autocast_disabled, resolve_backend
from mmfast.backends.distillation_loss import NO_GRADIENTS, GradientNeeds, distillation_loss_rows
from mmfast.distributed import gather, process_group_active, warn_single_process
from mmfast.fused_gradients import once_differentiable, reduce_rows, row_scale, take_fused_gradients
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.distillation_loss import distillation_loss_reference
from mmfast.validation import (
    check_backend_name,
    check_float_dtype,
    check_real,
    check_reduction,
    check_temperature,
    check_temperature_value,
)


@dataclass(frozen=True)
class DistillationLossOptions:
    """Every option of the loss. `student_temperature` may be a 0-d tensor (a learnable τ_s); the
    teacher's temperature is a number (its distribution is a fixed target)."""

    student_temperature: float | torch.Tensor = 0.02
    teacher_temperature: float = 0.02
    reduction: str = "mean"
    backend: str = "auto"
    cross_device: bool = False

    def __post_init__(self):
        check_temperature("student_temperature", self.student_temperature, device=None)
        check_real("teacher_temperature", self.teacher_temperature, positive=True)
        check_reduction(self.reduction)
        check_backend_name(self.backend)
        if not isinstance(self.cross_device, bool):
            raise TypeError(f"cross_device must be a bool, got {type(self.cross_device).__name__}")


def _check_inputs(student_query, student_target, teacher_query, teacher_target) -> None:
    named = {"student_query": student_query, "student_target": student_target, "teacher_query": teacher_query,
             "teacher_target": teacher_target}  # fmt: skip
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(t.shape)}")
        check_float_dtype(name, t)
        if t.device != student_query.device:
            raise ValueError(f"{name} is on {t.device} but student_query is on {student_query.device}")
    b, d = student_query.shape
    if b == 0 or d == 0:
        raise ValueError(f"student_query needs B >= 1 and D >= 1, got shape {(b, d)}")
    if student_target.shape != student_query.shape:
        raise ValueError(f"student_target must have student_query's shape {(b, d)} [B, D_s], got "
                         f"{tuple(student_target.shape)}")  # fmt: skip
    if teacher_query.shape[0] != b or teacher_query.shape[1] == 0:
        raise ValueError(f"teacher_query must be [B, D_t] with B = {b} and D_t >= 1, got {tuple(teacher_query.shape)}")
    if teacher_target.shape != teacher_query.shape:
        raise ValueError(f"teacher_target must have teacher_query's shape {tuple(teacher_query.shape)} [B, D_t], got "
                         f"{tuple(teacher_target.shape)}")  # fmt: skip
    if student_target.dtype != student_query.dtype:
        raise TypeError(f"student_target has dtype {student_target.dtype} but student_query has {student_query.dtype}")
    if teacher_target.dtype != teacher_query.dtype:
        raise TypeError(f"teacher_target has dtype {teacher_target.dtype} but teacher_query has {teacher_query.dtype}")


@torch.library.custom_op("mmfast::distillation_loss_rows", mutates_args=())
def _distillation_loss_rows_op(
    student_query: torch.Tensor,
    student_target: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_target: torch.Tensor,
    row_scale: torch.Tensor | None,
    student_temperature_tensor: torch.Tensor | None,
    student_temperature: float,
    teacher_temperature: float,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked loss as a custom op (torch.compile traces through it); with a tensor τ_s the
    number `student_temperature` is unused."""
    if student_temperature_tensor is not None:
        if student_temperature_tensor.device.type == "cpu":
            check_temperature_value("student_temperature", student_temperature_tensor)  # also under torch.compile
        student_temperature = student_temperature_tensor
    with autocast_disabled(student_query.device):
        loss, *grads = distillation_loss_rows(
            backend, student_query, student_target, teacher_query, teacher_target,
            student_temperature=student_temperature, teacher_temperature=teacher_temperature, row_scale=row_scale,
            needs=GradientNeeds(*needs),
        )  # fmt: skip
    return (loss, *(g if g is not None else student_query.new_empty(0) for g in grads))


@_distillation_loss_rows_op.register_fake
def _(student_query, student_target, teacher_query, teacher_target, row_scale, student_temperature_tensor,
      student_temperature, teacher_temperature, backend, needs):  # fmt: skip
    def grad(flag, like):
        return like.new_empty(like.shape) if row_scale is not None and flag and like is not None else \
            student_query.new_empty(0)  # fmt: skip

    loss = student_query.new_empty(student_query.shape[0], dtype=compute_dtype(student_query.dtype))
    like = (student_query, student_target, student_temperature_tensor)
    return loss, *(grad(flag, t) for flag, t in zip(needs, like, strict=True))


def _rows(sq, st, tq, tt, options: DistillationLossOptions, backend: str, temperature: torch.Tensor | None,
          scale=None, needs=NO_GRADIENTS):  # fmt: skip
    """The custom op; `temperature` is the tensor τ_s, or None when it is the number in `options`."""
    return _distillation_loss_rows_op(
        sq, st, tq, tt, scale, temperature, options.student_temperature, options.teacher_temperature, backend,
        list(needs),
    )  # fmt: skip


class DistillationLossFunction(torch.autograd.Function):
    """One Function for every backend. The teacher's inputs get no gradient; student_target and
    teacher_target are the candidates (the global batches under cross_device). As for
    contrastive_loss, mean/sum compute the gradients in forward and a second backward recomputes.
    `temperature` is the tensor τ_s (None for a number, which is in `options`)."""

    @staticmethod
    def forward(ctx, student_query, student_target, teacher_query, teacher_target, temperature, options, backend):
        needs = GradientNeeds(*(ctx.needs_input_grad[i] for i in (0, 1, 4)))
        ctx.options, ctx.backend, ctx.needs = options, backend, needs
        inputs = (student_query, student_target, teacher_query, teacher_target)
        if options.reduction != "none":
            dtype = compute_dtype(student_query.dtype)
            scale = row_scale(options.reduction, student_query.shape[0], None, dtype, student_query.device)
            rows, *ctx.fused_gradients = _rows(*inputs, options, backend, temperature, scale, needs)
        else:
            rows = _rows(*inputs, options, backend, temperature)[0]
        ctx.save_for_backward(*inputs, temperature)
        return reduce_rows(rows, None, options.reduction)

    @staticmethod
    @once_differentiable("distillation_loss")
    def backward(ctx, grad_output):
        sq, st, tq, tt, temperature = ctx.saved_tensors
        grads = take_fused_gradients(ctx, grad_output)
        if grads is None:  # reduction "none", or a second backward
            scale = row_scale(ctx.options.reduction, sq.shape[0], None, compute_dtype(sq.dtype), sq.device)
            grads = _rows(sq, st, tq, tt, ctx.options, ctx.backend, temperature, scale * grad_output.detach(),
                          ctx.needs)[1:]  # fmt: skip
        grad_sq, grad_st, grad_temperature = (
            g if need and g.dim() != 1 else None for g, need in zip(grads, ctx.needs, strict=True)
        )
        return grad_sq, grad_st, None, None, grad_temperature, None, None


def distillation_loss(
    student_query: torch.Tensor,
    student_target: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_target: torch.Tensor,
    *,
    student_temperature: float | torch.Tensor = 0.02,
    teacher_temperature: float = 0.02,
    reduction: str = "mean",
    backend: str = "auto",
    cross_device: bool = False,
) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) of each row's in-batch similarity distribution.

    Args:
        student_query, student_target: [B, D_s], the student's embeddings (gradients flow here).
        teacher_query, teacher_target: [B, D_t], the teacher's (e.g. precomputed NV-Embed-v2 vectors;
            D_t may differ from D_s, and so may the dtype). No gradient reaches them.
        student_temperature, teacher_temperature: τ_s and τ_t. τ_s may be a 0-d floating tensor
            that requires grad (a learnable τ_s; gradient -Σ_ij G_ij·z_ij over the student logits
            z = s/τ_s); τ_t is a number.
        reduction: "mean", "sum" or "none" ([B]).
        backend: "auto", "triton", "cpu", "torch" or "reference".
        cross_device: with an initialised torch.distributed group, every rank's targets are
            all-gathered (the student's with gradient) and each rank's rows see the global batch;
            each rank's loss reduces over its own rows, and after every rank's backward each rank
            holds the gradient of the sum of all ranks' losses (DDP's averaging then gives the
            global-batch mean). Without a group: this process's batch, with one warning.

    Returns the loss in float32 (float64 for a float64 student). Never holds a B×B matrix.
    """
    options = DistillationLossOptions(student_temperature, teacher_temperature, reduction, backend, cross_device)
    return _distillation_loss(student_query, student_target, teacher_query, teacher_target, options)


def _distillation_loss(sq, st, tq, tt, options: DistillationLossOptions) -> torch.Tensor:
    _check_inputs(sq, st, tq, tt)
    check_temperature("student_temperature", options.student_temperature, device=sq.device)
    backend = resolve_backend(options.backend, sq.device)
    if options.cross_device:
        if process_group_active():
            st, _ = gather(st, with_grad=True)
            tt, _ = gather(tt, with_grad=False)
        else:
            warn_single_process("distillation_loss")
    if backend == "reference":
        return distillation_loss_reference(
            sq, st, tq, tt, student_temperature=options.student_temperature,
            teacher_temperature=options.teacher_temperature, reduction=options.reduction,
        ).to(compute_dtype(sq.dtype))  # fmt: skip
    temperature = options.student_temperature if isinstance(options.student_temperature, torch.Tensor) else None
    if temperature is not None:  # autograd and the custom op take tensors as direct arguments only
        options = dataclasses.replace(options, student_temperature=1.0)
    wanted = (sq, st, temperature)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in wanted)):
        return reduce_rows(_rows(sq, st, tq, tt, options, backend, temperature)[0], None, options.reduction)
    return DistillationLossFunction.apply(sq, st, tq, tt, temperature, options, backend)


class DistillationLoss(torch.nn.Module):
    """nn.Module form of `distillation_loss`: forward(student_query, student_target, teacher_query, teacher_target)."""

    def __init__(self, **options):
        super().__init__()
        self.options = DistillationLossOptions(**options)
        if isinstance(self.options.student_temperature, torch.nn.Parameter):  # in .parameters(), the state dict
            self.student_temperature = self.options.student_temperature

    def forward(self, student_query, student_target, teacher_query, teacher_target):
        options = self.options
        if isinstance(getattr(self, "student_temperature", None), torch.nn.Parameter):
            options = dataclasses.replace(options, student_temperature=self.student_temperature)
        return _distillation_loss(student_query, student_target, teacher_query, teacher_target, options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())

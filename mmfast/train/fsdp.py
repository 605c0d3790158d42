"""GradCache's gradient sync under FSDP2: one reduce-scatter per FSDP unit per step.

GradCache holds the sync back until the last mini-batch (`set_requires_gradient_sync(False)`, FSDP2's
`no_sync`), so each unit keeps its unsharded gradient until then. FSDP2 reduce-scatters at every
post-backward of a unit that runs with sync on, and a unit's post-backward fires once per forward call
that had inputs requiring grad: the encoder runs the backbone once per side (query, target, hard
negatives), so a decoder layer's post-backward fires two or three times in one backward. Autograd sums a
parameter's gradient over all its uses before accumulating it, so in a plain step only the last of those
post-backwards finds a gradient; in GradCache's last mini-batch the first one finds the gradient held
from the earlier mini-batches and reduce-scatters it, the last one what this mini-batch added: two
reduce-scatters where one does.

`sync_at_last_post_backward` keeps the sync off through the last mini-batch too, and turns it on for a
unit just before that unit's last post-backward of the step: a marker applied after FSDP2's own
pre-forward hook, on the same inputs, whose backward runs right before FSDP2's post-backward, counts
the unit's calls down. A unit whose inputs never require grad (the root, whose inputs are the batch; a
first layer under frozen embeddings) has its one post-backward at the end of the backward: its sync
stays on. Gradients are the same sums either way; each unit is reduce-scattered once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils._pytree import tree_flatten, tree_unflatten


class _BeforePostBackward(torch.autograd.Function):
    """Identity on a forward call's grad-requiring inputs; its backward calls `on_backward` (once per call,
    before FSDP2's post-backward of the call, which sits between these inputs and the caller's)."""

    @staticmethod
    def forward(ctx, on_backward, *tensors):
        ctx.on_backward = on_backward
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_backward()
        return (None, *grads)


class _UnitCountdown:
    """One FSDP unit's forward calls with grad-requiring inputs in the last mini-batch, counted off in its
    backward; at the last one the unit's sync is turned on."""

    def __init__(self, unit: FSDPModule):
        self.unit, self.forward_calls, self.backward_calls = unit, 0, 0

    def pre_forward(self, module, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        marked = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        # Not in a backward: activation checkpointing runs the forward again there, not a call of its own.
        if not marked or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None
        self.forward_calls += 1
        outputs = _BeforePostBackward.apply(self.backward_of_one_call, *(leaves[i] for i in marked))
        for i, tensor in zip(marked, outputs, strict=True):
            leaves[i] = tensor
        return tree_unflatten(leaves, spec)

    def backward_of_one_call(self) -> None:
        self.backward_calls += 1
        if self.backward_calls == self.forward_calls:
            self.unit.set_requires_gradient_sync(True, recurse=False)

    @property
    def left_unsynced(self) -> bool:
        """Some of the unit's calls had a backward (its parameters got gradients) but not the last one, so its
        last post-backward ran with sync off. (A unit none of whose calls had a backward, such as a vision
        layer whose output the backbone does not read, got no gradient: nothing to sync.)"""
        return 0 < self.backward_calls < self.forward_calls


@contextlib.contextmanager
def sync_at_last_post_backward(model: FSDPModule) -> Iterator[None]:
    """The forward of `model` and the backward run inside it reduce-scatter each FSDP unit of `model` once:
    at the unit's last post-backward, with what earlier backwards held (sync off) and this one added."""
    countdowns = [_UnitCountdown(module) for module in model.modules() if isinstance(module, FSDPModule)]

    def after_forward(module, args, output):
        # A unit none of whose calls had grad-requiring inputs has its one post-backward at the end of the
        # backward (FSDP2's final callback): its sync is on from the start.
        for countdown in countdowns:
            if countdown.forward_calls == 0:
                countdown.unit.set_requires_gradient_sync(True, recurse=False)

    model.set_requires_gradient_sync(False)
    handles = [cd.unit.register_forward_pre_hook(cd.pre_forward, with_kwargs=True) for cd in countdowns]
    handles.append(model.register_forward_hook(after_forward))
    try:
        yield
        missed = [type(cd.unit).__name__ for cd in countdowns if cd.left_unsynced]
        if missed:
            raise RuntimeError(
                f"FSDP2 units whose gradient this step's backward left unsynced (a forward call of theirs had no "
                f"backward, so their last post-backward ran with the sync off): {', '.join(missed)}"
            )
    finally:
        for handle in handles:
            handle.remove()
        model.set_requires_gradient_sync(True)

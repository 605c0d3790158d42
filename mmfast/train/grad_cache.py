"""GradCache: a contrastive batch larger than what fits on the device, with exact gradients.

Gao et al. 2021, as VLM2Vec's trainer does it, for any model that maps a mini-batch to a dict of
embeddings:
1. forward every mini-batch without grad, remembering the RNG state each one started from;
2. take the loss on the detached, concatenated embeddings and its gradient with respect to them
   (with mmfast's fused losses this is one call, and no [mini-batch, N] score block is held);
3. re-run each mini-batch with grad from its remembered RNG state (so dropout draws the same
   masks) and backpropagate `Σ embedding · cached_gradient`.

The parameter gradients equal those of one graph over the same mini-batches (same dropout masks),
and peak activation memory is one mini-batch's. Under DDP, `no_sync` holds the gradient all-reduce
back until the last mini-batch: one all-reduce per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

import mmfast

Embeddings = dict[str, torch.Tensor]


class RandomState:
    """The CPU and accelerator RNG states at one moment, to replay a forward pass exactly."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the block from this state, then puts the surrounding RNG state back."""
        devices = list(range(torch.cuda.device_count())) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def concatenate(parts: Sequence[Embeddings]) -> Embeddings:
    """Per side, the mini-batches' embeddings in order (a side absent from a mini-batch adds nothing).
    Multi-vector embeddings [n, L, D] of different L are padded with zero tokens to the longest (a
    zero vector is a padding token: `encoder.token_mask`)."""
    sides = {side: None for part in parts for side in part}
    return {side: _cat_rows([part[side] for part in parts if side in part]) for side in sides}


def _cat_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if tensors[0].dim() == 3:
        length = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def split_like(
    grads: Embeddings, parts: Sequence[Mapping[str, torch.Tensor | int | tuple[int, int]]]
) -> list[Embeddings]:
    """Undoes `concatenate` for gradients: each mini-batch gets the rows (and, multi-vector, the tokens)
    of its own embeddings (given as the embeddings, or as their row counts or (rows, tokens) shapes)."""
    offsets = dict.fromkeys(grads, 0)
    pieces = []
    for part in parts:
        piece = {}
        for side, embedding in part.items():
            if isinstance(embedding, torch.Tensor):
                embedding = embedding.shape[0] if embedding.dim() == 2 else tuple(embedding.shape[:2])
            shape = (embedding,) if isinstance(embedding, int) else tuple(embedding)
            start, rows = offsets[side], shape[0]
            piece[side] = grads[side][start : start + rows]
            if len(shape) == 2 and grads[side].dim() == 3:
                piece[side] = piece[side][:, : shape[1]]
            offsets[side] = start + rows
        pieces.append(piece)
    return pieces


def _dot(embedding: torch.Tensor, cached_grad: torch.Tensor) -> torch.Tensor:
    """Σ embedding · cached_grad, summed in at least float32 (16-bit embeddings under autocast)."""
    dtype = torch.promote_types(embedding.dtype, torch.float32)
    return (embedding.to(dtype) * cached_grad.to(dtype)).sum()


def grad_cache_step(
    forward: Callable[[Mapping], Embeddings],
    mini_batches: Sequence[Mapping],
    loss_fn: Callable[[Embeddings], torch.Tensor],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_parameters: Sequence[torch.Tensor] = (),
    last_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, Embeddings]:
    """One GradCache step over `mini_batches`; returns the (detached) loss and embeddings.

    forward: a mini-batch -> {side: [n, D] embeddings}; called len(mini_batches) times without grad,
        then once more per mini-batch with grad.
    loss_fn: the loss of the whole contrastive batch from the concatenated embeddings.
    backward: how a surrogate is backpropagated (e.g. `accelerator.backward`).
    no_sync: a context that defers the DDP gradient all-reduce; every mini-batch but the last runs in it.
    loss_parameters: parameters the loss itself reads (the sigmoid loss's logit scale and bias): their
        gradient is taken with the embeddings' and joins the last mini-batch's surrogate (`p · dLoss/dp`),
        so `backward` gives it to them exactly once, scaled and reduced like every other gradient.
    last_sync: the context the last mini-batch runs in, whose backward syncs the gradients (FSDP2:
        `fsdp.sync_at_last_post_backward`, one reduce-scatter per unit).
    """
    if not mini_batches:
        raise ValueError("grad_cache_step needs at least one mini-batch")
    # Each mini-batch is read by index where it is encoded and referenced nowhere else, so mini-batches
    # built on read (`mini_batches.MiniBatches`) are held one at a time, in both passes.
    states, cached = [], []
    with torch.no_grad():
        for index in range(len(mini_batches)):
            states.append(RandomState())
            cached.append({side: e.detach() for side, e in forward(mini_batches[index]).items()})

    embeddings = {side: e.requires_grad_() for side, e in concatenate(cached).items()}
    # From here on only the parts' row counts are needed: their copies in `embeddings` are enough (B × D
    # less at the step's peak, the loss).
    cached = [{side: e.shape[0] if e.dim() == 2 else tuple(e.shape[:2]) for side, e in part.items()} for part in cached]
    with torch.enable_grad():
        loss = loss_fn(embeddings)
        grads = torch.autograd.grad(loss, [*embeddings.values(), *loss_parameters], allow_unused=True)
    grads, parameter_grads = grads[: len(embeddings)], grads[len(embeddings) :]
    grads = {
        side: torch.zeros_like(e) if g is None else g for (side, e), g in zip(embeddings.items(), grads, strict=True)
    }
    parameter_grads = [(p, g) for p, g in zip(loss_parameters, parameter_grads, strict=True) if g is not None]
    # The fused loss keeps its CPU scratch between calls (up to 32 MiB a buffer once the batch is large);
    # kept through the second pass it would add to the step's peak what the batch's size put there.
    mmfast.release_scratch()

    last = len(mini_batches) - 1
    for index, (state, piece) in enumerate(zip(states, split_like(grads, cached), strict=True)):
        with state.replay(), no_sync() if index < last else last_sync():
            outputs = forward(mini_batches[index])
            surrogate = sum(_dot(outputs[side], piece[side]) for side in piece)
            if index == last:
                surrogate = surrogate + sum(_dot(p, g) for p, g in parameter_grads)
            backward(surrogate)
    return loss.detach(), {side: e.detach() for side, e in embeddings.items()}


def full_batch_step(
    forward: Callable[[Mapping], Embeddings],
    mini_batches: Sequence[Mapping],
    loss_fn: Callable[[Embeddings], torch.Tensor],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> tuple[torch.Tensor, Embeddings]:
    """The plain step: every mini-batch forwarded with grad into one graph, one loss, one backward.

    The reference GradCache is exact against, and the step used without GradCache (one mini-batch).
    """
    parts = [forward(mini_batch) for mini_batch in mini_batches]
    embeddings = concatenate(parts)
    loss = loss_fn(embeddings)
    backward(loss)
    return loss.detach(), {side: e.detach() for side, e in embeddings.items()}

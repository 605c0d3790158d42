"""The GradCache mini-batches of one contrastive batch, built from the raw rows when they are encoded.

A step holds the rows of its contrastive batch as `Input`s (texts and image paths), the cached
embeddings (B × D) and the model inputs of one mini-batch at a time: reading `mini_batches[i]`
decodes that mini-batch's images, runs the processor and places the tensors on the device, and
`grad_cache_step` drops them once the mini-batch has been encoded. GradCache reads every mini-batch
twice (the pass without grad, then the replay with grad), so the second pass decodes and processes its
images again: keeping the first pass's inputs instead would grow the step's memory with the batch by
the processor's output per row (README, "GradCache memory": measured both ways).

The data loader's workers still read ahead: they read and check every row (an unreadable image is
skipped and reported there, so a batch's rows are fixed before its step), compute the content ids and
gather the teacher rows. What crosses from a worker to the trainer is the rows and the mini-batches'
bounds; not tensors, and not the builder (a processor can be megabytes): the trainer binds its own
(`bound`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .data import Input, load_image

Row = tuple[Input, ...]  # (query, positive, *negatives)


@dataclass(frozen=True)
class MiniBatching:
    """How a step cuts its contrastive batch into GradCache mini-batches: at most `rows` rows each
    (`--gradcache_mini_batch_size`; 0 = no cap) and at most `tokens` padded tokens each
    (`--gradcache_mini_batch_tokens`; 0 = no budget). Both 0: no GradCache, the whole batch in one graph.

    The run resolves it once (`run_config.RunConfig`); the collator cuts the batch by it and the trainer
    decides by it whether to run GradCache, so the two cannot disagree (the trainer checks)."""

    rows: int = 0
    tokens: int = 0

    def __post_init__(self):
        for name, value in (("gradcache_mini_batch_size", self.rows), ("gradcache_mini_batch_tokens", self.tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    @classmethod
    def of(cls, training_args) -> MiniBatching:
        """The mini-batching `training_args` (mmfast's TrainingArguments) ask for."""
        return cls(training_args.gradcache_mini_batch_size, training_args.gradcache_mini_batch_tokens)

    @property
    def grad_cache(self) -> bool:
        """Whether the step runs GradCache (mini-batches by rows, by tokens, or both)."""
        return self.rows > 0 or self.tokens > 0

    @property
    def setting(self) -> str:
        """The options that are set, as a user writes them (for messages)."""
        named = (("gradcache_mini_batch_size", self.rows), ("gradcache_mini_batch_tokens", self.tokens))
        return " and ".join(f"{name} {value}" for name, value in named if value) or "off"

    def check_engine(self, engine: str | None) -> None:
        """GradCache cannot run under DeepSpeed (`engine` "deepspeed"): accelerate's backward runs the
        engine's optimizer step after every backward, so each mini-batch's backward would step it."""
        if self.grad_cache and engine == "deepspeed":
            raise ValueError(
                f"DeepSpeed with {self.setting}: GradCache is not supported under DeepSpeed, as accelerate's "
                "backward runs the engine's optimizer step after every backward, so each GradCache mini-batch "
                "would step it. Use FSDP or DDP, or gradcache_mini_batch_size 0 and gradcache_mini_batch_tokens 0"
            )

    def bounds(self, rows: int) -> list[tuple[int, int]]:
        """(start, stop) of each mini-batch of `rows` rows cut by rows alone (no token budget)."""
        step = self.rows or max(rows, 1)
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class MiniBatches(Sequence):
    """`len()` mini-batches; item i is {"query", "target"[, "negatives"]: model inputs}, built on read.

    builder: `encoder.InputBuilder` (inputs and decoded images -> model-ready tensors).
    rows: every row of the contrastive batch, in the order their embeddings concatenate to.
    bounds: (start, stop) into `rows` of each mini-batch, contiguous and in order.
    place: applied to each built side's inputs, e.g. the trainer's `_prepare_input` (to the device, in
        its dtype); None leaves them on the CPU.
    """

    def __init__(
        self,
        builder,
        rows: Sequence[Row],
        bounds: Sequence[tuple[int, int]],
        place: Callable[[Mapping], Mapping] | None = None,
    ):
        self.builder, self.rows, self.bounds, self.place = builder, list(rows), list(bounds), place

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, index: int) -> dict[str, Mapping]:
        if not isinstance(index, int):
            raise TypeError(f"mini-batches are read one at a time, by an int index; got {type(index).__name__}")
        start, stop = self.bounds[index]
        part = self.rows[start:stop]
        mini_batch = {"query": self.build([row[0] for row in part]), "target": self.build([row[1] for row in part])}
        negatives = [side for row in part for side in row[2:]]
        if negatives:
            mini_batch["negatives"] = self.build(negatives)
        return mini_batch

    def __iter__(self) -> Iterator[dict[str, Mapping]]:
        for index in range(len(self)):
            yield self[index]

    def bound(self, builder=None, place: Callable[[Mapping], Mapping] | None = None) -> MiniBatches:
        """The same mini-batches with this builder and placement (None keeps the current one)."""
        return type(self)(builder or self.builder, self.rows, self.bounds, place or self.place)

    def to(self, device, non_blocking: bool = False) -> MiniBatches:
        """The same mini-batches, built onto `device`: what accelerate's `send_to_device` calls on a
        batch (nothing is moved until a mini-batch is read)."""
        return self.bound(place=functools.partial(_to_device, device=torch.device(device), non_blocking=non_blocking))

    def __getstate__(self) -> dict:
        # Sent from a data-loader worker once per batch: the rows and bounds only (see the module docstring).
        return {"rows": self.rows, "bounds": self.bounds}

    def __setstate__(self, state: dict) -> None:
        self.builder, self.place, self.rows, self.bounds = None, None, state["rows"], state["bounds"]

    def build(self, sides: Sequence[Input]) -> Mapping:
        """The model inputs of `sides` (one side of a mini-batch), built and placed as every mini-batch's."""
        if self.builder is None:
            raise RuntimeError(
                "these mini-batches came from another process without their builder: bind one with "
                "mini_batches.bound(encoder.builder) (the trainer binds its collator's)"
            )
        images = [None if side.image is None else load_image(side.image) for side in sides]
        inputs = self.builder(sides, images)
        return inputs if self.place is None else self.place(inputs)


def _to_device(inputs: Mapping, device: torch.device, non_blocking: bool) -> Mapping:
    moved = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return type(inputs)(moved)


# ------------------------------------------------------------------------------- token-budget packing


def padded_tokens(lengths: Sequence[Sequence[int]]) -> int:
    """The tokens a forward processes for these rows (each a tuple of its sides' token counts: query,
    positive, negatives...): per side, the number of inputs times the longest of them, padding included."""
    queries, targets = [row[0] for row in lengths], [row[1] for row in lengths]
    negatives = [count for row in lengths for count in row[2:]]
    return sum(len(group) * max(group) for group in (queries, targets, negatives) if group)


def pack_by_tokens(
    lengths: Sequence[Sequence[int]], budget: int, max_rows: int = 0
) -> tuple[list[tuple[int, int]], list[int]]:
    """(bounds, oversized): consecutive rows packed greedily, in order, into mini-batches of at most
    `budget` padded tokens (`padded_tokens`) and, with max_rows > 0, at most max_rows rows. A row over
    the budget on its own gets a mini-batch of its own; `oversized` lists those rows. The order is kept,
    so the embeddings concatenate as the rows come (the content ids and teacher rows stay aligned)."""
    bounds, oversized, start = [], [], 0
    for index, row in enumerate(lengths):
        if padded_tokens([row]) > budget:
            if index > start:
                bounds.append((start, index))
            bounds.append((index, index + 1))
            oversized.append(index)
            start = index + 1
            continue
        full = max_rows and index - start == max_rows
        if index > start and (full or padded_tokens(lengths[start : index + 1]) > budget):
            bounds.append((start, index))
            start = index
    if start < len(lengths):
        bounds.append((start, len(lengths)))
    return bounds, oversized

"""FSDP ranks whose mini-batches run different modules, aligned by passes weighted zero.

Under FSDP2 each unit's parameters are all-gathered when it runs (forward and backward) and its gradient
is reduce-scattered, collectives every rank must join in the same order. The encoder runs the backbone
once per side of a mini-batch (query, target, hard negatives), the vision tower for a side with images, and
GradCache runs every mini-batch twice; the cross-device loss gathers the negatives of every rank. So in one
step the ranks must agree, mini-batch by mini-batch, on the sides each runs, on which of them hold images,
and on the number of mini-batches; otherwise the collectives fall out of step (gloo aborts on a size
mismatch; a backend that does not check sizes can hang, or mix up same-sized layers).

Before each step the ranks compare what their mini-batches run (one small all-gather), and each rank makes
up what it lacks with passes whose output is weighted zero:
- a side with no image here and an image on another rank: the vision tower over one blank image before
  the side's backbone pass (`Encoder.forward`'s blank_image_sides);
- no hard negatives here and some on another rank: a negatives side of one placeholder row after the
  target's (`Encoder.forward`'s placeholder_sides), whose embedding comes back with no rows, so the loss
  sees the same [0, D] negatives it would take for "none" (every rank then gathers negatives);
- fewer mini-batches than another rank: whole placeholder mini-batches at the end (a placeholder row per
  side the other ranks run there): no rows, so GradCache caches nothing for them and their surrogate is 0.
Each pass still runs forward and backward through the modules it reaches, so every unit is all-gathered
and reduce-scattered on every rank; every embedding, the loss and every gradient are those without it.

Under DDP only the cross-device loss's gathers depend on what a rank's batch holds (its hard negatives), so
the same all-gather decides just that (`hard_negatives_on_other_ranks_only`): a rank without hard negatives
gives its loss negatives of no rows, cut from its target embeddings, and no pass is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .data import Input

SIDES = ("query", "target", "negatives")
IMAGE_AT = {"query": 0, "target": 1, "negatives": 3}  # where a side's image is in a `modules_run` tuple
PLACEHOLDER = Input("placeholder")  # one text-only row; its embedding is never used


@dataclass(frozen=True)
class Alignment:
    """What one mini-batch of this rank adds to run what every rank runs: sides to run as one placeholder
    row (embedding with no rows), sides preceded by a blank image through the vision tower. `real`: whether
    the mini-batch is one of this rank's (False: a placeholder mini-batch, every side a placeholder)."""

    placeholder_sides: tuple[str, ...] = ()
    blank_image_sides: tuple[str, ...] = ()
    real: bool = True


def modules_run(mini_batches) -> list[tuple[bool, bool, bool, bool]]:
    """Per mini-batch, what decides which of the backbone's modules it runs: an image on the query side,
    on the target side, hard negatives, an image among them (each side is one pass of the backbone)."""
    kinds = []
    for start, stop in mini_batches.bounds:
        part = mini_batches.rows[start:stop]
        negatives = [item for row in part for item in row[2:]]
        kinds.append((any(row[0].image is not None for row in part), any(row[1].image is not None for row in part),
                      bool(negatives), any(item.image is not None for item in negatives)))  # fmt: skip
    return kinds


def align(kinds: Sequence[tuple[bool, ...]], every_rank: Sequence[Sequence[tuple[bool, ...]]]) -> list[Alignment]:
    """This rank's alignment, one per mini-batch of the rank with the most (`kinds`: this rank's
    `modules_run`; `every_rank`: every rank's, this one's included)."""
    alignments = []
    for index in range(max(len(rank_kinds) for rank_kinds in every_rank)):
        there = [rank_kinds[index] for rank_kinds in every_rank if index < len(rank_kinds)]
        image = {side: any(kind[at] for kind in there) for side, at in IMAGE_AT.items()}
        negatives = any(kind[2] for kind in there)
        if index < len(kinds):
            mine = kinds[index]
            placeholder = ("negatives",) if negatives and not mine[2] else ()
            blank = tuple(side for side, at in IMAGE_AT.items() if image[side] and not mine[at])
            alignments.append(Alignment(placeholder, blank))
        else:
            sides = SIDES if negatives else SIDES[:2]
            alignments.append(Alignment(sides, tuple(side for side in sides if image[side]), real=False))
    return alignments


def every_rank_modules_run(mini_batches) -> list[list[tuple[bool, bool, bool, bool]]]:
    """Every rank's `modules_run`, in rank order: the step's one small all-gather (a collective: every rank
    calls it)."""
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, modules_run(mini_batches))
    return every_rank


def hard_negatives_on_other_ranks_only(mini_batches) -> bool:
    """Under DDP: whether some rank's step holds hard negatives and this rank's none (a collective: every rank
    calls it). Then this rank's cross-device loss must still gather the others' negatives, so the trainer gives
    it negatives of no rows. DDP needs nothing else aligned: its forward and backward run no collective that
    depends on the modules or the number of mini-batches a rank runs (the module buffers are broadcast at the
    first forward of a step, the gradients all-reduced once, in the last mini-batch's backward; a parameter a
    rank leaves unused is what `find_unused_parameters` is for), so neither blank images nor placeholder
    passes or mini-batches are needed: only the loss's gathers must match."""
    every_rank = every_rank_modules_run(mini_batches)
    with_negatives = [any(kind[2] for kind in kinds) for kinds in every_rank]
    return any(with_negatives) and not with_negatives[torch.distributed.get_rank()]


def rank_alignment(mini_batches, takes_blank_image: bool) -> list[Alignment]:
    """Every rank's `modules_run` (a collective: every rank calls it), and this rank's `align`ment. A
    difference that cannot be aligned (an image side on some ranks only, with a backbone whose vision tower
    takes no blank image) stops every rank with an error that says what each rank's mini-batches run."""
    every_rank = every_rank_modules_run(mini_batches)
    kinds = every_rank[torch.distributed.get_rank()]
    alignments = align(kinds, every_rank)
    # Every rank reaches the same answer: a blank image is asked for on some rank iff image sides differ.
    needs_blank = any(any(a.blank_image_sides for a in align(k, every_rank)) for k in every_rank)
    if takes_blank_image or not needs_blank:
        return alignments
    names = ("query image", "target image", "hard negatives", "negative image")

    def describe(rank_kinds):
        return "; ".join(", ".join(n for n, on in zip(names, kind, strict=True) if on) or "text only"
                         for kind in rank_kinds)  # fmt: skip

    ranks = "\n".join(f"  rank {rank}: {len(k)} mini-batch(es): {describe(k)}" for rank, k in enumerate(every_rank))
    raise ValueError(
        "under FSDP every rank must run the same modules in each mini-batch (a layer's parameters are all-gathered "
        f"when it runs, a collective every rank joins), but this step's ranks differ:\n{ranks}\nA side with an "
        "image on one rank and none on another is aligned by a blank image through the vision tower, but this "
        "backbone's vision tower takes none (no get_image_features): give every row the same sides (e.g. one task "
        "per batch, --homogeneous_batches), or train with DDP"
    )


class AlignedMiniBatches(Sequence):
    """This rank's mini-batches, then its placeholder mini-batches, each read as (mini-batch, alignment) with
    the alignment's placeholder sides built in (one placeholder row each, built and placed as the mini-batches'
    own inputs); read by index, as `grad_cache_step` reads mini-batches."""

    def __init__(self, mini_batches, alignments: Sequence[Alignment]):
        self.mini_batches, self.alignments = mini_batches, list(alignments)

    def __len__(self) -> int:
        return len(self.alignments)

    def __getitem__(self, index: int) -> tuple[Mapping[str, Mapping], Alignment]:
        alignment = self.alignments[index]
        mini_batch = dict(self.mini_batches[index]) if alignment.real else {}
        for side in alignment.placeholder_sides:
            mini_batch[side] = self.mini_batches.build([PLACEHOLDER])
        return mini_batch, alignment

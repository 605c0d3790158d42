"""A recipe's objective: the core's fused ops applied to a batch of (detached or live) embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import torch
import torch.distributed as dist

import mmfast
from mmfast import ContrastiveLossOptions, DistillationLossOptions

from .grad_cache import Embeddings
from .run_config import RunConfig


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Objective:
    """Calls `mmfast.contrastive_loss` or `mmfast.distillation_loss` with a run's resolved options.

    options: the loss options exactly as the loss is called with them (backend and cross_device
        included): a run's `RunConfig.loss` (`Objective.of`), where cross_device is on only when
        more than one process trains.
    mask_duplicates: pass the batch's content ids to the contrastive loss, which then leaves the
        copies of each positive out of its softmax (`--mask_duplicate_candidates`). Distillation
        takes none: a copy has the same teacher and student scores, so it cannot pull the student
        away from its teacher (mmfast.distillation_loss's docstring).
    """

    def __init__(self, options: ContrastiveLossOptions | DistillationLossOptions, *, mask_duplicates: bool = True):
        if not isinstance(options, (ContrastiveLossOptions, DistillationLossOptions)):
            raise TypeError(f"options must be ContrastiveLossOptions or DistillationLossOptions, got {options!r}")
        self.options = options
        self.mask_duplicates = mask_duplicates and not self.is_distillation
        # The loss's keyword arguments, taken once: the options are frozen.
        self._arguments = {f.name: getattr(options, f.name) for f in fields(options)}

    @classmethod
    def of(cls, run: RunConfig) -> Objective:
        """The objective of a run: its resolved loss options, its duplicate masking."""
        return cls(run.loss, mask_duplicates=run.mask_duplicates)

    @property
    def is_distillation(self) -> bool:
        return isinstance(self.options, DistillationLossOptions)

    def _ids(self, ids: Mapping[str, torch.Tensor] | None) -> dict:
        """The loss's id arguments from the collator's ids (query ids for the symmetric half only)."""
        if ids is None or not self.mask_duplicates:
            return {}
        return {"candidate_ids": ids["candidate"], **({"query_ids": ids["query"]} if self.options.symmetric else {})}

    def masked_candidates(self, ids: Mapping[str, torch.Tensor] | None, batch_size: int) -> int:
        """How many candidates the loss leaves out for this process's rows (0 when nothing is masked).
        A collective across devices, like the loss: every rank calls it."""
        arguments = self._ids(ids)
        if not arguments:
            return 0
        counts = mmfast.masked_candidate_counts(batch_size, arguments["candidate_ids"], arguments.get("query_ids"),
                                                cross_device=self.options.cross_device)  # fmt: skip
        return int(counts.sum())

    def __call__(self, embeddings: Embeddings, teacher: Embeddings | None = None, ids=None) -> torch.Tensor:
        """The loss of a batch; `ids` are the collator's content ids (used when mask_duplicates)."""
        if self.is_distillation:
            if teacher is None:
                raise ValueError("a distillation objective needs the teacher's embeddings of the batch")
            return mmfast.distillation_loss(
                embeddings["query"], embeddings["target"], teacher["query"], teacher["target"], **self._arguments
            )
        return mmfast.contrastive_loss(
            embeddings["query"], embeddings["target"], embeddings.get("negatives"), **self._arguments, **self._ids(ids)
        )

"""A recipe's objective: the core's fused ops applied to a batch of (detached or live) embeddings."""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
import torch.distributed as dist

import mmfast
from mmfast import ContrastiveLossOptions, DistillationLossOptions

from .grad_cache import Embeddings


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Objective:
    """Calls `mmfast.contrastive_loss` or `mmfast.distillation_loss` with a recipe's options.

    backend: overrides the options' backend (the trainer's `--loss_backend`).
    Cross-device gathering is asked for only when more than one process trains, so a single
    process runs without the core's "no process group" warning.
    """

    def __init__(self, options: ContrastiveLossOptions | DistillationLossOptions, *, backend: str | None = None):
        if not isinstance(options, (ContrastiveLossOptions, DistillationLossOptions)):
            raise TypeError(f"options must be ContrastiveLossOptions or DistillationLossOptions, got {options!r}")
        if backend is not None:
            options = replace(options, backend=backend)
        self.options = options

    @property
    def is_distillation(self) -> bool:
        return isinstance(self.options, DistillationLossOptions)

    def _options(self) -> dict:
        options = asdict(self.options)
        options["cross_device"] = options["cross_device"] and distributed_world_size() > 1
        return options

    def __call__(self, embeddings: Embeddings, teacher: Embeddings | None = None) -> torch.Tensor:
        if self.is_distillation:
            if teacher is None:
                raise ValueError("a distillation objective needs the teacher's embeddings of the batch")
            return mmfast.distillation_loss(
                embeddings["query"], embeddings["target"], teacher["query"], teacher["target"], **self._options()
            )
        return mmfast.contrastive_loss(
            embeddings["query"], embeddings["target"], embeddings.get("negatives"), **self._options()
        )

"""A recipe's objective: the core's fused ops applied to a batch of (detached or live) embeddings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields

import torch
import torch.distributed as dist

import mmfast
from mmfast import DistillationLossOptions, LateInteractionLossOptions, SigmoidLossOptions

from .grad_cache import Embeddings
from .run_config import LossOptions, RunConfig


def distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Objective:
    """Calls `mmfast.contrastive_loss`, `mmfast.sigmoid_loss`, `mmfast.late_interaction_loss` or
    `mmfast.distillation_loss` with a run's resolved options.

    options: the loss options exactly as the loss is called with them (backend and cross_device
        included): a run's `RunConfig.loss` (`Objective.of`), where cross_device is on only when
        more than one process trains.
    mask_duplicates: pass the batch's content ids to the contrastive loss, which then leaves the
        copies of each positive out of its softmax (`--mask_duplicate_candidates`). Distillation
        takes none: a copy has the same teacher and student scores, so it cannot pull the student
        away from its teacher (mmfast.distillation_loss's docstring).
    """

    def __init__(self, options: LossOptions, *, mask_duplicates: bool = True):
        if not isinstance(options, LossOptions.__args__):
            raise TypeError("options must be ContrastiveLossOptions, DistillationLossOptions, "
                            f"LateInteractionLossOptions or SigmoidLossOptions, got {options!r}")  # fmt: skip
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
        symmetric = getattr(self.options, "symmetric", False)  # late interaction has no symmetric half
        return {"candidate_ids": ids["candidate"], **({"query_ids": ids["query"]} if symmetric else {})}

    def masked_candidates(self, ids: Mapping[str, torch.Tensor] | None, batch_size: int) -> int:
        """How many candidates the loss leaves out for this process's rows (0 when nothing is masked).
        A collective across devices, like the loss: every rank calls it."""
        arguments = self._ids(ids)
        if not arguments:
            return 0
        counts = mmfast.masked_candidate_counts(batch_size, arguments["candidate_ids"], arguments.get("query_ids"),
                                                cross_device=self.options.cross_device)  # fmt: skip
        return int(counts.sum())

    @property
    def is_sigmoid(self) -> bool:
        """SigLIP's loss: its logit scale and bias are the model's parameters (`Encoder.sigmoid_parameters`)."""
        return isinstance(self.options, SigmoidLossOptions)

    def __call__(
        self, embeddings: Embeddings, teacher: Embeddings | None = None, ids=None,
        sigmoid_parameters: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The loss of a batch; `ids` are the collator's content ids (used when mask_duplicates);
        sigmoid_parameters: the model's learnable logit scale and bias, for the sigmoid loss."""
        if self.is_sigmoid:
            if sigmoid_parameters is None:
                raise ValueError("the sigmoid loss needs the model's logit scale and bias (Encoder.sigmoid_parameters)")
            scale, bias = sigmoid_parameters()
            arguments = {**self._arguments, "logit_scale": scale, "logit_bias": bias, **self._ids(ids)}
            return mmfast.sigmoid_loss(embeddings["query"], embeddings["target"], embeddings.get("negatives"),
                                       **arguments)  # fmt: skip
        if self.is_distillation:
            if teacher is None:
                raise ValueError("a distillation objective needs the teacher's embeddings of the batch")
            return mmfast.distillation_loss(
                embeddings["query"], embeddings["target"], teacher["query"], teacher["target"], **self._arguments
            )
        if isinstance(self.options, LateInteractionLossOptions):
            return self._late_interaction(embeddings, ids)
        return mmfast.contrastive_loss(
            embeddings["query"], embeddings["target"], embeddings.get("negatives"), **self._arguments, **self._ids(ids)
        )

    def _late_interaction(self, embeddings: Embeddings, ids) -> torch.Tensor:
        """Multi-vector embeddings [n, L, dim], zero at padding tokens (Encoder.embed_tokens)."""
        negatives = embeddings.get("negatives")
        options = self._arguments
        if options["cross_device"]:  # the loss gathers documents: every rank's token count must match
            embeddings = {**embeddings, "target": _pad_tokens_across_ranks(embeddings["target"])}
            negatives = None if negatives is None else _pad_tokens_across_ranks(negatives)
        masks = {f"{name}_mask": None if e is None else e.ne(0).any(dim=-1)
                 for name, e in (("query", embeddings["query"]), ("document", embeddings["target"]),
                                 ("negative", negatives))}  # fmt: skip
        return mmfast.late_interaction_loss(embeddings["query"], embeddings["target"], negatives, **masks,
                                            **options, **self._ids(ids))  # fmt: skip


def _pad_tokens_across_ranks(tokens: torch.Tensor) -> torch.Tensor:
    """[n, L, dim] zero-padded to the longest L of any rank (zero tokens are padding to the loss)."""
    longest = torch.tensor([tokens.shape[1]], device=tokens.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return torch.nn.functional.pad(tokens, (0, 0, 0, int(longest) - tokens.shape[1]))

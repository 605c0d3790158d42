"""The naive sigmoid (SigLIP) loss: materialises the B×N logit matrix and lets autograd differentiate it.

It is the test oracle (run in float64) and the readable statement of the math:

    s_ij = query_i · candidate_j,  candidates = [targets; negatives]
    logit_ij = logit_scale · s_ij + logit_bias
    z_ij = +1 if candidate j is a positive of row i, else -1
    loss_i = -Σ_j log σ(z_ij · logit_ij)

Candidate j is a positive of row i when it is row i's target (j = offset + i) or, with candidate_ids,
when its id equals that target's id (a copy of the positive is a positive, not a negative).
"""

from __future__ import annotations

import torch

from mmfast.distributed import Gathered


def sigmoid_loss_reference(
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    logit_scale: float | torch.Tensor = 10.0,
    logit_bias: float | torch.Tensor = -10.0,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    candidate_ids: torch.Tensor | None = None,
    gathered: Gathered | None = None,
) -> torch.Tensor:
    """Same signature and semantics as `mmfast.sigmoid_loss`, computed naively. `gathered`: the
    cross-device candidates (all ranks' targets and negatives, this rank's offset); candidate_ids are
    then the gathered ids, in the same order."""
    if gathered is None:
        flat = None if negatives is None else negatives.reshape(-1, target.shape[-1])
        gathered = Gathered(target, flat, None, 0)
    all_targets, all_negatives, _, offset = gathered
    candidates = all_targets if all_negatives is None else torch.cat([all_targets, all_negatives])
    logits = logit_scale * (query @ candidates.T) + logit_bias
    rows = torch.arange(query.shape[0], device=query.device)
    positive = torch.zeros(logits.shape, dtype=torch.bool, device=query.device)
    positive[rows, rows + offset] = True
    if candidate_ids is not None:
        positive |= candidate_ids[None, :] == candidate_ids[rows + offset][:, None]
    labels = positive.to(logits.dtype) * 2 - 1
    losses = -torch.nn.functional.logsigmoid(labels * logits).sum(dim=1)
    if weight is not None:
        losses = losses * weight
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses

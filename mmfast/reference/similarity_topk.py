"""Naive similarity search: the whole [Q, G] score matrix in float64, a stable sort, a count.

The test oracle of mmfast.similarity_topk (the benchmark's baseline is plain torch.topk instead)."""

from __future__ import annotations

import torch


def similarity_topk_reference(query, gallery, k: int, target=None):
    """(values [Q, k] float64, indices [Q, k] int64, target_rank [Q] int64 or None).

    Best first, ties to the lower gallery index (a stable descending sort); k is clamped to G.
    target: [Q] indices or [Q, P] index sets padded with -1; the rank is 1 + the number of gallery
    items scoring strictly higher than the best-scoring member of the set."""
    scores = query.detach().double() @ gallery.detach().double().T
    k = min(k, scores.shape[1])
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    if target is None:
        return values[:, :k], indices[:, :k], None
    sets = target[:, None] if target.dim() == 1 else target
    member_scores = scores.gather(1, sets.clamp_min(0)).masked_fill(sets < 0, -torch.inf)
    best = member_scores.amax(dim=1, keepdim=True)
    return values[:, :k], indices[:, :k], 1 + (scores > best).sum(dim=1)

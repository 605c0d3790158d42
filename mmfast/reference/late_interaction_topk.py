"""Naive MaxSim search: every query token × document token score in float64, a stable sort, a count.

The test oracle of mmfast.late_interaction_topk (it holds Q × G × L_q × L_d scores)."""

from __future__ import annotations

import torch


def late_interaction_topk_reference(query, corpus, k: int, *, query_mask=None, corpus_mask=None, target=None,
                                    normalize_scores: bool = False):  # fmt: skip
    """(values [Q, k] float64, indices [Q, k] int64, target_rank [Q] int64 or None).

    Score(q, g) = Σ over real t of max over real s of ⟨query[q, t], corpus[g, s]⟩, divided by the
    query's number of real tokens with normalize_scores. Best first, ties to the lower corpus index
    (a stable descending sort); k is clamped to G. target: [Q] indices or [Q, P] index sets padded
    with -1; the rank is 1 + the number of documents scoring strictly higher than the best member."""
    query, corpus = query.detach().double(), corpus.detach().double()
    if query_mask is None:
        query_mask = torch.ones(query.shape[:2], dtype=torch.bool)
    if corpus_mask is None:
        corpus_mask = torch.ones(corpus.shape[:2], dtype=torch.bool)
    query_mask, corpus_mask = query_mask.bool(), corpus_mask.bool()
    tokens = torch.einsum("qtd,gsd->qgts", query, corpus)
    tokens = tokens.masked_fill(~corpus_mask[None, :, None, :], float("-inf"))
    scores = (tokens.amax(dim=3) * query_mask[:, None, :].double()).sum(dim=2)
    if normalize_scores:
        scores = scores / query_mask.sum(dim=1, keepdim=True).double()
    k = min(k, scores.shape[1])
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    if target is None:
        return values[:, :k], indices[:, :k], None
    sets = target[:, None] if target.dim() == 1 else target
    member_scores = scores.gather(1, sets.clamp_min(0)).masked_fill(sets < 0, -torch.inf)
    best = member_scores.amax(dim=1, keepdim=True)
    return values[:, :k], indices[:, :k], 1 + (scores > best).sum(dim=1)

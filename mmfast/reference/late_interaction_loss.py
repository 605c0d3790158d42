"""The naive late-interaction (MaxSim) loss: materialises every query token × document token score, as
colpali-engine's einsum does, and lets autograd differentiate it. The test oracle (run in float64).

    token scores  t_itjs = ⟨q_it, d_js⟩            every query token t of query i, document token s of j
    MaxSim        m_itj  = max over real s of t_itjs     (the gradient goes to the first maximal s)
    score         S_ij   = Σ over real t of m_itj, divided by the number of real t with normalize_scores
    candidates    the documents (document i is query i's positive), then the negatives
    duplicates    with candidate_ids, a candidate j ≠ p with the positive p's id is no negative of row i
    "infonce"     loss_i = logsumexp_j(S_ij / τ) − S_ip / τ          over the positive and the negatives
    "pairwise"    loss_i = softplus((max over negatives j of S_ij − S_ip) / τ)   (0 without a negative)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def late_interaction_scores_reference(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    pieces: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """[B, N] MaxSim scores of query [B, L_q, D] (mask [B, L_q]) against every (documents [n, L, D],
    mask [n, L]) piece, in order. Holds B × L_q × n × L scores per piece."""
    columns = []
    for documents, mask in pieces:
        tokens = torch.einsum("bqd,nsd->bqns", query, documents)
        tokens = tokens.masked_fill(~mask.bool()[None, None], float("-inf"))
        best = tokens.max(dim=3).values  # max(dim) sends the gradient to the first maximal token only
        columns.append((best * query_mask.to(best.dtype)[:, :, None]).sum(dim=1))
    return torch.cat(columns, dim=1)


def late_interaction_loss_reference(
    query: torch.Tensor,
    document: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
    document_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    loss: str = "infonce",
    temperature: float | torch.Tensor = 0.02,
    normalize_scores: bool = False,
    reduction: str = "mean",
    candidate_ids: torch.Tensor | None = None,
    positive_offset: int = 0,
) -> torch.Tensor:
    """The loss of B queries against `document` [N_d, L_d, D] (query i's positive is document
    positive_offset + i) and `negatives` [M, L_n, D]; masks default to every token real."""

    def all_real(x):
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    query_mask = all_real(query) if query_mask is None else query_mask.bool()
    pieces = [(document, all_real(document) if document_mask is None else document_mask)]
    if negatives is not None:
        pieces.append((negatives, all_real(negatives) if negative_mask is None else negative_mask))
    scores = late_interaction_scores_reference(query, query_mask, pieces)
    if normalize_scores:
        scores = scores / query_mask.sum(dim=1, keepdim=True).to(scores.dtype)
    rows = torch.arange(query.shape[0], device=query.device)
    positive = rows + positive_offset
    negative = torch.ones_like(scores, dtype=torch.bool)
    negative[rows, positive] = False
    if candidate_ids is not None:
        negative &= candidate_ids[None, :] != candidate_ids[positive][:, None]
    positive_score = scores[rows, positive]
    if loss == "infonce":
        logits = (scores / temperature).masked_fill(~negative, float("-inf"))
        logits[rows, positive] = positive_score / temperature
        per_row = torch.logsumexp(logits, dim=1) - positive_score / temperature
    else:
        hardest = scores.masked_fill(~negative, float("-inf")).max(dim=1).values
        has_negative = negative.any(dim=1)
        margin = torch.where(has_negative, hardest, positive_score) - positive_score
        per_row = torch.where(has_negative, F.softplus(margin / temperature), torch.zeros_like(margin))
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row

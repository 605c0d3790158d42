"""The naive contrastive loss: materialises the B×N score matrix and lets autograd differentiate it.

It is the test oracle (run in float64) and the readable statement of the math. The benchmarks time it
as their "reference" provider; their "naive" baseline is the F.cross_entropy code users write.

    s_ij = query_i · candidate_j,  candidates = [targets; negatives]
    positive logit   s_ii / τ
    negative logit   s_ij / τ + hardness · stopgrad(s_ij)             (LLaVE)
    a negative with  s_ij > s_ii + margin  leaves the softmax            (UniME false-negative filter)
    of the rest, only the topk highest s_ij stay (ties: lower index)   (UniME hard negatives)
    loss_i = logsumexp(kept logits) - s_ii / τ
    symmetric: the mean of that and the same loss for target_i over the B queries.
A tensor τ is differentiated by autograd like any input (only the s/τ terms depend on it).

Duplicate ids: with candidate_ids, a candidate j whose id equals the positive's (candidate_ids[j] ==
candidate_ids[i], j ≠ i) is no negative of row i at all: it leaves the softmax before the margin filter
and the top-k selection (so it takes no top-k slot). query_ids do the same for the symmetric half.
A row left with no negative has loss 0 and no gradient.
"""

from __future__ import annotations

import torch

from mmfast.distributed import Gathered


def directional_loss_reference(
    x: torch.Tensor,
    candidates: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    hardness: float = 0.0,
    false_negative_margin: float | None = None,
    topk: int | None = None,
    positive_offset: int = 0,
    candidate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss of rows `x` [B, D] against `candidates` [N, D]; row i's positive is candidate
    positive_offset + i (nonzero when the candidates were gathered from several ranks).
    `candidate_ids` [N]: candidates sharing the positive's id are left out."""
    rows = torch.arange(x.shape[0], device=x.device)
    scores = x @ candidates.T
    eye = torch.zeros_like(scores, dtype=torch.bool)
    eye[rows, rows + positive_offset] = True
    pos = scores[rows, rows + positive_offset]
    detached = scores.detach()
    keep = ~eye
    if candidate_ids is not None:
        keep &= candidate_ids[None, :] != candidate_ids[rows + positive_offset][:, None]
    if false_negative_margin is not None:
        keep &= ~(detached > pos.detach()[:, None] + false_negative_margin)
    if topk is not None:
        ranked = detached.masked_fill(~keep, float("-inf"))
        # A stable descending sort puts tied scores in index order: ties go to the lower index.
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :topk]
        chosen = torch.zeros_like(keep).scatter_(1, order, True)
        keep &= chosen
    negative_logits = scores / temperature + hardness * detached
    if scores.dtype != torch.float64:
        # In a lower dtype the oracle is PyTorch's own computation, the form users write (what
        # F.cross_entropy does): the baseline of the tests' "at most 2x PyTorch's error".
        logits = torch.where(eye, scores / temperature, negative_logits.masked_fill(~keep, float("-inf")))
        return torch.logsumexp(logits, dim=1) - pos / temperature
    # In float64 it is the truth, so every logit is taken minus the positive's, which is then exactly 0
    # (the positive's gradient flows through each Δ_j): loss_i = log(1 + Σ_j exp Δ_j) keeps full
    # relative precision in a confident row. logsumexp(logits) - s_ii/τ rounds at the logits' scale
    # (~1/τ), and its gradient forms p_ii - 1 by cancellation: an error of about ε/τ², which exceeded
    # the C++ kernel's own in float64 (≈1,700 units of ε at τ = 0.02 on a row with loss 2e-4).
    shifted = (negative_logits - (pos / temperature)[:, None]).masked_fill(~keep, float("-inf"))
    top = shifted.detach().max(dim=1).values.clamp(min=0.0)
    rest = torch.exp(shifted - top[:, None]).sum(dim=1)  # Σ_j exp(Δ_j - top); the positive's 0 left out
    return top + torch.log1p(torch.expm1(-top) + rest)  # top + log(exp(-top) + rest), exact as rest → 0


def contrastive_loss_reference(
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 0.02,
    symmetric: bool = False,
    hardness: float = 0.0,
    false_negative_margin: float | None = None,
    topk: int | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    candidate_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    gathered: Gathered | None = None,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Same signature and semantics as `mmfast.contrastive_loss`, computed naively.

    `gathered` (mmfast.distributed.Gathered: all ranks' targets, negatives or None, queries or None,
    and this rank's offset): the cross-device case, where the candidates are the gathered ones (and
    candidate_ids / query_ids are then the gathered ids, in the same order).

    `matryoshka_dims`: the m losses computed separately, each on the prefixes x[..., :d] of every
    embedding, L2-normalised (F.normalize); the total is their sum weighted by `matryoshka_weights`
    (default all 1), and reduction "none" gives [m, B] (not multiplied by those weights)."""
    if matryoshka_dims is not None:
        weights = matryoshka_weights or (1.0,) * len(matryoshka_dims)

        def prefix(x: torch.Tensor | None, d: int) -> torch.Tensor | None:
            return None if x is None else torch.nn.functional.normalize(x[..., :d], dim=-1)

        losses = []
        for d in matryoshka_dims:
            cut = None if gathered is None else Gathered(*(prefix(g, d) for g in gathered[:3]), gathered[3])
            losses.append(contrastive_loss_reference(
                prefix(query, d), prefix(target, d), prefix(negatives, d), temperature=temperature,
                symmetric=symmetric, hardness=hardness, false_negative_margin=false_negative_margin, topk=topk,
                weight=weight, reduction=reduction, candidate_ids=candidate_ids, query_ids=query_ids, gathered=cut,
            ))  # fmt: skip
        if reduction == "none":
            return torch.stack(losses)
        return sum(w * loss for w, loss in zip(weights, losses, strict=True))
    options = dict(temperature=temperature, hardness=hardness, false_negative_margin=false_negative_margin, topk=topk)
    if gathered is None:
        flat = None if negatives is None else negatives.reshape(-1, target.shape[-1])
        gathered = Gathered(target, flat, query, 0)
    all_targets, all_negatives, all_queries, offset = gathered
    candidates = all_targets if all_negatives is None else torch.cat([all_targets, all_negatives])
    rows = directional_loss_reference(query, candidates, positive_offset=offset, candidate_ids=candidate_ids, **options)
    if symmetric:
        reverse = directional_loss_reference(target, all_queries, positive_offset=offset, candidate_ids=query_ids,
                                             **options)  # fmt: skip
        rows = 0.5 * (rows + reverse)
    if weight is not None:
        rows = rows * weight
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows

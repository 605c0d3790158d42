"""Ranking metrics: MMEB Precision@1, Recall@K in both directions, median and mean rank.

One rank rule everywhere: a target's rank is 1 + the number of candidates scoring strictly higher than
it (with several targets, than the best of them). Ties therefore go to the target. This is MMEB's own
rule: VLM2Vec takes the argmax over a row's candidates, argmax returns the first maximal index, and
the ground truth sits at index 0, so a row whose ground truth ties another candidate is correct.
Likewise R@K counts a target tied with the K-th item as found, and never depends on how the search
orders tied items.

Rates (P@1, R@K) are percentages. Ranks over a gallery go through `mmfast.similarity_topk`, so memory
does not grow with queries × gallery.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import mmfast

RECALL_KS = (1, 5, 10)


def first_candidate_ranks(scores: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[R] rank of each row's candidate 0 (the ground truth) among its candidates: 1 + the number of
    candidates scoring strictly higher. `scores` [R, C]; `lengths` [R] counts each row's real
    candidates (the rest of the row is padding and ignored)."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [rows, candidates] with at least one candidate, got {tuple(scores.shape)}")
    higher = scores > scores[:, :1]
    if lengths is not None:
        if lengths.shape != scores.shape[:1]:
            raise ValueError(f"lengths must be [{scores.shape[0]}], got {tuple(lengths.shape)}")
        if (lengths < 1).any() or (lengths > scores.shape[1]).any():
            raise ValueError(f"lengths must lie in 1..{scores.shape[1]}")
        higher &= torch.arange(scores.shape[1]) < lengths[:, None]
    return 1 + higher.sum(dim=1)


def precision_at_1(scores: torch.Tensor, lengths: torch.Tensor | None = None) -> dict:
    """MMEB Precision@1: the share (in %) of rows whose argmax is candidate 0; a tie with candidate 0
    counts as correct (see the module note). Returns {"acc", "num_correct", "num_pred"}."""
    correct = int((first_candidate_ranks(scores, lengths) == 1).sum())
    return accuracy(correct, scores.shape[0])


def accuracy(num_correct: int, num_pred: int) -> dict:
    """{"acc" (%), "num_correct", "num_pred"}; acc is 0 when there is nothing to score."""
    return {
        "acc": 100.0 * num_correct / num_pred if num_pred else 0.0,
        "num_correct": num_correct,
        "num_pred": num_pred,
    }


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = RECALL_KS, *, answered: torch.Tensor | None = None) -> dict:
    """{k: share (in %) of ranks <= k}; a query with `answered` False is a miss at every k."""
    if ranks.numel() == 0:
        return {k: 0.0 for k in ks}
    answered = torch.ones_like(ranks, dtype=torch.bool) if answered is None else answered.bool()
    return {k: 100.0 * ((ranks <= k) & answered).double().mean().item() for k in ks}


def median_rank(ranks: torch.Tensor) -> float:
    """MdR; with an even count the mean of the two middle ranks (numpy's median, as LLaVE reports)."""
    if ranks.numel() == 0:
        return 0.0
    ordered = ranks.double().sort().values
    middle = (ordered.numel() - 1) / 2
    return 0.5 * (ordered[int(middle)] + ordered[int(middle + 0.5)]).item()


def mean_rank(ranks: torch.Tensor) -> float:
    """MnR."""
    return ranks.double().mean().item() if ranks.numel() else 0.0


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q] rank of each query's best target in the gallery. `targets`: [Q] gallery indices, or [Q, P]
    index sets padded with -1 (each row with at least one index)."""
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query [Q, D] and gallery [G, D] must share D, got {tuple(query.shape)}, {tuple(gallery.shape)}"
        )
    if targets.shape[:1] != query.shape[:1] or targets.dim() not in (1, 2):
        raise ValueError(f"targets must be [{query.shape[0]}] or [{query.shape[0]}, P], got {tuple(targets.shape)}")
    if query.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    sets = targets[:, None] if targets.dim() == 1 else targets
    if ((sets < -1) | (sets >= gallery.shape[0])).any() or (sets.amax(dim=1) < 0).any():
        raise ValueError(f"targets must index the gallery (0..{gallery.shape[0] - 1}; -1 pads a set, never fills it)")
    return mmfast.similarity_topk(query, gallery, 1, target=targets).target_rank.long()


def cross_modal_metrics(
    texts: torch.Tensor,
    items: torch.Tensor,
    text_item: torch.Tensor,
    *,
    item_present: torch.Tensor | None = None,
    directions: tuple[str, str] = ("t2i", "i2t"),
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """R@K, MdR and MnR in both directions between texts [T, D] and items [I, D] (images, videos),
    text t describing item `text_item[t]` (several texts per item allowed: 5 captions per image).

    Text→item: the query's item must be found among all items. Item→text: a hit when any of the
    item's texts is found. An item that could not be embedded (`item_present` False, a missing image)
    is left out of the gallery, and every query about it (its texts', its own) is a miss at every k
    and counts with rank gallery size + 1 in MdR and MnR: it stays in every denominator.
    Keys: "<t2i>_R@<k>", "<t2i>_MdR", "<t2i>_MnR" and the same for "<i2t>", names from `directions`.
    """
    num_items = items.shape[0]
    if text_item.shape != texts.shape[:1] or ((text_item < 0) | (text_item >= num_items)).any():
        raise ValueError(f"text_item must be [{texts.shape[0]}] item indices in 0..{num_items - 1}")
    present = torch.ones(num_items, dtype=torch.bool) if item_present is None else item_present.bool()
    if present.shape != (num_items,):
        raise ValueError(f"item_present must be [{num_items}], got {tuple(present.shape)}")
    kept = present.nonzero().squeeze(1)
    gallery_index = torch.full((num_items,), -1, dtype=torch.long)
    gallery_index[kept] = torch.arange(kept.numel())

    text_ranks = torch.full((texts.shape[0],), num_items + 1, dtype=torch.long)
    answerable = present[text_item]
    if answerable.any():
        text_ranks[answerable] = retrieval_ranks(texts[answerable], items[kept], gallery_index[text_item[answerable]])

    # Each item's texts as an index set padded with -1, for the item→text direction.
    counts = torch.bincount(text_item, minlength=num_items)
    order = torch.argsort(text_item, stable=True)
    slot = torch.arange(texts.shape[0]) - (torch.cumsum(counts, 0) - counts)[text_item[order]]
    text_sets = torch.full((num_items, max(int(counts.max()) if num_items else 0, 1)), -1, dtype=torch.long)
    text_sets[text_item[order], slot] = order
    item_ranks = torch.full((num_items,), texts.shape[0] + 1, dtype=torch.long)
    askable = present & (counts > 0)
    if askable.any():
        item_ranks[askable] = retrieval_ranks(items[askable], texts, text_sets[askable])

    results = {}
    for name, ranks, answered in zip(directions, (text_ranks, item_ranks), (answerable, askable), strict=True):
        results.update({f"{name}_R@{k}": value for k, value in recall_at_k(ranks, ks, answered=answered).items()})
        results[f"{name}_MdR"] = median_rank(ranks)
        results[f"{name}_MnR"] = mean_rank(ranks)
    return results

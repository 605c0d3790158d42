"""Duplicate-aware contrastive loss: the ids that say which candidates are copies of a positive.

The rule (mmfast.contrastive_loss, every backend; the float64 reference states it plainly):

    candidates = [targets; negatives flattened], candidate_ids [N] one integer per candidate
    for query i (positive: candidate p = offset + i), every candidate j ≠ p with
        candidate_ids[j] == candidate_ids[p]
    is no negative of query i: it leaves the softmax, and so every later step (hardness only
    weights negatives; the false-negative margin and the top-k selection choose among the
    negatives left, so a duplicate takes no top-k slot). It gets no gradient from row i.
    symmetric: query_ids [B] do the same for target i over the queries (query j ≠ i with
    query_ids[j] == query_ids[i] is left out).
    A row left with no negative has loss logsumexp([s_ii/τ]) - s_ii/τ = 0 and no gradient.

Across devices the ids are all-gathered with the embeddings (in the same order: every rank's target
ids, then every rank's negative ids), so a copy on another rank is left out too. Every rank must pass
ids, or none, as with negatives.

Ids are compared for equality only: any integers do (a content hash, a dataset row, a label index).
The kernels read them as dense int32 class indices (`class_index`), one integer per candidate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mmfast.distributed import gather, process_group_active
from mmfast.validation import check_ids, check_positive_int


class DuplicateIds(NamedTuple):
    """The ids of the candidates the rows see (gathered ones across devices); None = no masking."""

    candidate: torch.Tensor | None = None  # [N]: targets first, then the flattened negatives
    query: torch.Tensor | None = None  # [B]: the candidates of the symmetric half


NO_IDS = DuplicateIds()


def check_duplicate_ids(candidate_ids, query_ids, *, batch_size: int, n_candidates: int, symmetric: bool,
                        device: torch.device) -> DuplicateIds:  # fmt: skip
    """Validates the ids of one call: candidate_ids [B + M], query_ids [B] and only when symmetric."""
    if candidate_ids is not None:
        check_ids("candidate_ids", candidate_ids, n_candidates, "candidate: the B targets, then the negatives", device)
    if query_ids is not None:
        if not symmetric:
            raise ValueError("query_ids mask duplicate queries in the symmetric half: pass symmetric=True or omit them")
        check_ids("query_ids", query_ids, batch_size, "query", device)
    return DuplicateIds(candidate_ids, query_ids)


def gather_duplicate_ids(ids: DuplicateIds, batch_size: int) -> tuple[DuplicateIds, int]:
    """Every rank's ids in the order of the gathered candidates (mmfast.distributed.gather_candidates:
    all targets, then all negatives), and this rank's offset among the gathered rows. The negatives'
    part is gathered even when empty, so ranks with and without negatives make the same calls."""
    candidate = query = None
    offset = 0
    if ids.candidate is not None:
        targets, offset = gather(ids.candidate[:batch_size], with_grad=False)
        candidate = torch.cat([targets, gather(ids.candidate[batch_size:], with_grad=False)[0]])
    if ids.query is not None:
        query, offset = gather(ids.query, with_grad=False)
    return DuplicateIds(candidate, query), offset


def class_index(ids: torch.Tensor | None) -> torch.Tensor | None:
    """The ids as dense int32 class indices (equal ids, equal index): what the kernels read."""
    if ids is None:
        return None
    return torch.unique(ids, return_inverse=True)[1].to(torch.int32).contiguous()


def _masked_per_row(ids: torch.Tensor, offset: int, rows: int) -> torch.Tensor:
    """For each of `rows` rows whose positive is ids[offset + i]: how many other entries share its id."""
    values, counts = torch.unique(ids, return_counts=True)
    positives = ids[offset : offset + rows]
    return counts[torch.searchsorted(values, positives)] - 1


def masked_candidate_counts(
    batch_size: int,
    candidate_ids: torch.Tensor | None,
    query_ids: torch.Tensor | None = None,
    *,
    cross_device: bool = False,
) -> torch.Tensor:
    """How many candidates `contrastive_loss` leaves out of each of this process's B rows, for the
    same ids and cross_device: query i's duplicates among the candidates plus, with query_ids, target
    i's among the queries. int64 [B]. With cross_device and a process group this is a collective (the
    ids are gathered as the loss gathers them): every rank must call it."""
    batch_size = check_positive_int("batch_size", batch_size)
    if candidate_ids is None and query_ids is None:
        raise ValueError("masked_candidate_counts needs candidate_ids or query_ids")
    device = next((t.device for t in (candidate_ids, query_ids) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if candidate_ids is not None:
        # [B + M] with any M >= 0: a vector of B entries or more has a right length.
        is_vector = isinstance(candidate_ids, torch.Tensor) and candidate_ids.dim() == 1
        n_candidates = max(batch_size, candidate_ids.shape[0]) if is_vector else batch_size
        check_ids("candidate_ids", candidate_ids, n_candidates, "candidate: the B targets, then the negatives", device)
    if query_ids is not None:
        check_ids("query_ids", query_ids, batch_size, "query", device)
    ids = DuplicateIds(candidate_ids, query_ids)
    offset = 0
    if cross_device and process_group_active():
        ids, offset = gather_duplicate_ids(ids, batch_size)
    counts = torch.zeros(batch_size, dtype=torch.int64, device=device)
    for part in ids:
        if part is not None:
            counts += _masked_per_row(part, offset, batch_size)
    return counts

"""mmfast.late_interaction_topk: each multi-vector query's k best documents of a multi-vector corpus by
MaxSim, and the rank of its target, without the Q × G × L_q × L_d token scores (nor the Q × G scores).
For retrieval evaluation of ColBERT / ColPali models: no gradient.

Layers: late_interaction_topk() -> mmfast/backends/late_interaction_topk.py (target scores, the tile
loop, the choice of kernels) -> csrc/late_interaction_topk.cpp, kernels/late_interaction_topk.py or
torch ops for the MaxSim tiles, and mmfast.similarity_topk's merge for the top-k.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mmfast.backends import resolve_backend
from mmfast.backends.late_interaction_topk import late_interaction_topk_kernels, search
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.late_interaction_topk import late_interaction_topk_reference
from mmfast.similarity_topk import FINITE_CHECK_ELEMENTS
from mmfast.validation import check_backend_name, check_float_dtype


class LateInteractionTopK(NamedTuple):
    values: torch.Tensor  # [Q, k] float32 (float64 for float64 inputs), best first
    indices: torch.Tensor  # [Q, k] int64 corpus indices
    target_rank: torch.Tensor | None  # [Q] int64, 1 = the best target beats every other document; None without target


@dataclass(frozen=True)
class LateInteractionTopkOptions:
    k: int
    normalize_scores: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"k must be an int, got {type(self.k).__name__}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not isinstance(self.normalize_scores, bool):
            raise TypeError(f"normalize_scores must be a bool, got {type(self.normalize_scores).__name__}")
        check_backend_name(self.backend)


def _check_tokens(name: str, tokens: object) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be 3-D [rows, tokens, D], got shape {tuple(tokens.shape)}")
    if 0 in tokens.shape:
        raise ValueError(f"{name} has an empty dimension, shape {tuple(tokens.shape)}: each must be >= 1")
    check_float_dtype(name, tokens)


def _check_mask(name: str, mask: object, tokens: torch.Tensor) -> torch.Tensor:
    """A [rows, tokens] bool or integer mask (nonzero = a real token) as bool; every row needs one."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"{name} must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
    if mask.device != tokens.device:
        raise ValueError(f"{name} is on {mask.device} but its embeddings are on {tokens.device}")
    mask = mask != 0
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(f"{name} row {int(empty[0, 0])} has no real token: every row needs at least one")
    return mask


def _check_finite(name: str, tokens: torch.Tensor) -> None:
    """NaN has no place in an order. Padding tokens are read too (the bias is added to them): fill
    them with zeros, not NaN."""
    flat = tokens.reshape(tokens.shape[0], -1)
    rows = max(1, FINITE_CHECK_ELEMENTS // flat.shape[1])
    for start in range(0, flat.shape[0], rows):
        bad = ~torch.isfinite(flat[start : start + rows]).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"{name} row {start + int(bad.nonzero()[0, 0])} has a NaN or infinite value "
                             "(padding tokens included: fill them with zeros)")  # fmt: skip


def _target_sets(target, n_queries: int, n_corpus: int, device) -> torch.Tensor:
    """[Q, P] int64 corpus indices, -1 for padding, each index at most once per row (the form
    mmfast.similarity_topk's merge takes)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of corpus indices or None, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer corpus indices, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but query is on {device}")
    if target.dim() not in (1, 2) or target.shape[0] != n_queries or (target.dim() == 2 and target.shape[1] == 0):
        raise ValueError(f"target must be [Q] or [Q, P] with Q = {n_queries} and P >= 1, got {tuple(target.shape)}")
    sets = target.to(torch.int64).reshape(n_queries, -1)
    lowest = 0 if target.dim() == 1 else -1
    bad = (sets < lowest) | (sets >= n_corpus)
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())[: target.dim()]
        padding = "" if target.dim() == 1 else " or -1 (padding)"
        raise ValueError(f"target[{', '.join(map(str, where))}] = {int(target[where])} is not a corpus index "
                         f"in [0, {n_corpus}){padding}")  # fmt: skip
    empty = (sets < 0).all(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero()[:8, 0].tolist()
        raise ValueError(f"target rows {rows} have no valid entry (all -1): such a query has no rank")
    sets = sets.sort(dim=1).values
    repeated = torch.zeros_like(sets, dtype=torch.bool)
    repeated[:, 1:] = sets[:, 1:] == sets[:, :-1]
    return sets.masked_fill(repeated, -1).contiguous()


def _check_inputs(query, corpus) -> None:
    _check_tokens("query", query)
    _check_tokens("corpus", corpus)
    if corpus.device != query.device:
        raise ValueError(f"corpus is on {corpus.device} but query is on {query.device}")
    if corpus.dtype != query.dtype:
        raise TypeError(f"corpus has dtype {corpus.dtype} but query has {query.dtype}")
    if corpus.shape[2] != query.shape[2]:
        raise ValueError(f"corpus has D = {corpus.shape[2]} but query has D = {query.shape[2]}")


def late_interaction_topk(
    query: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    query_mask: torch.Tensor | None = None,
    corpus_mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    normalize_scores: bool = False,
    backend: str = "auto",
) -> LateInteractionTopK:
    """The k corpus documents with the highest MaxSim scores for each multi-vector query.

    Args:
        query: [Q, L_q, D] token vectors, float32, bfloat16, float16 or float64 (nothing is normalised).
        corpus: [G, L_d, D] document token vectors, same dtype and device.
        k: how many per query, >= 1; a k above G is clamped to G.
        query_mask, corpus_mask: None (every token real) or [rows, tokens] bool or integer masks,
            nonzero = a real token; every row needs one. Ragged lengths come here.
        target: optional [Q] corpus indices, or [Q, P] index sets padded with -1 (as similarity_topk's).
        normalize_scores: divide each score by the query's number of real tokens (as
            late_interaction_loss's option; it changes the values, not the order).
        backend: "auto", "triton", "cpu", "torch" or "reference".

    Score(q, g) = Σ over real query tokens t of max over real tokens s of document g of ⟨q_t, d_gs⟩.
    Returns LateInteractionTopK(values, indices, target_rank) as similarity_topk does: values [Q, k]
    best first (float32, float64 for float64 inputs), ties broken towards the lower corpus index on
    every backend; indices [Q, k] int64; target_rank [Q] int64 (None without target), 1 + the number
    of documents scoring strictly higher than the query's best-scoring target.

    Evaluation only: no gradient. Never holds more than one tile of token scores, sized by the score
    budget (MMFAST_SCORE_CHUNK_BYTES); the Triton kernel keeps its token scores in registers.
    """
    options = LateInteractionTopkOptions(k, normalize_scores, backend)
    _check_inputs(query, corpus)
    resolved = resolve_backend(options.backend, query.device)
    query_mask = _check_mask("query_mask", query_mask, query)
    corpus_mask = _check_mask("corpus_mask", corpus_mask, corpus)
    _check_finite("query", query)
    _check_finite("corpus", corpus)
    n_queries, n_corpus = query.shape[0], corpus.shape[0]
    targets = None if target is None else _target_sets(target, n_queries, n_corpus, query.device)
    k = min(options.k, n_corpus)
    query, corpus = query.detach(), corpus.detach()
    if resolved == "reference":
        values, indices, rank = late_interaction_topk_reference(query, corpus, k, query_mask=query_mask,
                                                                corpus_mask=corpus_mask, target=target,
                                                                normalize_scores=options.normalize_scores)  # fmt: skip
        return LateInteractionTopK(values.to(compute_dtype(query.dtype)), indices, rank)
    kernels = late_interaction_topk_kernels(options.backend, resolved, query.dtype)
    values, indices, count = search(kernels, query, query_mask, corpus, corpus_mask, k, targets,
                                    options.normalize_scores)  # fmt: skip
    return LateInteractionTopK(values, indices, None if count is None else count + 1)

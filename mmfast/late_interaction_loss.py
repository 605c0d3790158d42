"""mmfast.late_interaction_loss: the contrastive loss of multi-vector (ColBERT / ColPali) embeddings,
scored by MaxSim, without ever holding more than one tile of query-token × document-token scores.

Layers, top to bottom:
  late_interaction_loss() / LateInteractionLoss   validate inputs, build LateInteractionLossOptions;
                                                   the loss over the [B, N] MaxSim scores (autograd)
  LateInteractionScoresFunction                    the [B, N] scores, backward through the arg-max
  torch.ops.mmfast.late_interaction_scores/_grads  custom ops, so torch.compile traces through
  mmfast.backends.late_interaction_loss            the chunk loops; kernels per backend (csrc/, kernels/)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmfast.backends import autocast_disabled, resolve_backend
from mmfast.backends.late_interaction_loss import (
    GradientNeeds,
    Piece,
    late_interaction_grads,
    late_interaction_scores,
)
from mmfast.distributed import gather, process_group_active, warn_single_process
from mmfast.duplicate_ids import check_duplicate_ids, gather_duplicate_ids
from mmfast.fused_gradients import once_differentiable, reduce_rows
from mmfast.kernel_contract import compute_dtype
from mmfast.reference.late_interaction_loss import late_interaction_loss_reference
from mmfast.validation import check_backend_name, check_float_dtype, check_reduction, check_temperature

LOSSES = ("infonce", "pairwise")


@dataclass(frozen=True)
class LateInteractionLossOptions:
    """Every option of the loss; validated on construction."""

    loss: str = "infonce"
    temperature: float | torch.Tensor = 0.02
    normalize_scores: bool = False
    reduction: str = "mean"
    backend: str = "auto"
    cross_device: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_temperature("temperature", self.temperature, device=None)
        for name in ("normalize_scores", "cross_device"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        check_reduction(self.reduction)
        check_backend_name(self.backend)


def _check_tokens(name: str, tokens: object, dim: int | None, *, rows_may_be_empty: bool = False) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"{name} must be 3-D [rows, tokens, D], got shape {tuple(tokens.shape)}")
    if 0 in tokens.shape[1 if rows_may_be_empty else 0 :]:
        at_least = "tokens and D" if rows_may_be_empty else "each"
        raise ValueError(f"{name} has an empty dimension, shape {tuple(tokens.shape)}: {at_least} must be >= 1")
    if dim is not None and tokens.shape[2] != dim:
        raise ValueError(f"{name} must have query's D = {dim}, got shape {tuple(tokens.shape)}")
    check_float_dtype(name, tokens)
    return tokens


def _check_mask(name: str, mask: object, tokens: torch.Tensor) -> torch.Tensor:
    """A [rows, tokens] bool or integer mask (nonzero = a real token) as bool; every row needs one.
    The row check reads the mask, so torch.compile skips it (as pooling's does)."""
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
    if not torch.compiler.is_compiling():
        empty = (~mask.any(dim=1)).nonzero()
        if empty.numel():
            raise ValueError(f"{name} row {int(empty[0, 0])} has no real token: every row needs at least one")
    return mask


@torch.library.custom_op("mmfast::late_interaction_scores", mutates_args=())
def _scores_op(query: torch.Tensor, query_mask: torch.Tensor, document: torch.Tensor, document_mask: torch.Tensor,
               negatives: torch.Tensor | None, negative_mask: torch.Tensor | None,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(MaxSim scores [B, N], arg-max document token [B, L_q, N] int32)."""
    with autocast_disabled(query.device):
        return late_interaction_scores(backend, query, query_mask, _pieces(document, document_mask, negatives,
                                                                           negative_mask))  # fmt: skip


@_scores_op.register_fake
def _(query, query_mask, document, document_mask, negatives, negative_mask, backend):
    n = document.shape[0] + (0 if negatives is None else negatives.shape[0])
    scores = query.new_empty(query.shape[0], n, dtype=compute_dtype(query.dtype))
    return scores, query.new_empty(query.shape[0], query.shape[1], n, dtype=torch.int32)


@torch.library.custom_op("mmfast::late_interaction_grads", mutates_args=())
def _grads_op(grad_scores: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor, document: torch.Tensor,
              document_mask: torch.Tensor, negatives: torch.Tensor | None, negative_mask: torch.Tensor | None,
              argmax: torch.Tensor, backend: str,
              needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of query, document, negatives (an empty tensor where not needed)."""
    pieces = _pieces(document, document_mask, negatives, negative_mask)
    with autocast_disabled(query.device):
        grad_query, piece_grads = late_interaction_grads(backend, grad_scores, query, query_mask, pieces, argmax,
                                                         GradientNeeds(*needs))  # fmt: skip
    grads = [grad_query, *piece_grads, None][:3]
    return tuple(query.new_empty(0) if g is None else g for g in grads)


@_grads_op.register_fake
def _(grad_scores, query, query_mask, document, document_mask, negatives, negative_mask, argmax, backend, needs):
    likes = (query, document, negatives)
    return tuple(like.new_empty(like.shape) if need and like is not None else query.new_empty(0)
                 for need, like in zip(needs, likes, strict=True))  # fmt: skip


def _pieces(document, document_mask, negatives, negative_mask) -> list[Piece]:
    pieces = [Piece(document, document_mask)]
    if negatives is not None:
        pieces.append(Piece(negatives, negative_mask))
    return pieces


class LateInteractionScoresFunction(torch.autograd.Function):
    """The [B, N] MaxSim scores; backward routes dLoss/dS through the stored int32 arg-max (exact, no
    token score recomputed). `backend` is already resolved to a concrete one."""

    @staticmethod
    def forward(ctx, query, document, negatives, query_mask, document_mask, negative_mask, backend: str):
        scores, argmax = _scores_op(query, query_mask, document, document_mask, negatives, negative_mask, backend)
        ctx.backend = backend
        ctx.needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        ctx.save_for_backward(query, document, negatives, query_mask, document_mask, negative_mask, argmax)
        ctx.mark_non_differentiable(argmax)
        return scores, argmax

    @staticmethod
    @once_differentiable("late_interaction_loss")
    def backward(ctx, grad_scores, _grad_argmax):
        query, document, negatives, query_mask, document_mask, negative_mask, argmax = ctx.saved_tensors
        grads = _grads_op(grad_scores, query, query_mask, document, document_mask, negatives, negative_mask, argmax,
                          ctx.backend, ctx.needs)  # fmt: skip
        grads = [g if need else None for g, need in zip(grads, ctx.needs, strict=True)]
        return (*grads, None, None, None, None)


def late_interaction_loss(
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
    backend: str = "auto",
    cross_device: bool = False,
    candidate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Late-interaction contrastive loss of B multi-vector queries against their B documents.

    Args:
        query: [B, L_q, D] token vectors; document: [B, L_d, D], document i is query i's positive.
        negatives: None or [M, L_n, D] hard-negative documents (e.g. M = B·K) shared by every query.
            The candidates are the B documents, then the negatives (N = B + M). M may be 0: none here (as
            None), while cross_device still gathers the other ranks' (every rank must then pass a tensor).
        query_mask, document_mask, negative_mask: None (every token real) or [rows, tokens] bool or
            integer masks, nonzero = a real token; every row needs one. Ragged lengths come here.
        loss: "infonce" (cross-entropy of S_i·/τ over the candidates) or "pairwise" (colpali-engine's
            ColbertPairwiseCELoss: softplus((hardest negative score − positive score) / τ)).
        temperature: τ, a positive number or a 0-d floating tensor (a learnable τ gets its gradient).
        normalize_scores: divide each score by the query's number of real tokens (colpali-engine's).
        reduction: "mean", "sum" or "none" ([B]).
        backend: "auto", "triton", "cpu", "torch" or "reference".
        cross_device: documents, negatives, their masks and candidate_ids are gathered from every rank
            (documents and negatives with gradient); query i's positive is the gathered document at
            this rank's offset + i. Every rank's L_d (and L_n) must be equal: pad them, with the mask.
        candidate_ids: None or [N] integer ids; a candidate j ≠ positive with the positive's id is
            no negative of that row (as in mmfast.contrastive_loss).

    Score S_ij = Σ over real query tokens t of max over real tokens s of document j of ⟨q_it, d_js⟩.
    Returns float32 (float64 for float64 inputs). Bad input raises ValueError/TypeError naming it.
    """
    options = LateInteractionLossOptions(loss=loss, temperature=temperature, normalize_scores=normalize_scores,
                                         reduction=reduction, backend=backend, cross_device=cross_device)  # fmt: skip
    return _late_interaction_loss(query, document, negatives, query_mask, document_mask, negative_mask, options,
                                  candidate_ids)  # fmt: skip


def _late_interaction_loss(query, document, negatives, query_mask, document_mask, negative_mask,
                           options: LateInteractionLossOptions, candidate_ids) -> torch.Tensor:  # fmt: skip
    _check_tokens("query", query, None)
    dim = query.shape[2]
    _check_tokens("document", document, dim)
    if document.shape[0] != query.shape[0]:
        raise ValueError(f"document must have one row per query (B = {query.shape[0]}), got {document.shape[0]}")
    if negatives is not None:
        # No rows: no negatives here; across devices other ranks' still count (every rank gathers them).
        _check_tokens("negatives", negatives, dim, rows_may_be_empty=True)
    elif negative_mask is not None:
        raise ValueError("negative_mask was given without negatives")
    for name, t in (("document", document), ("negatives", negatives)):
        if t is not None and t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}: all inputs must share one dtype")
        if t is not None and t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all inputs must share a device")
    check_temperature("temperature", options.temperature, device=query.device)
    query_mask = _check_mask("query_mask", query_mask, query)
    document_mask = _check_mask("document_mask", document_mask, document)
    negative_mask = None if negatives is None else _check_mask("negative_mask", negative_mask, negatives)
    n_candidates = document.shape[0] + (0 if negatives is None else negatives.shape[0])
    ids = check_duplicate_ids(candidate_ids, None, batch_size=query.shape[0], n_candidates=n_candidates,
                              symmetric=False, device=query.device)  # fmt: skip
    backend = resolve_backend(options.backend, query.device)
    offset = 0
    if options.cross_device:
        if process_group_active():
            document, offset = gather(document, with_grad=True)
            document_mask = gather(document_mask, with_grad=False)[0]
            if negatives is not None:
                negatives = gather(negatives, with_grad=True)[0]
                negative_mask = gather(negative_mask, with_grad=False)[0]
            ids = gather_duplicate_ids(ids, query.shape[0])[0]
        else:
            warn_single_process("late_interaction_loss")
    if negatives is not None and negatives.shape[0] == 0:
        negatives = negative_mask = None
    ids = ids.candidate
    if backend == "reference":
        return late_interaction_loss_reference(
            query, document, negatives, query_mask=query_mask, document_mask=document_mask,
            negative_mask=negative_mask, loss=options.loss, temperature=options.temperature,
            normalize_scores=options.normalize_scores, reduction=options.reduction, candidate_ids=ids,
            positive_offset=offset,
        ).to(compute_dtype(query.dtype))  # fmt: skip
    scores = LateInteractionScoresFunction.apply(query, document, negatives, query_mask, document_mask, negative_mask,
                                                 backend)[0]  # fmt: skip
    return reduce_rows(_loss_rows(scores, query_mask, offset, options, ids), None, options.reduction)


def _loss_rows(scores, query_mask, offset: int, options: LateInteractionLossOptions, ids) -> torch.Tensor:
    """Each row's loss from the [B, N] MaxSim scores (plain autograd: B × N is L_q·L_d times smaller
    than the token scores)."""
    if options.normalize_scores:
        scores = scores / query_mask.sum(dim=1, keepdim=True).to(scores.dtype)
    rows = torch.arange(scores.shape[0], device=scores.device)
    positive = rows + offset
    negative = torch.ones_like(scores, dtype=torch.bool)
    negative[rows, positive] = False
    if ids is not None:
        negative &= ids[None, :] != ids[positive][:, None]
    positive_score = scores[rows, positive]
    temperature = options.temperature
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(scores.dtype)
    if options.loss == "infonce":
        logits = torch.where(negative, scores, float("-inf"))
        logits = logits.index_put((rows, positive), positive_score) / temperature
        return torch.logsumexp(logits, dim=1) - positive_score / temperature
    hardest = torch.where(negative, scores, float("-inf")).max(dim=1).values  # ties: the lower index
    has_negative = negative.any(dim=1)
    margin = torch.where(has_negative, hardest, positive_score) - positive_score
    return torch.where(has_negative, F.softplus(margin / temperature), 0.0)


class LateInteractionLoss(torch.nn.Module):
    """nn.Module form of `late_interaction_loss`; the keyword options are fixed at construction."""

    def __init__(self, **options):
        super().__init__()
        self.options = LateInteractionLossOptions(**options)
        if isinstance(self.options.temperature, torch.nn.Parameter):
            self.temperature = self.options.temperature

    def forward(self, query, document, negatives=None, *, query_mask=None, document_mask=None, negative_mask=None,
                candidate_ids=None):  # fmt: skip
        return _late_interaction_loss(query, document, negatives, query_mask, document_mask, negative_mask,
                                      self.options, candidate_ids)  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())

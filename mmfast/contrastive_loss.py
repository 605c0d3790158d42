"""mmfast.contrastive_loss: InfoNCE with shared hard negatives, LLaVE hardness weighting, UniME
false-negative filtering and top-k hard negatives, optionally symmetric, optionally leaving out
candidates that duplicate a positive (mmfast/duplicate_ids.py); fused and chunked so the B×N score
matrix never exists, forward or backward.

Layers, top to bottom:
  contrastive_loss() / ContrastiveLoss     validate inputs, build ContrastiveLossOptions
  ContrastiveLossFunction                  the one autograd.Function, for every backend
  torch.ops.mmfast.contrastive_loss_rows   a custom op, so torch.compile traces through
  mmfast.backends.contrastive_loss         the chunk loop; kernels per backend (csrc/, kernels/);
                                           the symmetric half in mmfast/backends/contrastive_columns.py
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mmfast.backends import autocast_disabled, resolve_backend
from mmfast.backends.contrastive_loss import NO_GRADIENTS, GradientNeeds, contrastive_loss_rows
from mmfast.distributed import Gathered, gather_candidates, process_group_active, warn_single_process
from mmfast.duplicate_ids import NO_IDS, DuplicateIds, check_duplicate_ids, gather_duplicate_ids
from mmfast.fused_gradients import once_differentiable, reduce_rows, row_scale, take_fused_gradients
from mmfast.kernel_contract import DirectionOptions, compute_dtype
from mmfast.reference.contrastive_loss import contrastive_loss_reference
from mmfast.validation import (
    check_backend_name,
    check_embeddings,
    check_matryoshka,
    check_matryoshka_dims_fit,
    check_positive_int,
    check_real,
    check_reduction,
    check_temperature,
    check_temperature_value,
)


@dataclass(frozen=True)
class ContrastiveLossOptions:
    """Every option of the loss; validated on construction. `temperature` may be a 0-d tensor (a
    learnable τ); the embeddings' device is checked when the loss is computed."""

    temperature: float | torch.Tensor = 0.02
    symmetric: bool = False
    hardness: float = 0.0
    false_negative_margin: float | None = None
    topk: int | None = None
    reduction: str = "mean"
    backend: str = "auto"
    cross_device: bool = False
    matryoshka_dims: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        check_temperature("temperature", self.temperature, device=None)
        check_real("hardness", self.hardness)
        if self.false_negative_margin is not None:
            check_real("false_negative_margin", self.false_negative_margin)
        if self.topk is not None:
            object.__setattr__(self, "topk", check_positive_int("topk", self.topk))
        check_backend_name(self.backend)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__}")
        check_reduction(self.reduction)
        if not isinstance(self.cross_device, bool):
            raise TypeError(f"cross_device must be a bool, got {type(self.cross_device).__name__}")
        dims, weights = check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)
        object.__setattr__(self, "matryoshka_dims", dims)
        object.__setattr__(self, "matryoshka_weights", weights)


def _check_inputs(query, target, negatives, weight, options: ContrastiveLossOptions) -> torch.Tensor | None:
    """Validates the tensors; returns negatives flattened to [M, D] (a view) or None."""
    flat_negatives = check_embeddings(query, target, negatives, weight)
    check_temperature("temperature", options.temperature, device=query.device)
    check_matryoshka_dims_fit(options.matryoshka_dims, query.shape[1])
    return flat_negatives


def _gathered(negatives, gathered_targets, gathered_queries, positive_offset: int) -> Gathered | None:
    """The Gathered that the flat arguments of the custom op and of the Function stand for (None on
    one process): torch.library and autograd take tensors only as direct arguments."""
    if gathered_targets is None:
        return None
    return Gathered(gathered_targets, negatives, gathered_queries, positive_offset)


def _flat(gathered: Gathered | None, negatives):
    """The inverse of `_gathered`: (the negatives the rows see, gathered targets, gathered queries,
    offset); on one process the local negatives, None, None, 0."""
    if gathered is None:
        return negatives, None, None, 0
    return gathered.negatives, gathered.targets, gathered.queries, gathered.offset


@torch.library.custom_op("mmfast::contrastive_loss_rows", mutates_args=())
def _contrastive_loss_rows_op(
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    gathered_targets: torch.Tensor | None,
    gathered_queries: torch.Tensor | None,
    temperature_tensor: torch.Tensor | None,
    positive_offset: int,
    temperature: float,
    symmetric: bool,
    hardness: float,
    false_negative_margin: float | None,
    topk: int | None,
    backend: str,
    needs: list[bool],
    candidate_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    matryoshka_dims: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked loss as a custom op, so torch.compile traces through it. A schema takes tensors and
    scalars only: the arguments are ContrastiveLossOptions' fields, the parts of a Gathered (across
    devices `negatives` is Gathered.negatives), the temperature tensor when τ is one (`temperature`
    is then unused), GradientNeeds as a list and the DuplicateIds of the candidates the rows see;
    `_rows` fills them."""
    if temperature_tensor is not None:
        if temperature_tensor.device.type == "cpu":
            check_temperature_value("temperature", temperature_tensor)  # also under torch.compile
        temperature = temperature_tensor.to(compute_dtype(query.dtype))
    with autocast_disabled(query.device):
        loss, *grads = contrastive_loss_rows(
            backend, query, target, negatives,
            direction=DirectionOptions.of(temperature, hardness, false_negative_margin, topk), symmetric=symmetric,
            row_scale=row_scale, needs=GradientNeeds(*needs),
            gathered=_gathered(negatives, gathered_targets, gathered_queries, positive_offset),
            temperature=temperature_tensor, ids=DuplicateIds(candidate_ids, query_ids),
            matryoshka_dims=None if matryoshka_dims is None else tuple(matryoshka_dims),
        )  # fmt: skip
    # A custom op returns tensors only: a gradient that was not computed comes back empty.
    return (loss, *(g if g is not None else query.new_empty(0) for g in grads))


@_contrastive_loss_rows_op.register_fake
def _(query, target, negatives, row_scale, gathered_targets, gathered_queries, temperature_tensor, positive_offset,
      temperature, symmetric, hardness, false_negative_margin, topk, backend, needs, candidate_ids=None,
      query_ids=None, matryoshka_dims=None):  # fmt: skip
    returned = GradientNeeds(*needs).returned(local=gathered_targets is None, symmetric=symmetric)
    inputs = (query, target, negatives, gathered_targets, gathered_queries, temperature_tensor)

    def grad(flag: bool, like: torch.Tensor | None) -> torch.Tensor:
        if row_scale is None or not flag or like is None:
            return query.new_empty(0)
        return like.new_empty(like.shape)  # contiguous, as the real op returns, whatever like's strides

    shape = (query.shape[0],) if matryoshka_dims is None else (len(matryoshka_dims), query.shape[0])
    loss = query.new_empty(shape, dtype=compute_dtype(query.dtype))
    return (loss, *(grad(flag, like) for flag, like in zip(returned, inputs, strict=True)))


def _rows(query, target, negatives, gathered: Gathered | None, options: ContrastiveLossOptions, backend: str,
          temperature: torch.Tensor | None, row_scale=None, needs: GradientNeeds = NO_GRADIENTS,
          ids: DuplicateIds = NO_IDS):  # fmt: skip
    """The custom op on named arguments: the loss of each row and, with row_scale, the gradients in
    `needs`. `negatives` are the local ones; across devices the rows see gathered.negatives (and
    `ids` are the gathered ones). `temperature`: the tensor τ, or None when τ is the number
    options.temperature."""
    negatives, gathered_targets, gathered_queries, offset = _flat(gathered, negatives)
    return _contrastive_loss_rows_op(
        query,
        target,
        negatives,
        row_scale,
        gathered_targets,
        gathered_queries,
        temperature,
        offset,
        options.temperature,
        options.symmetric,
        options.hardness,
        options.false_negative_margin,
        options.topk,
        backend,
        list(needs),
        ids.candidate,
        ids.query,
        None if options.matryoshka_dims is None else list(options.matryoshka_dims),
    )


def _row_scale(options: ContrastiveLossOptions, n_rows: int, weight, dtype, device) -> torch.Tensor:
    """d(reduced loss)/d(row loss): [B], or [m, B] with Matryoshka (each prefix's weight; with
    reduction "none" the output gradient already is per prefix)."""
    scale = row_scale(options.reduction, n_rows, weight, dtype, device)
    if options.matryoshka_dims is None:
        return scale
    if options.reduction == "none":
        return scale.expand(len(options.matryoshka_dims), n_rows)
    return torch.tensor(options.matryoshka_weights, dtype=dtype, device=device)[:, None] * scale


def _reduce(rows: torch.Tensor, weight: torch.Tensor | None, options: ContrastiveLossOptions) -> torch.Tensor:
    """The loss from the row losses ([B], or [m, B] with Matryoshka: the weighted sum over prefixes
    of each prefix's reduced loss; "none" keeps [m, B], not multiplied by matryoshka_weights)."""
    if options.matryoshka_dims is None or options.reduction == "none":
        return reduce_rows(rows, weight, options.reduction)
    per_prefix = torch.stack([reduce_rows(r, weight, options.reduction) for r in rows])
    return (per_prefix * per_prefix.new_tensor(options.matryoshka_weights)).sum()


# The Function's tensor inputs, in its argument order; `needs` follows GradientNeeds' order.
_INPUTS = ("query", "target", "negatives", "weight", "gathered_targets", "gathered_queries", "temperature")
_NEEDS_INPUTS = (0, 1, 2, 4, 5, 6)


class ContrastiveLossFunction(torch.autograd.Function):
    """One Function for every backend; `backend` is already resolved to a concrete one.

    With reduction "mean"/"sum" the forward also computes the gradients (three GEMMs in all, no
    recomputation; a symmetric loss on one process adds one, the B × B block's statistics pass) and
    the first backward only scales them. With "none" the per-row output gradient is only known in
    backward, which then recomputes the scores chunk by chunk (four GEMMs in all), as
    does a second backward through a mean/sum loss (retain_graph=True, gradcheck).
    Across devices, gathered_targets / gathered_queries (and negatives) are all ranks' tensors from
    an autograd-aware all-gather, and query i's positive is gathered target positive_offset + i.
    `temperature` is the 0-d tensor τ (None for a number τ, which is in `options`; see
    _split_temperature). `ids` (DuplicateIds, no gradient) are those of the candidates the rows see.
    """

    @staticmethod
    def forward(ctx, query, target, negatives, weight, gathered_targets, gathered_queries, temperature,
                positive_offset, options: ContrastiveLossOptions, backend: str,
                ids: DuplicateIds = NO_IDS):  # fmt: skip
        needs = GradientNeeds(*(ctx.needs_input_grad[i] for i in _NEEDS_INPUTS))
        gathered = _gathered(negatives, gathered_targets, gathered_queries, positive_offset)
        ctx.options, ctx.backend, ctx.needs, ctx.gathered_offset = options, backend, needs, positive_offset
        ctx.ids = ids
        if options.reduction != "none":
            scale = _row_scale(options, query.shape[0], weight, compute_dtype(query.dtype), query.device)
            rows, *ctx.fused_gradients = _rows(
                query, target, negatives, gathered, options, backend, temperature, scale, needs, ids
            )
        else:
            rows = _rows(query, target, negatives, gathered, options, backend, temperature, ids=ids)[0]
        # d loss / d weight_i is row i's loss (over B for "mean"): keep the [B] rows when asked. The
        # inputs ([B, D] and smaller) are kept for a backward that recomputes.
        ctx.weight_grad = weight is not None and ctx.needs_input_grad[3]
        ctx.save_for_backward(query, target, negatives, weight, gathered_targets, gathered_queries, temperature,
                              rows if ctx.weight_grad else None)  # fmt: skip
        return _reduce(rows, weight, options)

    @staticmethod
    @once_differentiable("contrastive_loss")
    def backward(ctx, grad_output):
        query, target, negatives, weight, gathered_targets, gathered_queries, temperature, rows = ctx.saved_tensors
        grads = take_fused_gradients(ctx, grad_output)
        if grads is None:  # reduction "none", or a second backward
            dtype = compute_dtype(query.dtype)
            scale = _row_scale(ctx.options, query.shape[0], weight, dtype, query.device) * grad_output
            gathered = _gathered(negatives, gathered_targets, gathered_queries, ctx.gathered_offset)
            grads = _rows(query, target, negatives, gathered, ctx.options, ctx.backend, temperature, scale.detach(),
                          ctx.needs, ctx.ids)[1:]  # fmt: skip
        # Real gradients are 2-D (τ's 0-d); the custom op's 1-D empty placeholders mean "not computed".
        grad_query, grad_target, grad_negatives, grad_gathered_targets, grad_gathered_queries, grad_temperature = (
            g if need and g.dim() != 1 else None for g, need in zip(grads, ctx.needs, strict=True)
        )
        grad_weight = None
        if ctx.weight_grad:
            grad_weight = grad_output * (rows / rows.shape[-1] if ctx.options.reduction == "mean" else rows)
            if ctx.options.matryoshka_dims is not None:  # [m, B]: the prefixes' terms of each row
                if ctx.options.reduction != "none":
                    grad_weight = grad_weight * grad_weight.new_tensor(ctx.options.matryoshka_weights)[:, None]
                grad_weight = grad_weight.sum(0)
        return (grad_query, grad_target, grad_negatives, grad_weight, grad_gathered_targets, grad_gathered_queries,
                grad_temperature, None, None, None, None)  # fmt: skip


def contrastive_loss(
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
    backend: str = "auto",
    cross_device: bool = False,
    candidate_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    matryoshka_dims: tuple[int, ...] | None = None,
    matryoshka_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Contrastive loss of B queries against their B targets plus shared hard negatives.

    Args:
        query, target: [B, D]; target i is the positive of query i. Not normalised here.
        negatives: None, [B, K, D] or [M, D]; every query sees all of them. Candidates are the B
            targets, then the negatives flattened row-major (N = B + M).
        temperature: τ; the positive logit is s_ii/τ. A number, or a 0-d floating tensor on the
            embeddings' device that may require grad (a learnable τ, e.g. 1 / logit_scale.exp()):
            it then gets dLoss/dτ = -(1/τ)·Σ_ij G_ij·s_ij (G = dLoss/dS). Its value is checked
            (> 0) only on the CPU, where that costs no device sync.
        hardness: LLaVE's α; a negative's logit is s_ij/τ + α·stopgrad(s_ij). The α term reads the
            raw similarity: it does not depend on τ and gives a learned τ no gradient.
        false_negative_margin: UniME's β; a negative with s_ij > s_ii + β leaves the softmax (raw
            similarities: the filter does not depend on τ).
        topk: UniME's k; after the margin filter only the k highest-scoring negatives per row stay
            (ties go to the lower candidate index; the selection is not differentiated).
        symmetric: average with the loss of each target against the B queries (same rules). On one
            process that half is read from the same B × B block of scores, by columns, fused into
            the row pass (at most 4 + 3K GEMMs with a gradient, K negatives per row, instead of
            6 + 3K; 3 + 3K when the scores fit one chunk);
            across devices it is a second pass (all queries against the local targets).
        weight: [B] per-row multipliers applied before the reduction; "mean" divides the weighted
            sum by B. It gets a gradient when it requires one (each row's unweighted loss).
        reduction: "mean", "sum" or "none" ([B]).
        backend: "auto", "triton", "cpu", "torch" or "reference".
        cross_device: with an initialised torch.distributed group, targets and negatives (and, for
            symmetric, queries) are all-gathered with gradient; each rank's queries see every rank's
            candidates, query i's positive being the gathered target at this rank's offset + i.
            Per-rank batch sizes may differ. Each rank's loss is the reduction over its own rows;
            after every rank's backward each rank holds the gradient of the sum of all ranks'
            losses, which DDP's gradient averaging turns into the global-batch mean. Without a
            group: this process's batch, with one warning.
        candidate_ids: None or [N] integer ids of the candidates (the B targets, then the negatives
            flattened). For query i every candidate j ≠ i with candidate_ids[j] == candidate_ids[i]
            (a copy of its positive: the same label text of another row, say) is left out: of the
            softmax, of the margin filter and of the top-k selection, as if it were not there. A row
            with no negative left has loss 0. Ids are compared for equality only; across devices
            they are gathered with the candidates. The rule in full: mmfast/duplicate_ids.py.
        query_ids: None or [B] integer ids of the queries, for symmetric=True only: target i leaves
            out query j ≠ i with query_ids[j] == query_ids[i] in the same way.
        matryoshka_dims: None or d_1 < … < d_m ≤ D (Matryoshka representation learning): the loss at
            each prefix x[..., :d_k] of every embedding (query, target, negatives), each prefix
            L2-normalised on its own here (with its gradient; the full-D loss without this option is
            not normalised), every other option as above. One pass over D computes every prefix's
            scores and one GEMM per segment d_{k-1}..d_k their gradient
            (mmfast/backends/contrastive_matryoshka.py); a symmetric loss runs its second direction as
            a pass of its own. "mean"/"sum" give Σ_k matryoshka_weights[k]·(the loss at d_k);
            "none" gives [m, B], row k the per-row losses at d_k (times `weight`, not times
            matryoshka_weights), so `out.mean(1)` is each dimension's "mean" loss.
        matryoshka_weights: None (all 1) or one finite number per entry of matryoshka_dims.

    Returns the loss in float32 (float64 for float64 inputs). Gradients reach query, target and
    negatives in their own dtypes (a tensor τ's in its dtype). A second backward (retain_graph)
    recomputes; the gradient is not differentiable again (create_graph: a clear error if used).
    The B×N score matrix is never held: memory is one chunk of score rows (a fixed byte budget)
    plus O(B·k) for top-k. Under cross_device a tensor τ gets d(this rank's loss)/dτ.

    Bad input raises ValueError/TypeError naming the argument. Under torch.compile(fullgraph=True)
    torch reports it as torch._dynamo.exc.Unsupported ("Observed exception"), with this message on
    its "Developer debug context" line; without fullgraph the error itself is raised.
    """
    options = ContrastiveLossOptions(
        temperature=temperature,
        symmetric=symmetric,
        hardness=hardness,
        false_negative_margin=false_negative_margin,
        topk=topk,
        reduction=reduction,
        backend=backend,
        cross_device=cross_device,
        matryoshka_dims=matryoshka_dims,
        matryoshka_weights=matryoshka_weights,
    )
    return _contrastive_loss(query, target, negatives, weight, options, candidate_ids, query_ids)


def _split_temperature(options: ContrastiveLossOptions) -> tuple[ContrastiveLossOptions, torch.Tensor | None]:
    """(options holding numbers only, the tensor τ or None): autograd and the custom op take tensors
    as direct arguments only. With a tensor τ the options' temperature is a placeholder 1.0."""
    if not isinstance(options.temperature, torch.Tensor):
        return options, None
    return dataclasses.replace(options, temperature=1.0), options.temperature


def _contrastive_loss(query, target, negatives, weight, options: ContrastiveLossOptions, candidate_ids=None,
                      query_ids=None) -> torch.Tensor:  # fmt: skip
    flat_negatives = _check_inputs(query, target, negatives, weight, options)
    n_candidates = query.shape[0] + (0 if flat_negatives is None else flat_negatives.shape[0])
    ids = check_duplicate_ids(candidate_ids, query_ids, batch_size=query.shape[0], n_candidates=n_candidates,
                              symmetric=options.symmetric, device=query.device)  # fmt: skip
    backend = resolve_backend(options.backend, query.device)
    gathered = None
    if options.cross_device:
        if process_group_active():
            gathered = gather_candidates(query, target, flat_negatives, symmetric=options.symmetric)
            ids = gather_duplicate_ids(ids, query.shape[0])[0]
        else:
            warn_single_process("contrastive_loss")
    if backend == "reference":
        return contrastive_loss_reference(
            query, target, flat_negatives, temperature=options.temperature, symmetric=options.symmetric,
            hardness=options.hardness, false_negative_margin=options.false_negative_margin, topk=options.topk,
            weight=weight, reduction=options.reduction, candidate_ids=ids.candidate, query_ids=ids.query,
            gathered=gathered, matryoshka_dims=options.matryoshka_dims, matryoshka_weights=options.matryoshka_weights,
        ).to(compute_dtype(query.dtype))  # fmt: skip
    # Autograd tracks tensors only as direct arguments: the Function takes the Gathered's parts.
    negatives, gathered_targets, gathered_queries, offset = _flat(gathered, flat_negatives)
    options, temperature = _split_temperature(options)
    tensors = (query, target, negatives, weight, gathered_targets, gathered_queries, temperature)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        # No gradient wanted: the loss alone, one GEMM per chunk and no gradient buffers.
        rows = _rows(query, target, flat_negatives, gathered, options, backend, temperature, ids=ids)[0]
        return _reduce(rows, weight, options)
    return ContrastiveLossFunction.apply(*tensors, offset, options, backend, ids)


class ContrastiveLoss(torch.nn.Module):
    """nn.Module form of `contrastive_loss`; the keyword options are fixed at construction. A
    temperature that is an nn.Parameter is registered as the module's `temperature` parameter (so
    it is in .parameters(), the state dict and .to())."""

    def __init__(self, **options):
        super().__init__()
        self.options = ContrastiveLossOptions(**options)
        if isinstance(self.options.temperature, torch.nn.Parameter):
            self.temperature = self.options.temperature

    def forward(self, query, target, negatives=None, weight=None, candidate_ids=None, query_ids=None):
        options = self.options
        if isinstance(getattr(self, "temperature", None), torch.nn.Parameter):  # whatever .to() made of it
            options = dataclasses.replace(options, temperature=self.temperature)
        return _contrastive_loss(query, target, negatives, weight, options, candidate_ids, query_ids)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())

"""The chunked contrastive loss, shared by the torch, cpu and triton backends.

One direction of the loss ("rows x against candidates y") is computed a chunk of rows at a time:

    S = x[chunk] · yᵀ                       GEMM 1  -> a [rows, N] scratch buffer, never [B, N]
    loss, G = row kernel(S)                  masks, hardness, exact logsumexp; G overwrites S
    dx[chunk] = G · y ;  dy += Gᵀ · x[chunk]  GEMMs 2 and 3 (only when gradients are wanted)

With the UniME top-k option the row kernel instead selects k negatives per row and the gradient is
sparse (k+1 entries per row), so GEMMs 2 and 3 become gathers and scatter-adds.

With duplicate ids (mmfast/duplicate_ids.py) every row kernel also reads one int32 class index per
candidate (`ids`, [N], None without ids) and leaves out the candidates whose index equals that of the
row's positive, before the margin filter and the top-k selection.

A temperature tensor that wants a gradient adds one reduction per row to the row kernel:
w_i = Σ_j G_ij·s_ij (the logits' gradient times the raw scores), and dTotal/dτ = -(1/τ)·Σ_i w_i. Every
logit that depends on τ is s/τ; the hardness term α·sg(s), the margin and the top-k selection read
the raw scores and do not depend on τ.

A symmetric loss on one process does not run the second direction: its target→queries half is the
B × B block of these scores read by columns (contrastive_columns.py), whose statistics a first pass
over the same chunks gathers (dense with a gradient), and whose gradient the row kernel adds to G.

The candidates y are kept as a list of pieces ([targets, negatives]) and never concatenated. The rows
per chunk come from a byte budget (mmfast/backends/chunked.py), so memory is flat in B. Backends
differ only in their kernel set (backends/contrastive_kernels.py): how S and the gradient GEMMs are
computed (chunked.TorchGemms or kernels/matmul.TritonGemms) and which row kernel runs. The Triton set's
`path` can also send a whole direction down its fused path (mmfast/backends/contrastive_loss_fused.py),
where the row kernel's work happens inside the GEMMs.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from mmfast.backends.chunked import chunk_rows, scratch, work_copy
from mmfast.backends.contrastive_columns import SymmetricColumns
from mmfast.backends.contrastive_kernels import contrastive_kernels
from mmfast.backends.contrastive_loss_fused import fused_directional_loss
from mmfast.backends.contrastive_matryoshka import matryoshka_directional_loss
from mmfast.distributed import Gathered
from mmfast.duplicate_ids import NO_IDS, DuplicateIds, class_index
from mmfast.kernel_contract import DirectionOptions, compute_dtype


class GradientNeeds(NamedTuple):
    """Which inputs want a gradient, in the order of the op's inputs and of its returned gradients."""

    query: bool = False
    target: bool = False
    negatives: bool = False
    gathered_targets: bool = False
    gathered_queries: bool = False
    temperature: bool = False

    def returned(self, *, local: bool, symmetric: bool) -> GradientNeeds:
        """The gradients the op returns: those asked for, of inputs the loss reads. Across devices
        (not `local`) only the symmetric half reads the local targets and the gathered queries; on
        one process there are no gathered tensors."""
        return GradientNeeds(
            query=self.query,
            target=self.target and (local or symmetric),
            negatives=self.negatives,
            gathered_targets=self.gathered_targets and not local,
            gathered_queries=self.gathered_queries and not local and symmetric,
            temperature=self.temperature,
        )


NO_GRADIENTS = GradientNeeds()


def directional_loss(
    kernels,
    x: torch.Tensor,
    pieces: list[torch.Tensor],
    opts: DirectionOptions,
    *,
    row_scale: torch.Tensor | None,
    grad_x: torch.Tensor | None,
    grad_pieces: list[torch.Tensor | None],
    accumulate: bool,
    score_dtype: torch.dtype,
    positive_offset: int = 0,
    temperature_grad: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    columns: SymmetricColumns | None = None,
) -> torch.Tensor:
    """Per-row loss of `x` against the candidates `pieces`; row i's positive is candidate
    positive_offset + i (the offset is this rank's place in gathered candidates). `ids`: the
    candidates' int32 class indices [N] (duplicate_ids.class_index), or None.

    With `row_scale` (dTotal/dLoss_row), gradients go into `grad_x` / `grad_pieces` (None entries are
    skipped): written, or added to when `accumulate` (the top-k path always adds, so its buffers
    must start at zero); and, when `temperature_grad` [rows] is given, w_i = Σ_j G_ij·s_ij into it.

    `columns`: the column half of a symmetric loss on one process (contrastive_columns.py), which
    sees each chunk's block of scores against pieces[0] (the targets) before the row kernel does:
    in a statistics pass over the same chunks first when it asks for one, and whose gradient the row
    kernel then adds to G.
    """
    n_rows = x.shape[0]
    n_candidates = sum(p.shape[0] for p in pieces)
    if opts.topk is not None:
        # More slots than negatives would only cost memory: a row has at most N - 1 of them.
        opts = dataclasses.replace(opts, topk=max(1, min(opts.topk, n_candidates - 1)))
    per_score = kernels.topk_bytes_per_score if opts.topk is not None else kernels.dense_bytes_per_score
    if temperature_grad is not None and opts.topk is None:  # the top-k kernels have the selected scores
        per_score += kernels.temperature_bytes_per_score
    per_score += 0 if columns is None else columns.bytes_per_score
    chunk = chunk_rows(n_rows, n_candidates, per_score, score_dtype, x.device)
    path = kernels.path(n_rows, n_candidates, x.shape[1], x.dtype, opts, chunk=chunk, device=x.device,
                        gradients=row_scale is not None)  # fmt: skip
    if path == "fused":  # its own chunk loop and buffers
        if columns is not None:  # the fused kernel has no column half: the caller runs the second direction
            columns.fused_rows = True
        return fused_directional_loss(
            kernels, x, pieces, opts, row_scale=row_scale, grad_x=grad_x, grad_pieces=grad_pieces,
            accumulate=accumulate, positive_offset=positive_offset, temperature_grad=temperature_grad, ids=ids,
        )  # fmt: skip
    scores_buffer = scratch("scores", chunk, n_candidates, score_dtype, x.device)
    grad_dtype = kernels.grad_dtype(score_dtype, x.dtype)
    separate_grads = row_scale is not None and opts.topk is None and grad_dtype != score_dtype
    grad_scratch = scratch("grads", chunk, n_candidates, grad_dtype, x.device) if separate_grads else None
    loss = torch.empty(n_rows, dtype=score_dtype, device=x.device)
    gemms = kernels.gemms(path)
    n_block = pieces[0].shape[0]
    bounds = [(start, min(n_rows, start + chunk)) for start in range(0, n_rows, chunk)]
    resident_block = None  # the chunk whose block of scores the scratch still holds
    if columns is not None and columns.first_pass:
        # The partial chunk goes first, so that the last one, whose block the row pass reuses, is full.
        first = n_rows - chunk * (len(bounds) - 1)
        bounds = [(0, first)] + [(start, start + chunk) for start in range(first, n_rows, chunk)]
        # The same chunks, scratch and GEMM call on the targets piece as the row pass below: the
        # block's scores come out bitwise the same in both passes (see contrastive_columns.py).
        for start, stop in bounds:
            block = scores_buffer[: stop - start, :n_block]
            gemms.scores(x[start:stop], pieces[:1], block)
            columns.see(start, block)
        columns.finish_stats()
        # The row pass walks the chunks backwards: the last chunk's block is still in the scratch,
        # so its GEMM on the targets is not run again (one of the 1 + K score GEMMs of that chunk;
        # half the statistics pass's GEMM when there are 2 chunks). The order changes only the
        # order in which dY's chunk contributions are summed.
        bounds, resident_block = bounds[::-1], bounds[-1]
    column_terms = {} if columns is None or columns.terms is None else {"columns": columns.terms}
    for start, stop in bounds:
        x_chunk, scores = x[start:stop], scores_buffer[: stop - start]
        scale = None if row_scale is None else row_scale[start:stop]
        grad_x_chunk = None if grad_x is None else grad_x[start:stop]
        w = None if temperature_grad is None else temperature_grad[start:stop]
        first_chunk = start == bounds[0][0]
        if (start, stop) == resident_block:
            gemms.scores(x_chunk, pieces[1:], scores[:, n_block:])
        else:
            gemms.scores(x_chunk, pieces, scores)
        if columns is not None and not columns.first_pass:
            columns.see(start, scores[:, :n_block])
        if opts.topk is None:
            grads = None if scale is None else scores if grad_scratch is None else grad_scratch[: stop - start]
            kernels.softmax_rows(scores, positive_offset + start, opts, scale, loss[start:stop], grads, w, ids,
                                 **column_terms)  # fmt: skip
            if grads is not None:
                gemms.dense_grads(
                    grads, x_chunk, pieces, grad_x_chunk, grad_pieces, accumulate, accumulate or not first_chunk
                )
        else:
            slots = (stop - start, opts.topk + 1)
            index = torch.empty(slots, dtype=torch.int64, device=x.device)
            coef = None if scale is None else torch.empty(slots, dtype=score_dtype, device=x.device)
            kernels.topk_rows(scores, positive_offset + start, opts, scale, loss[start:stop], index, coef, w, ids)
            if scale is not None:
                kernels.sparse_grads(x_chunk, pieces, index, coef, grad_x_chunk, grad_pieces)
    return loss


def contrastive_loss_rows(
    backend: str,
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    direction: DirectionOptions,
    symmetric: bool,
    row_scale: torch.Tensor | None,
    needs: GradientNeeds,
    gathered: Gathered | None = None,
    temperature: torch.Tensor | None = None,
    ids: DuplicateIds = NO_IDS,
    matryoshka_dims: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row loss [B] (in compute_dtype: float32, or float64 for float64 inputs) and, when
    `row_scale` is given, the gradients of Σ_i row_scale_i·loss_i for the inputs flagged in `needs`,
    in its order (query, target, negatives, gathered targets, gathered queries, temperature).
    Gradients not asked for, or of inputs the loss does not read (GradientNeeds.returned), are None.
    `temperature` is the 0-d tensor τ when there is one (direction.inv_temperature is then 1/τ, a
    0-d tensor in the compute dtype); its gradient comes back in its own dtype.

    On one process (`gathered` None) the candidates are [target; negatives] and, for the symmetric
    half, query; that half is the B × B block of the row pass read by columns, fused into it
    (contrastive_columns.py: at most 4 + 3K GEMMs with a gradient, not 6 + 3K). Across devices they are
    [gathered.targets; gathered.negatives] (`negatives` is then gathered.negatives) and
    gathered.queries, and query i's positive is gathered target gathered.offset + i; the symmetric
    half then reads other scores (all queries × the local targets) and is a second pass. `ids` are
    the DuplicateIds of those candidates (gathered ones across devices).

    With `matryoshka_dims` (d_1 < … < d_m) the loss is [m, B], one row per prefix, each prefix of
    every embedding L2-normalised on its own, and `row_scale` is [m, B]
    (backends/contrastive_matryoshka.py: one pass over D; a symmetric loss runs its second direction).
    """
    kernels = contrastive_kernels(backend)
    score_dtype = compute_dtype(query.dtype)

    def work(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or x.shape[0] == 0 else work_copy(x, score_dtype, kernels.native_low_precision)

    local = gathered is None
    returned = needs.returned(local=local, symmetric=symmetric) if row_scale is not None else NO_GRADIENTS
    if matryoshka_dims is not None:
        # Compute-dtype copies: the fold's elementwise work and the segment GEMMs read them as they are.
        def work(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None or x.shape[0] == 0 else work_copy(x, score_dtype, False)

    q, t, n = work(query), work(target), work(negatives)
    cand_t, cand_q = (t, q) if local else (work(gathered.targets), work(gathered.queries))
    positive_offset = 0 if local else gathered.offset
    new_grad = torch.zeros if direction.topk is not None or matryoshka_dims is not None else torch.empty

    def grad_buffer(flag: bool, like: torch.Tensor | None) -> torch.Tensor | None:
        return new_grad(like.shape, dtype=score_dtype, device=like.device) if flag and like is not None else None

    grad_q, grad_t = grad_buffer(returned.query, q), grad_buffer(returned.target, t)
    grad_n = grad_buffer(returned.negatives, n)
    grad_ct = grad_t if local else grad_buffer(returned.gathered_targets, cand_t)
    grad_cq = grad_q if local else grad_buffer(returned.gathered_queries, cand_q)
    # A new contiguous tensor: the per-row grad_output of reduction='none' can be an expanded view.
    scale = None if row_scale is None else (row_scale.to(score_dtype) * (0.5 if symmetric else 1.0)).contiguous()
    pieces = [cand_t] if n is None else [cand_t, n]
    want_temperature = returned.temperature and temperature is not None
    # w_i of each direction (mmfast/backends docstring): a [B] vector each, summed at the end.
    w = None
    if want_temperature:
        new_w = torch.zeros if matryoshka_dims is not None else torch.empty
        w = new_w((2 if symmetric else 1, q.shape[0]), dtype=score_dtype, device=q.device)
    w_rows = None if w is None else w[0]
    w_columns = None if w is None or not symmetric else w[1]
    grad_pieces = [grad_ct, grad_n][: len(pieces)]
    columns = None
    if symmetric and local and matryoshka_dims is None:
        # The column half rides on the row pass (contrastive_columns.py); the buffers are shared.
        columns = SymmetricColumns(kernels, q, t, direction, scale, score_dtype, ids=class_index(ids.query),
                                   temperature_grad=w_columns)  # fmt: skip

    def one_direction(
        x, candidates, grad_x, grad_candidates, accumulate, temperature_grad, candidate_ids, columns=None
    ):
        if matryoshka_dims is not None:  # its gradients always add into zeroed buffers
            return matryoshka_directional_loss(
                kernels, x, candidates, matryoshka_dims, direction, row_scale=scale, grad_x=grad_x,
                grad_pieces=grad_candidates, score_dtype=score_dtype, positive_offset=positive_offset,
                temperature_grad=temperature_grad, ids=class_index(candidate_ids),
            )  # fmt: skip
        return directional_loss(
            kernels, x, candidates, direction, row_scale=scale, grad_x=grad_x, grad_pieces=grad_candidates,
            accumulate=accumulate, score_dtype=score_dtype, positive_offset=positive_offset,
            temperature_grad=temperature_grad, ids=class_index(candidate_ids), columns=columns,
        )  # fmt: skip

    loss = one_direction(q, pieces, grad_q, grad_pieces, False, w_rows, ids.candidate, columns)
    if columns is not None and not columns.fused_rows:
        loss = 0.5 * (loss + columns.finish(grad_t, grad_q))
    elif symmetric:
        # Across devices the halves read disjoint scores, and the fused Triton path and the Matryoshka
        # loop have no column half: the targets' pass against the (gathered) queries, adding on one
        # process to what the first wrote.
        loss = 0.5 * (loss + one_direction(t, [cand_q], grad_t, [grad_cq], local, w_columns, ids.query))
    # dTotal/dτ = -(1/τ)·Σ_ij G_ij·s_ij: every τ-dependent logit is s/τ. Summed in float64 (B numbers).
    grad_temperature = None if w is None else (-w.sum(dtype=torch.float64) / temperature.double()).to(temperature.dtype)

    def finish(grad: torch.Tensor | None, like: torch.Tensor | None, flag: bool) -> torch.Tensor | None:
        if not (flag and like is not None):
            return None
        # Negatives with no rows (K = 0) still get a gradient of their (empty) shape.
        return torch.zeros_like(like) if grad is None else grad.to(like.dtype)

    return (
        loss,
        finish(grad_q, query, returned.query),
        finish(grad_t, target, returned.target),
        finish(grad_n, negatives, returned.negatives),
        finish(grad_ct, None if local else gathered.targets, returned.gathered_targets),
        finish(grad_cq, None if local else gathered.queries, returned.gathered_queries),
        grad_temperature,
    )

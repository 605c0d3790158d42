"""The column half of a symmetric contrastive loss on one process, fused into the row pass.

The symmetric loss adds, for each target i, the loss of t_i against the B queries. Its scores
t_i·q_j = s_ji are the B × B block (the first B candidate columns) of the row pass's S = Q·[T; N]ᵀ,
read down a column instead of along a row:

    column i, query j ≠ i    logit s_ji·(1/τ + α), left out when s_ji > d_i + β or query_ids match
    column positive          d_i/τ, with d_i = q_i·t_i computed once ([B], B·D work)
    column loss_i            logsumexp over column i - d_i/τ
    G[j, i] += c_i/τ·(p_ji - δ_ji)  with p the column softmax and c_i the row scale of row i

So the column half needs no GEMM of its own: dQ = G·[T; N] and dT = Gᵀ·Q of the row pass carry it.
The one price is that G[j, i] needs the column's logsumexp, known only after every row chunk has been
seen: with a gradient the chunk loop (backends/contrastive_loss.directional_loss) first runs a
statistics pass over the same row chunks that computes only the block (S_c = Q_c·Tᵀ, one GEMM on the
targets piece) and merges each column's running max and sum of exp (sum in float64) across chunks;
then the row pass adds the column gradient on the block as its row kernel writes G. Both passes
compute the block with the same GEMM calls into the same scratch, so its scores, and hence every
exclusion decision, are bitwise the same in both. The positive and the margin limit use d_i in both
passes, so the column softmax is self-consistent. The row pass walks the chunks backwards: the
last chunk's block is still in the scratch, so its GEMM on the targets is not run again (the partial
chunk goes first, so that the reused one is full). GEMMs with a gradient: 4 + 3K - r/B instead of
6 + 3K (K hard negatives per row, r rows per chunk: 3 + 3K when the scores fit one chunk, 3.5 + 3K
with two); without one, the statistics ride along the row pass (1 + K).

With top-k the selection needs no statistics pass: before the row kernel touches a chunk, each
column's running top-k (ties to the lower query index, as the reference's stable sort) takes in the
chunk's rows; after the last chunk the column losses and their k + 1 sparse coefficients per column
are applied with the kernel set's sparse_grads (x = targets, pieces = [queries]). One score GEMM in all.

Across devices the two halves read disjoint score entries (local queries × all targets against all
queries × local targets), so nothing is shared and contrastive_loss_rows keeps two directional passes.

The torch functions below are the torch kernel set's column methods; the C++ and Triton kernel sets
have their own (csrc/contrastive_loss_columns.cpp, kernels/contrastive_loss.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mmfast.kernel_contract import DirectionOptions


@dataclass(frozen=True)
class ColumnTerms:
    """What a row kernel needs to add the column gradient on the block columns [0, B) of G:
    G[j, i] += coef_i·exp(logit_ji - lse_i) for a negative j ≠ i, and G[i, i] += positive_i."""

    diag: torch.Tensor  # [B] d_i = q_i·t_i (the margin limit is d_i + β)
    lse: torch.Tensor  # [B] the column logsumexps
    coef: torch.Tensor  # [B] c_i/τ
    positive: torch.Tensor  # [B] c_i/τ·(p_ii - 1), from the logit d_i/τ that seeded the statistics
    ids: torch.Tensor | None  # [B] int32 query class indices, or None


def column_exclusions(block: torch.Tensor, row_offset: int, opts: DirectionOptions, diag: torch.Tensor,
                      ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """[rows, B] bool: query row_offset + r is no negative of column i (the positive itself, a false
    negative s > d_i + β, or a duplicate query)."""
    rows = torch.arange(block.shape[0], device=block.device)
    if opts.false_negative_margin is not None:
        excluded = block > (diag + opts.false_negative_margin)[None, :]
    else:
        excluded = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
    if ids is not None:
        excluded.logical_or_(ids[row_offset + rows][:, None] == ids[None, :])
    excluded[rows, rows + row_offset] = True
    return excluded


def _column_logits(block, row_offset, opts: DirectionOptions, diag, ids) -> torch.Tensor:
    """The negatives' column logits of a chunk's block, -inf where left out (the positive too)."""
    excluded = column_exclusions(block, row_offset, opts, diag, ids)
    return (block * (opts.inv_temperature + opts.hardness)).masked_fill_(excluded, float("-inf"))


def torch_column_stats(block, row_offset, opts: DirectionOptions, diag, ids, running_max, running_sum,
                       weighted=None):  # fmt: skip
    """Merges a chunk's block [rows, B] into each column's running max and float64 sum of
    exp(logit - max) and, with `weighted`, Σ exp(logit - max)·(s - d_i) (the temperature reduction)."""
    logits = _column_logits(block, row_offset, opts, diag, ids)
    new_max = torch.maximum(running_max, logits.amax(dim=0))
    rescale = torch.exp(running_max - new_max).double()
    e = logits.sub_(new_max[None, :]).exp_()
    running_sum.mul_(rescale).add_(e.sum(dim=0, dtype=torch.float64))
    if weighted is not None:
        weighted.mul_(rescale).add_((e * (block - diag[None, :])).sum(dim=0, dtype=torch.float64))
    running_max.copy_(new_max)


def torch_column_grads(block, row_offset, opts: DirectionOptions, columns: ColumnTerms) -> torch.Tensor:
    """The column gradient on a chunk's block [rows, B], from its raw scores."""
    grads = _column_logits(block, row_offset, opts, columns.diag, columns.ids)
    grads.sub_(columns.lse[None, :]).exp_().mul_(columns.coef[None, :])
    rows = torch.arange(block.shape[0], device=block.device)
    grads[rows, rows + row_offset] = columns.positive[rows + row_offset]
    return grads


def torch_column_topk(block, row_offset, opts: DirectionOptions, diag, ids, values, index):
    """Merges a chunk's block [rows, B] into each column's running top-k: values [B, k] (descending,
    -inf when empty) and index [B, k] (the query rows). Earlier chunks hold lower rows, and a stable
    sort keeps them ahead of equal scores: ties go to the lower index."""
    masked = block.masked_fill(column_exclusions(block, row_offset, opts, diag, ids), float("-inf"))
    rows = torch.arange(row_offset, row_offset + block.shape[0], device=block.device)
    candidates = torch.cat([values, masked.T], dim=1)
    ranked = torch.sort(candidates, dim=1, descending=True, stable=True)
    k = values.shape[1]
    chosen = ranked.indices[:, :k]
    merged_index = torch.cat([index, rows.expand(block.shape[1], -1)], dim=1).gather(1, chosen)
    values.copy_(ranked.values[:, :k])
    index.copy_(merged_index)


def topk_loss(pos, values, indices, cols, opts: DirectionOptions, row_scale, loss, index, coef,
              temperature_grad=None):  # fmt: skip
    """Loss and sparse gradient of rows whose negatives are already selected: `pos` [rows] the
    positives' scores, `values` [rows, k] the selected negatives' scores (-inf: empty slot),
    `indices` their candidate indices, `cols` the positives'. Fills loss, index [rows, k + 1]
    (positive first, -1 for empty slots), and with row_scale coef [rows, k + 1] and temperature_grad."""
    valid = values > float("-inf")
    pos_logit = pos * opts.inv_temperature
    logits = torch.cat([pos_logit[:, None], values * (opts.inv_temperature + opts.hardness)], dim=1)
    logits[:, 1:].masked_fill_(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    torch.sub(lse, pos_logit, out=loss)
    index[:, 0] = cols
    index[:, 1:] = indices.masked_fill(~valid, -1)
    if coef is not None:
        torch.exp(logits - lse[:, None], out=coef)
        coef[:, 0] -= 1.0
        coef.mul_((row_scale * opts.inv_temperature)[:, None])
        if temperature_grad is not None:
            # Σ_t coef_t·(s_t - s_pos): Σ_t coef_t = 0, so nothing cancels against the positive's.
            selected = torch.cat([torch.zeros_like(pos)[:, None], (values - pos[:, None]).masked_fill(~valid, 0.0)], 1)
            torch.sum(coef * selected, dim=1, out=temperature_grad)


class SymmetricColumns:
    """The column half of one symmetric call on one process: its running statistics (dense) or
    selection (top-k), filled chunk by chunk by directional_loss, and its loss and gradient.

    directional_loss calls `see(start, block)` for each chunk before its row kernel touches the
    scores: in a statistics pass of its own when `first_pass` (dense with a gradient), else in the
    row pass itself. `finish_stats()` after the statistics pass provides `terms` for the row kernel;
    `finish()` after the row pass returns the column losses (and applies the top-k gradient)."""

    def __init__(self, kernels, query, target, opts: DirectionOptions, row_scale, score_dtype, *, ids=None,
                 temperature_grad=None):  # fmt: skip
        b = query.shape[0]
        self.kernels, self.query, self.target, self.ids = kernels, query, target, ids
        self.row_scale, self.temperature_grad = row_scale, temperature_grad
        # B·D work (an einsum would be a batched GEMM of B 1×D·D×1 products, 3× slower on CPU).
        self.diag = torch.linalg.vecdot(query.to(score_dtype), target.to(score_dtype))
        self.loss = torch.empty(b, dtype=score_dtype, device=query.device)
        self.terms = None
        self.fused_rows = False  # set when the row pass took the fused Triton path (no column half)
        if opts.topk is None:
            self.opts = opts
            self.first_pass = row_scale is not None
            self.bytes_per_score = kernels.column_dense_bytes_per_score if self.first_pass else 0
            # Seeded with the positive (exp(0) = 1); its logit is this very product wherever it is read.
            self.positive_logit = self.diag * opts.inv_temperature
            self.max = self.positive_logit.clone()
            self.sum = torch.ones(b, dtype=torch.float64, device=query.device)
            self.weighted = None if temperature_grad is None else torch.zeros_like(self.sum)
        else:
            # A column has at most B - 1 negatives, as the reverse direction of the unfused loss.
            self.opts = DirectionOptions(opts.inv_temperature, opts.hardness, opts.false_negative_margin,
                                         max(1, min(opts.topk, b - 1)))  # fmt: skip
            self.first_pass = False
            self.bytes_per_score = kernels.column_topk_bytes_per_score
            self.values = torch.full((b, self.opts.topk), float("-inf"), dtype=score_dtype, device=query.device)
            self.index = torch.full((b, self.opts.topk), -1, dtype=torch.int64, device=query.device)

    def see(self, start: int, block: torch.Tensor) -> None:
        if self.opts.topk is None:
            self.kernels.column_stats(block, start, self.opts, self.diag, self.ids, self.max, self.sum, self.weighted)
        else:
            self.kernels.column_topk(block, start, self.opts, self.diag, self.ids, self.values, self.index)

    def finish_stats(self) -> None:
        lse = self.max.double() + torch.log(self.sum)
        positive = self.positive_logit.double() - lse  # log p_ii: exactly 0 for a column without negatives
        self.loss.copy_(-positive)
        if self.row_scale is not None:
            coef = self.row_scale * self.opts.inv_temperature
            grad_positive = (coef.double() * torch.expm1(positive)).to(coef.dtype)
            self.terms = ColumnTerms(self.diag, lse.to(self.diag.dtype), coef, grad_positive, self.ids)
            if self.weighted is not None:  # Σ_j G_ji·s_ji = c_i/τ·Σ_j p_ji·(s_ji - d_i)
                self.temperature_grad.copy_(coef * (self.weighted / self.sum))

    def finish(self, grad_target: torch.Tensor | None, grad_query: torch.Tensor | None) -> torch.Tensor:
        if self.opts.topk is None:
            if not self.first_pass:
                self.finish_stats()
            return self.loss
        # B·(k + 1) numbers: in float64 on every backend, as the C++ row kernel computes its rows.
        b, device, wide = self.diag.shape[0], self.diag.device, torch.float64
        slots = (b, self.opts.topk + 1)
        index = torch.empty(slots, dtype=torch.int64, device=device)
        coef = None if self.row_scale is None else torch.empty(slots, dtype=wide, device=device)
        loss = torch.empty(b, dtype=wide, device=device)
        w = None if self.temperature_grad is None else torch.empty(b, dtype=wide, device=device)
        inv_t = self.opts.inv_temperature
        opts = dataclasses.replace(
            self.opts, inv_temperature=inv_t.double() if isinstance(inv_t, torch.Tensor) else inv_t
        )
        row_scale = None if self.row_scale is None else self.row_scale.double()
        topk_loss(self.diag.double(), self.values.double(), self.index, torch.arange(b, device=device), opts, row_scale,
                  loss, index, coef, w)  # fmt: skip
        self.loss.copy_(loss)
        if w is not None:
            self.temperature_grad.copy_(w)
        if coef is not None:
            coef = coef.to(self.diag.dtype)
            self.kernels.sparse_grads(self.target, [self.query], index, coef, grad_target, [grad_query])
        return self.loss

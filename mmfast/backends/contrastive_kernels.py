"""The contrastive loss's kernel sets: what the chunk loop (backends/contrastive_loss.py) calls per
chunk of rows. Each provides the GEMMs (`gemms(path)`: scores, dense gradients), the dense row kernel
(`softmax_rows`: masks, hardness, exact logsumexp, G over S), the top-k row kernel and its sparse
gradient (`topk_rows`, `sparse_grads`), the symmetric loss's column kernels (`column_stats`,
`column_topk`; backends/contrastive_columns.py), and the scratch bytes each needs per score.

  torch   TorchContrastiveKernels: pure PyTorch, GEMMs through torch.mm
  cpu     CpuContrastiveKernels: the C++ row and column kernels (csrc/contrastive_loss*.cpp), MKL GEMMs
  triton  kernels/contrastive_loss.TritonContrastiveKernels, with the torch set as its fallback and
          its own paths (chunked, cublas, fused)
"""

from __future__ import annotations

import functools

import torch

from mmfast._extension import load_extension
from mmfast.backends.chunked import CublasGemms, TorchGemms
from mmfast.backends.contrastive_columns import (
    ColumnTerms,
    topk_loss,
    torch_column_grads,
    torch_column_stats,
    torch_column_topk,
)
from mmfast.kernel_contract import DirectionOptions


class TorchContrastiveKernels(TorchGemms):
    """Pure-PyTorch row kernels; GEMMs through torch.mm (MKL on CPU, cuBLAS on CUDA)."""

    # Scratch bytes per score element: S plus logsumexp's temporary and the margin mask (dense), or
    # S plus a stable sort's values and int64 indices (top-k); plus, for the dense temperature
    # reduction, what a kernel keeps of the raw scores (here a copy).
    dense_bytes_per_score = 9
    topk_bytes_per_score = 17
    temperature_bytes_per_score = 4
    # The symmetric loss's column half (contrastive_columns.py): its gradient on the block and the
    # exclusion mask (dense); the merge's candidates, a stable sort's values and indices (top-k).
    column_dense_bytes_per_score = 5
    column_topk_bytes_per_score = 17

    def path(self, n_rows, n_candidates, dim, dtype, opts, *, chunk, device, gradients=True) -> str:
        """Which path runs this problem: the torch and cpu kernel sets have one, the chunk loop around
        their own GEMMs (the triton set chooses among several, kernels/contrastive_loss.py)."""
        return "chunked"

    def gemms(self, path: str):
        """The GEMMs the chunk loop calls on `path`."""
        return self

    def softmax_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, grad_out,
                     temperature_grad=None, ids=None, columns: ColumnTerms | None = None):  # fmt: skip
        """Loss of each row into `loss`; with row_scale, G into grad_out (here always `scores`), and
        with `temperature_grad` w_i = Σ_j G_ij·s_ij into it. With `columns` (a symmetric loss's
        column half, mmfast/backends/contrastive_columns.py) G also gets the column gradient on the
        first B columns."""
        column_grads = None
        if columns is not None and row_scale is not None:  # from the raw scores, before they change
            column_grads = torch_column_grads(scores[:, : columns.lse.shape[0]], row_offset, opts, columns)
        rows = torch.arange(scores.shape[0], device=scores.device)
        cols = rows + row_offset
        raw = scores.clone() if temperature_grad is not None else None
        pos = scores[rows, cols].clone()
        margin = opts.false_negative_margin
        excluded = scores > (pos + margin)[:, None] if margin is not None else None
        if ids is not None:
            duplicates = ids[None, :] == ids[cols][:, None]
            excluded = duplicates if excluded is None else excluded.logical_or_(duplicates)
        scores.mul_(opts.inv_temperature + opts.hardness)
        if excluded is not None:
            scores.masked_fill_(excluded, float("-inf"))
        pos_logit = pos * opts.inv_temperature
        scores[rows, cols] = pos_logit
        lse = torch.logsumexp(scores, dim=1)
        if row_scale is not None:
            coef = row_scale * opts.inv_temperature
            scores.sub_(lse[:, None]).exp_().mul_(coef[:, None])
            if raw is not None:
                # Σ_j G_j·s_j = Σ_j coef·p_j·(s_j - s_pos), as Σ_j G_j = 0: no cancellation against
                # the positive's coef·(p_pos - 1).
                temperature_grad.copy_(torch.einsum("rn,rn->r", scores, raw.sub_(pos[:, None])))
            scores[rows, cols] -= coef
            if column_grads is not None:
                scores[:, : column_grads.shape[1]] += column_grads
        torch.sub(lse, pos_logit, out=loss)

    def topk_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, index, coef,
                  temperature_grad=None, ids=None):  # fmt: skip
        rows = torch.arange(scores.shape[0], device=scores.device)
        cols = rows + row_offset
        pos = scores[rows, cols].clone()
        if opts.false_negative_margin is not None:
            scores.masked_fill_(scores > (pos + opts.false_negative_margin)[:, None], float("-inf"))
        if ids is not None:
            scores.masked_fill_(ids[None, :] == ids[cols][:, None], float("-inf"))
        scores[rows, cols] = float("-inf")
        # A stable descending sort breaks ties toward the lower index, as the C++ kernel does.
        ranked = torch.sort(scores, dim=1, descending=True, stable=True)
        # Slots past the number of candidates (k > N - 1) stay empty: index -1, coefficient 0.
        kept = min(opts.topk, scores.shape[1])
        values = torch.full((scores.shape[0], opts.topk), float("-inf"), dtype=scores.dtype, device=scores.device)
        values[:, :kept] = ranked.values[:, :kept]
        indices = torch.full_like(values, -1, dtype=torch.int64)
        indices[:, :kept] = ranked.indices[:, :kept]
        topk_loss(pos, values, indices, cols, opts, row_scale, loss, index, coef, temperature_grad)

    column_stats = staticmethod(torch_column_stats)
    column_topk = staticmethod(torch_column_topk)

    def sparse_grads(self, x, pieces, index, coef, grad_x, grad_pieces):
        valid = index >= 0
        coef = coef.masked_fill(~valid, 0.0)
        start = 0
        for piece, grad_piece in zip(pieces, grad_pieces, strict=True):
            inside = valid & (index >= start) & (index < start + piece.shape[0])
            local = (index - start).masked_fill(~inside, 0)
            weights = coef.masked_fill(~inside, 0.0)
            if grad_x is not None:
                grad_x += torch.einsum("rt,rtd->rd", weights, piece[local].to(weights.dtype))
            if grad_piece is not None:
                contributions = weights[:, :, None] * x[:, None, :].to(weights.dtype)
                grad_piece.index_add_(0, local.flatten(), contributions.flatten(0, 1))
            start += piece.shape[0]


class CpuContrastiveKernels(TorchContrastiveKernels):
    """The C++ row kernels (csrc/contrastive_loss.cpp); GEMMs stay on MKL through torch.mm."""

    dense_bytes_per_score = 4
    topk_bytes_per_score = 4
    temperature_bytes_per_score = 0  # the kernel keeps S intact until G overwrites it
    column_dense_bytes_per_score = 0  # the row kernel keeps one row of column gradients per thread
    column_topk_bytes_per_score = 0

    def __init__(self, extension):
        self.ext = extension

    # A temperature tensor is on the CPU here: float() reads it without a device sync.
    def softmax_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, grad_out,
                     temperature_grad=None, ids=None, columns: ColumnTerms | None = None):  # fmt: skip
        terms = (None,) * 5 if columns is None else (columns.diag, columns.lse, columns.coef, columns.positive,
                                                     columns.ids)  # fmt: skip
        self.ext.contrastive_softmax_rows(
            scores, row_offset, float(opts.inv_temperature), opts.hardness, opts.false_negative_margin, row_scale,
            loss, temperature_grad, ids, *terms,
        )  # fmt: skip

    def matryoshka_rows_supports(self, m: int, dtype: torch.dtype, opts: DirectionOptions) -> bool:
        """Whether `matryoshka_rows` takes these rows: dense ones (top-k takes the generic path)."""
        return opts.topk is None

    def matryoshka_rows(self, blocks, row_offset, opts: DirectionOptions, a, b, row_scale, loss, alpha, beta, ids):
        """Matryoshka's dense rows, fused (backends/contrastive_matryoshka.py)."""
        self.ext.contrastive_matryoshka_rows(
            blocks, row_offset, float(opts.inv_temperature), opts.hardness, opts.false_negative_margin, a, b,
            row_scale, loss, alpha, beta, ids,
        )  # fmt: skip

    def column_stats(self, block, row_offset, opts: DirectionOptions, diag, ids, running_max, running_sum,
                     weighted=None):  # fmt: skip
        self.ext.contrastive_column_stats(
            block, row_offset, float(opts.inv_temperature), opts.hardness, opts.false_negative_margin, diag, ids,
            running_max, running_sum, weighted,
        )  # fmt: skip

    def column_topk(self, block, row_offset, opts: DirectionOptions, diag, ids, values, index):
        self.ext.contrastive_column_topk(block, row_offset, opts.false_negative_margin, diag, ids, values, index)

    def topk_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, index, coef,
                  temperature_grad=None, ids=None):  # fmt: skip
        self.ext.contrastive_topk_rows(
            scores, row_offset, float(opts.inv_temperature), opts.hardness, opts.false_negative_margin, opts.topk,
            row_scale, loss, index, coef, temperature_grad, ids,
        )  # fmt: skip

    def sparse_grads(self, x, pieces, index, coef, grad_x, grad_pieces):
        negatives = pieces[1] if len(pieces) > 1 else None
        grad_negatives = grad_pieces[1] if len(pieces) > 1 else None
        self.ext.contrastive_sparse_grads(x, pieces[0], negatives, index, coef, grad_x, grad_pieces[0], grad_negatives)


@functools.cache
def contrastive_kernels(backend: str):
    """The kernel set of a resolved backend (one instance per backend)."""
    if backend == "cpu":
        return CpuContrastiveKernels(load_extension())
    if backend == "triton":
        from mmfast.kernels.contrastive_loss import TritonContrastiveKernels  # needs triton: imported when asked

        return TritonContrastiveKernels(fallback=TorchContrastiveKernels(), cublas=CublasGemms())
    return TorchContrastiveKernels()

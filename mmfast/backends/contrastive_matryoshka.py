"""One direction of a Matryoshka contrastive loss: every prefix d_1 < … < d_m of the embeddings, each
L2-normalised on its own, in one pass over D (mmfast/backends/contrastive_loss.py calls it in place
of its `directional_loss` when ContrastiveLossOptions.matryoshka_dims is set).

With a_k = 1/‖x[:d_k]‖ per row and b_k = 1/‖y[:d_k]‖ per candidate, the scores at prefix k are

    S_k = a_k · R_k · b_k,   R_k = x[:, :d_k] · y[:, :d_k]ᵀ = R_{k-1} + x[:, seg_k] · y[:, seg_k]ᵀ

so a chunk of rows computes the m segment products P_k = x[:, seg_k]·y[:, seg_k]ᵀ (one pass over D,
the GEMM work of one loss), and its kernel set's `matryoshka_rows` runs the prefixes' running sums
R_k, scales them to S_k and hands them to the ordinary row kernel of its backend (dense or top-k,
margin, hardness, duplicate ids: all the options of one direction): for dense rows in C++ per row
while the row's m blocks sit in cache (csrc/contrastive_loss.cpp) or in one Triton program per row
(kernels/contrastive_loss_matryoshka.py), elsewhere with torch ops (generic_matryoshka_rows).
With G_k = dLoss/dS_k the gradient of the raw embeddings is

    dx[:, seg_j] = Σ_{k≥j} (a_k G_k b_k) · y[:, seg_j]  −  x[:, seg_j] · Σ_{k≥j} α_k a_k²
    α_k = Σ_c G_k ⊙ S_k (row sums; β_k, the column sums, for dy)

The first term folds every prefix into one GEMM per segment (H_j = Σ_{k≥j} a_k G_k b_k, a suffix sum
of the m gradient blocks of the chunk), the second is the normalisation's radial term. The chunk
holds m blocks of [rows, N], the rows of one loss's chunk (so m times its scratch, flat in B): the
B × N matrix is never held, at any prefix. Σ_k α_k is also what a temperature tensor needs.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from mmfast.backends.chunked import chunk_rows, scratch
from mmfast.kernel_contract import DirectionOptions

NORM_EPS = 1e-12  # F.normalize's: y = x / max(‖x‖, eps)


def segments(dims: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(0, d_1), (d_1, d_2), …]: the columns each prefix adds to the one before."""
    return list(zip((0, *dims[:-1]), dims, strict=True))


def inverse_prefix_norms(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/max(‖x[:, :d_k]‖, eps), whether the norm exceeded eps), each [m, rows]; without the clamp the
    normalisation has a gradient."""
    # Each segment's sum of squares as one product with a [D, m] indicator: one pass over x, where m
    # reductions over strided column slices took 2.5x as long (61 against 24 ms at 4096 x 1024).
    indicator = torch.zeros(x.shape[1], len(dims), dtype=x.dtype, device=x.device)
    for k, (lo, hi) in enumerate(segments(dims)):
        indicator[lo:hi, k] = 1.0
    norms = (torch.mul(x, x) @ indicator).T.cumsum(0).sqrt()
    return 1.0 / norms.clamp(min=NORM_EPS), norms > NORM_EPS


def subtract_radial(grad: torch.Tensor, x: torch.Tensor, radial: torch.Tensor, dims: tuple[int, ...]) -> None:
    """grad[:, seg_j] -= x[:, seg_j] · radial[j] for every segment j (radial [m, rows]), in one pass:
    one op per segment on strided column slices took 4x as long (80 against 19 ms at 4096 x 1024)."""
    widths = torch.tensor([hi - lo for lo, hi in segments(dims)], device=x.device)
    per_column = torch.repeat_interleave(radial.T, widths, dim=1, output_size=dims[-1])
    grad[:, : dims[-1]].addcmul_(x[:, : dims[-1]], per_column, value=-1.0)


def matryoshka_directional_loss(
    kernels,
    x: torch.Tensor,
    pieces: list[torch.Tensor],
    dims: tuple[int, ...],
    opts: DirectionOptions,
    *,
    row_scale: torch.Tensor | None,
    grad_x: torch.Tensor | None,
    grad_pieces: list[torch.Tensor | None],
    score_dtype: torch.dtype,
    positive_offset: int = 0,
    temperature_grad: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-prefix, per-row loss [m, rows] of `x` against the candidates `pieces`; row i's positive is
    candidate positive_offset + i. `row_scale` [m, rows]: dTotal/dLoss[k, i]; gradients are ADDED into
    grad_x / grad_pieces (None entries skipped; buffers start at zero), and Σ_k α_k into
    `temperature_grad` [rows] when given (w_i of mmfast/backends/contrastive_loss.py)."""
    m, n_rows = len(dims), x.shape[0]
    widths = [p.shape[0] for p in pieces]
    n_candidates = sum(widths)
    if opts.topk is not None:
        opts = dataclasses.replace(opts, topk=max(1, min(opts.topk, n_candidates - 1)))
    per_score = kernels.topk_bytes_per_score if opts.topk is not None else kernels.dense_bytes_per_score
    # The rows of one loss's chunk: the m blocks (segment products, then gradient blocks) take m times
    # its scratch. A budget shared by the m blocks would cut the rows m-fold, and the segment GEMMs
    # (K = d_k - d_{k-1}, as small as 64) then lose more than the memory saves (3.6x one loss's time
    # instead of 1.6x at B = 2048, D = 1024, m = 5, on 2 cores).
    chunk = chunk_rows(n_rows, n_candidates, per_score, score_dtype, x.device)
    gemms = kernels.gemms("chunked")
    a, a_live = inverse_prefix_norms(x, dims)
    piece_norms = [inverse_prefix_norms(p, dims) for p in pieces]
    b = torch.cat([inv for inv, _ in piece_norms], dim=1).contiguous()  # [m, N]
    loss = torch.empty(m, n_rows, dtype=score_dtype, device=x.device)
    block_buffer = scratch("matryoshka", m * chunk, n_candidates, score_dtype, x.device)
    wants_grad = row_scale is not None
    beta = torch.zeros(m, n_candidates, dtype=score_dtype, device=x.device) if wants_grad else None
    # The row kernel's G comes out times a_k (its row scale): a_k·G_k, which the kernel then scales by b_k.
    scaled_rows = None if not wants_grad else row_scale * a
    bounds = segments(dims)
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        rows = stop - start
        blocks = block_buffer[: m * rows].view(m, rows, n_candidates)
        for k, (lo, hi) in enumerate(bounds):  # P_k = x[:, seg_k]·y[:, seg_k]ᵀ: one pass over D in all
            gemms.scores(x[start:stop, lo:hi], [p[:, lo:hi] for p in pieces], blocks[k])
        a_chunk = a[:, start:stop].contiguous()
        alpha = torch.empty(m, rows, dtype=score_dtype, device=x.device) if wants_grad else None
        scale = None if not wants_grad else scaled_rows[:, start:stop].contiguous()
        matryoshka_rows = getattr(kernels, "matryoshka_rows", None)
        if matryoshka_rows is None or not kernels.matryoshka_rows_supports(m, score_dtype, opts):
            matryoshka_rows = functools.partial(generic_matryoshka_rows, kernels)
        chunk_loss = torch.empty(m, rows, dtype=score_dtype, device=x.device)
        matryoshka_rows(blocks, positive_offset + start, opts, a_chunk, b, scale, chunk_loss, alpha, beta, ids)
        loss[:, start:stop] = chunk_loss
        if not wants_grad:
            continue
        radial = (alpha * a_chunk.square() * a_live[:, start:stop]).flip(0).cumsum(0).flip(0)  # Σ_{k≥j}
        if temperature_grad is not None:
            temperature_grad[start:stop] += alpha.sum(0)
        grad_x_chunk = None if grad_x is None else grad_x[start:stop]
        for j, (lo, hi) in enumerate(bounds):  # blocks[j] holds H_j = Σ_{k≥j} a_k·G_k·b_k
            x_seg = x[start:stop, lo:hi]
            gemms.dense_grads(
                blocks[j], x_seg, [p[:, lo:hi] for p in pieces],
                None if grad_x_chunk is None else grad_x_chunk[:, lo:hi],
                [None if g is None else g[:, lo:hi] for g in grad_pieces], True, True,
            )  # fmt: skip
        if grad_x_chunk is not None:
            subtract_radial(grad_x_chunk, x[start:stop], radial, dims)
    if wants_grad:
        col = 0
        for piece, (inv, live), grad_piece, width in zip(pieces, piece_norms, grad_pieces, widths, strict=True):
            if grad_piece is not None:
                radial = (beta[:, col : col + width] * inv.square() * live).flip(0).cumsum(0).flip(0)
                subtract_radial(grad_piece, piece, radial, dims)
            col += width
    return loss


def generic_matryoshka_rows(kernels, blocks, row_offset, opts: DirectionOptions, a, b, row_scale, loss, alpha, beta,
                            ids):  # fmt: skip
    """What the CPU set's `matryoshka_rows` (csrc/contrastive_loss.cpp) does, with torch ops around the
    kernel set's own row kernels (dense or top-k): `blocks` [m, rows, N] holds the segment products;
    the loss [m, rows] is written; with `row_scale` (a_k·dTotal/dLoss) blocks end as H_j, `alpha` gets
    α_k [m, rows] and `beta` [m, N] adds β_k."""
    m, rows, n_candidates = blocks.shape
    raw = scratch("scores", rows, n_candidates, blocks.dtype, blocks.device)  # R_k, running
    wants_grad = row_scale is not None
    for k in range(m):
        if k == 0:
            raw.copy_(blocks[0])
        else:
            raw += blocks[k]
        scores = torch.mul(raw, b[k][None, :], out=blocks[k]).mul_(a[k][:, None])
        scale = None if not wants_grad else row_scale[k]
        if opts.topk is None:
            kernels.softmax_rows(scores, row_offset, opts, scale, loss[k], scores if wants_grad else None, None, ids)
        else:
            index = torch.empty(rows, opts.topk + 1, dtype=torch.int64, device=blocks.device)
            coef = torch.empty(rows, opts.topk + 1, dtype=blocks.dtype, device=blocks.device) if wants_grad else None
            kernels.topk_rows(scores, row_offset, opts, scale, loss[k], index, coef, None, ids)
            if wants_grad:  # the sparse G, spread into the block: the fold is dense
                valid = index >= 0
                scores.zero_().scatter_add_(1, index.clamp(min=0), coef.masked_fill(~valid, 0.0))
        if wants_grad:
            scores.mul_(b[k][None, :])  # a_k·G_k·b_k = dLoss/dR_k
            # Σ_c G_k ⊙ S_k = Σ_c (a_k·G_k·b_k) ⊙ R_k, by rows and by columns.
            alpha[k] = torch.einsum("rn,rn->r", scores, raw)
            beta[k] += torch.einsum("rn,rn->n", scores, raw)
    if wants_grad:
        for k in range(m - 2, -1, -1):  # H_j = Σ_{k≥j} a_k·G_k·b_k
            blocks[k] += blocks[k + 1]

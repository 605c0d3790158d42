"""The chunk loop of the Triton kernel set's fused path (kernels/contrastive_loss_fused.py), which
mmfast.backends.contrastive_loss.directional_loss hands a direction to when the kernel set's `path`
says "fused": per chunk of rows the score GEMM (row statistics in its epilogue), G (in the dX GEMM's
prologue, or in a pass of its own before a cuBLAS dX GEMM) and the cuBLAS dY GEMM, all in
`kernels.fused_chunk`.
"""

from __future__ import annotations

import functools

import torch

from mmfast.backends.chunked import chunk_rows


def fused_directional_loss(kernels, x, pieces, opts, *, row_scale, grad_x, grad_pieces, accumulate, positive_offset,
                           temperature_grad, ids) -> torch.Tensor:  # fmt: skip
    """directional_loss on the fused path (kernels.fused_chunk): float32 S and G buffers per chunk of
    rows when a gradient is wanted; without one the kernels keep only per-tile row statistics and
    every row is one chunk."""
    n_rows, width = x.shape[0], kernels.fused_buffer_width(pieces)
    want_grad = row_scale is not None
    per_score = kernels.fused_bytes_per_score[x.dtype] if want_grad else 0
    chunk = chunk_rows(n_rows, width, per_score, torch.float32, x.device) if want_grad else n_rows
    new = functools.partial(torch.empty, device=x.device)
    scratch = new(chunk, width, dtype=torch.float32) if want_grad else None
    grad_scratch = new(chunk, width, dtype=x.dtype) if want_grad else None
    loss = new(n_rows, dtype=torch.float32)
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        grads = {}
        if want_grad:
            grads = dict(
                scores=scratch[: stop - start], grads=grad_scratch[: stop - start], row_scale=row_scale[start:stop],
                grad_x=None if grad_x is None else grad_x[start:stop], grad_pieces=grad_pieces,
                accumulate_x=accumulate, accumulate_pieces=accumulate or start > 0,
                temperature_grad=None if temperature_grad is None else temperature_grad[start:stop],
            )  # fmt: skip
        kernels.fused_chunk(x[start:stop], pieces, opts, positive_offset + start, loss[start:stop], ids, **grads)
    return loss

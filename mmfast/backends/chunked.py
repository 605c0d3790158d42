"""What every chunked op shares: the scratch budget and the GEMMs around the row kernels.

A chunked op computes a [rows, N] block of scores at a time (S = X_chunk·Yᵀ, with the candidates Y
kept as a list of pieces that are never concatenated), runs its fused row kernel over the block, and
finishes with two GEMMs (dX_chunk = G·Y, dY += Gᵀ·X_chunk). TorchGemms does the GEMMs with torch.mm
(MKL on CPU, cuBLAS on CUDA); kernels/matmul.TritonGemms with Triton (and TorchGemms for float64).
Scores, losses and gradient buffers are in mmfast.kernel_contract.compute_dtype of the inputs.
"""

from __future__ import annotations

import os
import warnings

import torch


# Scratch budget for one chunk of scores, per device type; None means "the default for the device".
# CPU: 32 MiB keeps chunks at >= 256 rows (efficient MKL GEMMs) up to N = 32768 candidates and the
# working set under 64 MiB at N = 131072. CUDA: each chunk re-reads the candidates and read-modify-
# writes their float32 gradient, so a chunk needs >= ~1000 rows to stay compute-bound on an H100
# (benchmarks/gpu_report.py); 1 GiB gives that up to N = 131072.
def _bytes_from_environment(name: str) -> int | None:
    """An integer byte count, optionally with a K/M/G suffix (powers of 1024); a bad value is ignored
    with a warning rather than breaking `import mmfast`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        scale = units.get(text[-1].upper(), 1)
        value = int(text[:-1] if text[-1].upper() in units else text) * scale
        if value <= 0:
            raise ValueError
        return value
    except ValueError:
        warnings.warn(
            f"mmfast: ignoring {name}={text!r}: expected a positive byte count such as 33554432 or 32M", stacklevel=2
        )
        return None


SCORE_CHUNK_BYTES: int | None = _bytes_from_environment("MMFAST_SCORE_CHUNK_BYTES")
DEFAULT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 1 << 30}


def chunk_rows(n_rows: int, n_candidates: int, bytes_per_score: int, score_dtype: torch.dtype, device) -> int:
    """Rows per chunk: the scratch budget over the bytes one row of scores needs (float64 doubles it)."""
    budget = SCORE_CHUNK_BYTES or DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cpu"])
    per_row = max(1, n_candidates * bytes_per_score * torch.finfo(score_dtype).bits // 32)
    return max(1, min(n_rows, budget // per_row))


def work_copy(t: torch.Tensor, compute: torch.dtype, native_low_precision: bool) -> torch.Tensor:
    """`t` as a chunk loop hands it to its kernels: contiguous, and in the compute dtype, except that
    bf16/fp16 stay as they are for kernels that read them natively (`native_low_precision`: the Triton
    GEMMs accumulate in float32). torch.mm on bf16/fp16 would round the scores to 8 mantissa bits."""
    native = native_low_precision and t.dtype in (torch.bfloat16, torch.float16) and compute == torch.float32
    return t.contiguous() if native else t.to(compute).contiguous()


class TorchGemms:
    native_low_precision = False  # see work_copy

    def grad_dtype(self, score_dtype: torch.dtype, embedding_dtype: torch.dtype) -> torch.dtype:
        """The dtype of G = dLoss/dS; when it is the scores' dtype, G overwrites the scores."""
        return score_dtype

    def scores(self, x: torch.Tensor, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        col = 0
        for piece in pieces:
            torch.mm(x, piece.T, out=out[:, col : col + piece.shape[0]])
            col += piece.shape[0]

    def dense_grads(self, grad_scores, x, pieces, grad_x, grad_pieces, accumulate_x, accumulate_pieces):
        col = 0
        for i, piece in enumerate(pieces):
            g = grad_scores[:, col : col + piece.shape[0]]
            col += piece.shape[0]
            if grad_x is not None:
                if i == 0 and not accumulate_x:
                    torch.mm(g, piece, out=grad_x)
                else:
                    grad_x.addmm_(g, piece)
            if grad_pieces[i] is not None:
                if accumulate_pieces:
                    grad_pieces[i].addmm_(g.T, x)
                else:
                    torch.mm(g.T, x, out=grad_pieces[i])

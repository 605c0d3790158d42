"""What every chunked op shares: the scratch budget and the GEMMs around the row kernels.

A chunked op computes a [rows, N] block of scores at a time (S = X_chunk·Yᵀ, with the candidates Y
kept as a list of pieces that are never concatenated), runs its fused row kernel over the block, and
finishes with two GEMMs (dX_chunk = G·Y, dY += Gᵀ·X_chunk). TorchGemms does the GEMMs with torch.mm
(MKL on CPU, cuBLAS on CUDA) in the compute dtype; CublasGemms with torch.mm on bf16/fp16 operands
into float32 (the triton backend's "cublas" path); kernels/matmul.TritonGemms with Triton (and
TorchGemms for float64).
Scores, losses and gradient buffers are in mmfast.kernel_contract.compute_dtype of the inputs.
"""

from __future__ import annotations

import functools
import os
import threading
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


class _ScratchPool(threading.local):
    """Per thread: one flat buffer per (role, dtype) on the CPU, grown to the largest request."""

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_SCRATCH = _ScratchPool()


def scratch(role: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A [rows, cols] scratch buffer for one chunk loop, its contents undefined (as torch.empty's).

    On the CPU the buffer is kept between calls, per thread and `role` (each buffer a loop holds at
    once has its own: "scores", "grads", "teacher"): a fresh 32 MiB allocation is mmap'ed by glibc and
    its first write page-faults and zeroes every page, 7 ms at B = 4096 on 2 cores, 7% of a
    contrastive loss's step. It holds at most the chunk budget per role, or one row of scores when a
    row alone is larger (release_scratch frees it).
    Elsewhere it is torch.empty: CUDA's caching allocator already reuses the memory."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key, numel = (role, dtype), rows * cols
    buffer = _SCRATCH.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        _SCRATCH.buffers.pop(key, None)  # let the old one go before the new one is allocated
        # A normal tensor even when the first call runs under torch.inference_mode: an inference
        # tensor could not be written outside it, and a normal one can be written inside it.
        with torch.inference_mode(False):
            buffer = _SCRATCH.buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(rows, cols)


def release_scratch() -> None:
    """Frees this thread's CPU scratch buffers (the next chunk loop allocates afresh)."""
    _SCRATCH.buffers.clear()


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

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        """out (+)= a @ b, in out's dtype."""
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)

    def scores(self, x: torch.Tensor, pieces: list[torch.Tensor], out: torch.Tensor) -> None:
        col = 0
        for piece in pieces:
            self.matmul(x, piece.T, out[:, col : col + piece.shape[0]], accumulate=False)
            col += piece.shape[0]

    def dense_grads(self, grad_scores, x, pieces, grad_x, grad_pieces, accumulate_x, accumulate_pieces):
        col = 0
        for i, piece in enumerate(pieces):
            g = grad_scores[:, col : col + piece.shape[0]]
            col += piece.shape[0]
            if grad_x is not None:
                self.matmul(g, piece, grad_x, accumulate=accumulate_x or i > 0)
            if grad_pieces[i] is not None:
                self.matmul(g.T, x, grad_pieces[i], accumulate=accumulate_pieces)


class CublasGemms(TorchGemms):
    """torch.mm GEMMs that read bf16/fp16 operands as they are (G too, in the embeddings' dtype) and
    write float32 scores and gradients. On CUDA through cuBLAS's float32 output from 16-bit inputs
    (torch.mm / torch.addmm with out_dtype=torch.float32, pytorch#150812; float32 accumulation). That
    overload exists only on CUDA: elsewhere (the tests, on CPU under the Triton interpreter) the
    operands are copied to float32 first, which rounds nothing (bf16/fp16 → float32 is exact) and
    costs one float32 copy of each operand per GEMM."""

    native_low_precision = True

    def grad_dtype(self, score_dtype: torch.dtype, embedding_dtype: torch.dtype) -> torch.dtype:
        return score_dtype if embedding_dtype == torch.float64 else embedding_dtype

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        if a.dtype == out.dtype:
            return super().matmul(a, b, out, accumulate)
        if not a.is_cuda:
            return super().matmul(a.to(out.dtype), b.to(out.dtype), out, accumulate)
        if not accumulate:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        elif cublas_adds_into_float32(out.device):
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:  # an older torch wants C in the inputs' dtype: the product through a float32 temporary
            out.add_(torch.mm(a, b, out_dtype=out.dtype))


@functools.cache
def cublas_adds_into_float32(device: torch.device) -> bool:
    """Whether torch.addmm(c, a, b, out_dtype=float32, out=c) takes a float32 C with bf16 a, b here
    (newer torch does; some versions required C in the inputs' dtype). Asked once per device."""
    c = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(c, one, one, out_dtype=torch.float32, out=c)
    except RuntimeError:
        return False
    return c.item() == 1.0

"""Triton kernels of mmfast.late_interaction_loss's backward (the forward is kernels/late_interaction_loss.py).

From G = dLoss/dS [B, N] (float32) and the forward's int32 arg-max [B·L_q, N], the gradient runs only
through the winning document token of each (query token t of query i, candidate j):

    dQ[i, t]        = Σ_j  G[i, j] · D_j[argmax[i, t, j]]                        (real t only)
    dD_j[s]         = Σ over (i, t) with argmax[i, t, j] = s of  G[i, j] · Q[i, t]

Both read B·L_q·N token rows of D floats: 1/L_d of the forward GEMM's work, memory-bound, and no
token score is recomputed. Neither kernel has an atomic, and both sum in a fixed order, so the
gradients are deterministic (bit-identical from run to run):

- grad_query: grid (query-token blocks, D blocks). A program owns BLOCK_M query-token rows and walks
  the candidates in order, gathering each row's winning document token (a [BLOCK_M, BLOCK_D] load)
  and adding it times G[i, j]; padding query tokens load nothing. It accumulates into a float32 dQ
  across the candidate pieces (documents, then negatives).
- grad_documents: a segmented sum. Above this file (mmfast/backends/late_interaction_loss.py) the
  (query token, document) pairs of a chunk of documents are sorted, stably, by their winning document
  token (torch.sort on the int32 key doc·L + argmax; padding query tokens get a key past the end),
  and searchsorted gives each document token its segment. Grid (document tokens, D blocks): a program
  owns one document token, sums its segment's G[i, j]·Q[i, t] BLOCK_R winners at a time and writes
  the row once (a token no query token chose gets 0). No contention: every output row has one
  writer. The alternatives: atomic adds into dD (contended: most winners of a document fall on a few
  tokens, and float atomics are not deterministic), or a one-hot [L_d, B·L_q] × [B·L_q, D] dot per
  document, which is the forward GEMM's work again (L_d times the sparse sum's).

Imports nothing from mmfast.backends: the chunk loop and the sort live above this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the inputs' dtypes the backward runs (float64 takes the torch loop)


@dataclass(frozen=True)
class GradConfig:
    block_rows: int  # query-token rows per program (grad_query) or winners per step (grad_documents)
    block_d: int
    num_warps: int
    num_stages: int


# No tl.dot here (gathers and FMAs on CUDA cores), so one config serves every dtype. Every variant is
# compiled for sm_80 and sm_90 by tests/test_compile.py (python -m mmfast.kernels.aot); none spills.
GRAD_QUERY_CONFIG = GradConfig(8, 128, 4, 1)
GRAD_DOCUMENTS_CONFIG = GradConfig(8, 128, 4, 1)


@triton.jit(do_not_specialize=["n_rows", "query_tokens", "n_docs", "doc_tokens", "dim", "stride_d", "col_offset",
                               "n_columns"])  # fmt: skip
def late_interaction_grad_query_kernel(
    grad_ptr, argmax_ptr, real_ptr, d_ptr, out_ptr,
    n_rows, query_tokens, n_docs, doc_tokens, dim, stride_d, col_offset, n_columns,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    real = tl.load(real_ptr + rows, mask=row_ok, other=0.0)
    gather_rows = row_ok & (real != 0)  # a padding query token loads nothing
    grad_rows = grad_ptr + (rows // query_tokens).to(tl.int64) * n_columns + col_offset
    index_rows = argmax_ptr + rows.to(tl.int64) * n_columns + col_offset
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for doc in range(0, n_docs):
        weight = tl.load(grad_rows + doc, mask=row_ok, other=0.0) * real
        token = tl.load(index_rows + doc, mask=row_ok, other=0).to(tl.int64) + doc * doc_tokens
        winner = tl.load(d_ptr + token[:, None] * stride_d + cols[None, :], mask=gather_rows[:, None] & col_ok[None, :],
                         other=0.0)  # fmt: skip
        acc += weight[:, None] * winner.to(tl.float32)
    out = out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=out_ok, other=0.0)
    tl.store(out, acc, mask=out_ok)


@triton.jit(do_not_specialize=["query_tokens", "chunk_docs", "dim", "stride_q", "col_offset", "n_columns"])
def late_interaction_grad_documents_kernel(
    grad_ptr, q_ptr, order_ptr, offsets_ptr, out_ptr,
    query_tokens, chunk_docs, dim, stride_q, col_offset, n_columns,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    start = tl.load(offsets_ptr + token)
    end = tl.load(offsets_ptr + token + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for first in range(start, end, BLOCK_R):
        at = first + tl.arange(0, BLOCK_R)
        ok = at < end
        pair = tl.load(order_ptr + at, mask=ok, other=0)  # row · chunk_docs + doc, in the sorted order
        row = pair // chunk_docs
        weight = tl.load(grad_ptr + (row // query_tokens) * n_columns + col_offset + pair % chunk_docs, mask=ok,
                         other=0.0)  # fmt: skip
        q = tl.load(q_ptr + row[:, None] * stride_q + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * q.to(tl.float32), axis=0)
    tl.store(out_ptr + token.to(tl.int64) * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def grad_query(grad_scores, argmax, real, documents, col_offset: int, out, accumulate: bool) -> None:
    """out [B·L_q, D] float32 (+)= the query gradient through one piece's documents [n, L, D], whose
    columns of grad_scores [B, N] float32 and argmax [B·L_q, N] int32 start at col_offset; real
    [B·L_q] float 0/1."""
    n_docs, doc_tokens, dim = documents.shape
    n_rows, n_columns = argmax.shape
    flat = documents.reshape(-1, dim)
    cfg = GRAD_QUERY_CONFIG
    late_interaction_grad_query_kernel[(triton.cdiv(n_rows, cfg.block_rows), triton.cdiv(dim, cfg.block_d))](
        grad_scores, argmax, real, flat, out,
        n_rows, n_rows // grad_scores.shape[0], n_docs, doc_tokens, dim, flat.stride(0), col_offset, n_columns,
        BLOCK_M=cfg.block_rows, BLOCK_D=cfg.block_d, ACCUMULATE=accumulate, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def grad_documents(grad_scores, query_rows, order, offsets, chunk_docs: int, col_offset: int, out) -> None:
    """out [c·L, D] (a chunk of c documents' gradient, in its dtype) = the segmented sums: order [P]
    int64 pairs row·c + doc sorted by winning token, offsets [c·L + 1] int64 each token's segment."""
    dim = query_rows.shape[1]
    query_tokens = query_rows.shape[0] // grad_scores.shape[0]
    cfg = GRAD_DOCUMENTS_CONFIG
    late_interaction_grad_documents_kernel[(out.shape[0], triton.cdiv(dim, cfg.block_d))](
        grad_scores, query_rows, order, offsets, out,
        query_tokens, chunk_docs, dim, query_rows.stride(0), col_offset, grad_scores.shape[1],
        BLOCK_R=cfg.block_rows, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def compile_specs():
    """Every variant the backward can launch: per input dtype, grad_query writing or accumulating."""
    from mmfast.kernels.compile_spec import CompileSpec

    for name in DTYPE_NAMES:
        for accumulate in (False, True):
            signature = {
                "grad_ptr": "*fp32", "argmax_ptr": "*i32", "real_ptr": "*fp32", "d_ptr": f"*{name}",
                "out_ptr": "*fp32", "n_rows": "i32", "query_tokens": "i32", "n_docs": "i32", "doc_tokens": "i32",
                "dim": "i32", "stride_d": "i32", "col_offset": "i32", "n_columns": "i32", "BLOCK_M": "constexpr",
                "BLOCK_D": "constexpr", "ACCUMULATE": "constexpr",
            }  # fmt: skip
            cfg = GRAD_QUERY_CONFIG
            yield CompileSpec(
                name=f"late_interaction_grad_query[{name},acc={int(accumulate)}]",
                kernel=late_interaction_grad_query_kernel, signature=signature,
                constexprs={"BLOCK_M": cfg.block_rows, "BLOCK_D": cfg.block_d, "ACCUMULATE": accumulate},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
        signature = {
            "grad_ptr": "*fp32", "q_ptr": f"*{name}", "order_ptr": "*i64", "offsets_ptr": "*i64",
            "out_ptr": f"*{name}", "query_tokens": "i32", "chunk_docs": "i32", "dim": "i32", "stride_q": "i32",
            "col_offset": "i32", "n_columns": "i32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
        }  # fmt: skip
        cfg = GRAD_DOCUMENTS_CONFIG
        yield CompileSpec(
            name=f"late_interaction_grad_documents[{name}]", kernel=late_interaction_grad_documents_kernel,
            signature=signature, constexprs={"BLOCK_R": cfg.block_rows, "BLOCK_D": cfg.block_d},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

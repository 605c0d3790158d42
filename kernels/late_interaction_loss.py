"""Triton kernels of mmfast.late_interaction_loss (the API is mmfast/late_interaction_loss.py): the
forward's MaxSim of query tokens against one document per program, the token scores never leaving
registers; the backward's two sparse passes through the stored arg-max.

Grid (query-token blocks, documents). A program holds BLOCK_M query tokens and walks its document's
tokens BLOCK_N at a time: a tl.dot tile (float32 accumulation), the padding's -inf bias added, the
tile's max per query token and its first maximal column, merged into the running max with a strict >
(an earlier tile keeps a tie): ties go to the lower document token, as on the other backends. It
writes the max and the arg-max per (query token, document); torch sums the real query tokens' maxima.

Backward, from G = dLoss/dS [B, N] (kernels/late_interaction_loss_grads.py): dQ by a gather per
query-token block (each program sums G[i, j]·D_j[argmax] over the candidates in order), dD by a
segmented sum over the (query token, document) pairs sorted by their winning document token (each
program owns one document token and sums its winners' G[i, j]·Q[i, t] in order). Neither uses an
atomic, and both are deterministic. float64 takes the torch backend's kernels (`fallback`).

Imports nothing from mmfast.backends: the chunk loop and validation live above this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mmfast.kernels.late_interaction_loss_grads import grad_documents, grad_query

NO_INDEX = tl.constexpr(2**31 - 1)


@dataclass(frozen=True)
class MaxsimConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# 16-bit inputs on tensor cores -> tile shape. Every entry is compiled for sm_80 and sm_90 by
# tests/test_compile.py (python -m mmfast.kernels.aot); none spills. Full-fp32 dots run on FMA units
# and take far more registers per product, hence the thin BLOCK_D.
MAXSIM_CONFIGS = {True: MaxsimConfig(64, 64, 32, 8, 2), False: MaxsimConfig(64, 64, 8, 8, 2)}
TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
TORCH_TO_TRITON_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit(do_not_specialize=["n_query_tokens", "doc_tokens", "dim", "stride_q", "stride_d", "col_offset",
                               "n_columns"])  # fmt: skip
def late_interaction_maxsim_kernel(
    q_ptr, d_ptr, bias_ptr, maxsim_ptr, argmax_ptr,
    n_query_tokens, doc_tokens, dim, stride_q, stride_d, col_offset, n_columns,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    doc = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_query_tokens
    rd = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for start in range(0, doc_tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < doc_tokens
        token = doc.to(tl.int64) * doc_tokens + cols
        d_cols = d_ptr + token[None, :] * stride_d
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(0, dim, BLOCK_D):
            a = tl.load(q_rows + (d + rd)[None, :], mask=row_ok[:, None] & ((d + rd)[None, :] < dim), other=0.0)
            b = tl.load(d_cols + (d + rd)[:, None], mask=col_ok[None, :] & ((d + rd)[:, None] < dim), other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        bias = tl.load(bias_ptr + token, mask=col_ok, other=float("-inf"))  # -inf: padding or past the end
        acc = acc + bias[None, :]
        tile_best = tl.max(acc, axis=1)
        tile_index = tl.min(tl.where(acc == tile_best[:, None], cols[None, :], NO_INDEX), axis=1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    out = rows.to(tl.int64) * n_columns + col_offset + doc
    tl.store(maxsim_ptr + out, best, mask=row_ok)
    tl.store(argmax_ptr + out, best_index, mask=row_ok)


def dot_dtype_for(dtype: torch.dtype):
    # triton's interpreter computes bf16×bf16 tl.dot wrongly: it gets float32 operands (exact
    # products either way); the compiled 16-bit path is checked by the AOT compile.
    if isinstance(late_interaction_maxsim_kernel, InterpretedFunction):
        return tl.float32
    return TORCH_TO_TRITON[dtype]


class TritonLateInteractionKernels:
    """The fused forward and the two backward kernels for float32/bf16/fp16 (the backward's chunk loop
    and sort: mmfast/backends/late_interaction_loss.py); `fallback` (the torch kernels) for float64."""

    dtypes = tuple(TORCH_TO_TRITON)

    def __init__(self, fallback):
        self.fallback = fallback

    def scores(self, query, query_mask, pieces):
        """(scores [B, N] float32, argmax [B, L_q, N] int32), as the chunk loop returns them."""
        n_queries, query_tokens, dim = query.shape
        n_total = sum(p.tokens.shape[0] for p in pieces)
        cfg = MAXSIM_CONFIGS[query.dtype != torch.float32]
        query_rows = query.reshape(-1, dim).contiguous()
        maxsim = torch.empty(n_queries * query_tokens, n_total, dtype=torch.float32, device=query.device)
        argmax = torch.empty(n_queries * query_tokens, n_total, dtype=torch.int32, device=query.device)
        col = 0
        for piece in pieces:
            n_docs, doc_tokens, _ = piece.tokens.shape
            documents = piece.tokens.reshape(-1, dim).contiguous()
            bias = torch.zeros(piece.mask.shape, device=query.device).masked_fill_(~piece.mask, float("-inf"))
            late_interaction_maxsim_kernel[(triton.cdiv(query_rows.shape[0], cfg.block_m), n_docs)](
                query_rows, documents, bias, maxsim, argmax,
                query_rows.shape[0], doc_tokens, dim, query_rows.stride(0), documents.stride(0), col, n_total,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_DTYPE=dot_dtype_for(query.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            col += n_docs
        real = query_mask.reshape(-1, 1)
        argmax.masked_fill_(~real, 0)
        scores = maxsim.masked_fill_(~real, 0).view(n_queries, query_tokens, n_total).sum(dim=1)
        return scores, argmax.view(n_queries, query_tokens, n_total)

    grad_query = staticmethod(grad_query)
    grad_documents = staticmethod(grad_documents)


def compile_specs():
    """Every variant `scores` can launch: one per input dtype."""
    from mmfast.kernels.compile_spec import CompileSpec

    for dtype, name in TORCH_TO_TRITON_NAMES.items():
        cfg = MAXSIM_CONFIGS[dtype != torch.float32]
        signature = {
            "q_ptr": f"*{name}", "d_ptr": f"*{name}", "bias_ptr": "*fp32", "maxsim_ptr": "*fp32", "argmax_ptr": "*i32",
            "n_query_tokens": "i32", "doc_tokens": "i32", "dim": "i32", "stride_q": "i32", "stride_d": "i32",
            "col_offset": "i32", "n_columns": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_D": "constexpr", "DOT_DTYPE": "constexpr",
        }  # fmt: skip
        constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
                      "DOT_DTYPE": TORCH_TO_TRITON[dtype]}  # fmt: skip
        yield CompileSpec(
            name=f"late_interaction_maxsim[{name}]", kernel=late_interaction_maxsim_kernel, signature=signature,
            constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

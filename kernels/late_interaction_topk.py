"""Triton kernel of mmfast.late_interaction_topk (the API is mmfast/late_interaction_topk.py): one tile
of MaxSim scores, the token scores never leaving registers.

Grid (queries, documents) of the tile. A program walks its query's tokens BLOCK_M at a time and, for
each block, its document's tokens BLOCK_N at a time: a tl.dot tile (float32 accumulation), the
padding's -inf bias added, the running max per query token. The maxima of the real query tokens are
summed (and divided by the query's length with a divisor) into one float32 score per (query,
document). No arg-max is kept: a search has no backward. The top-k merge of the tile is
mmfast.similarity_topk's torch merge, in the chunk loop above (mmfast/backends/late_interaction_topk.py).

Imports nothing from mmfast.backends: the chunk loop and validation live above this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@dataclass(frozen=True)
class MaxsimTileConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# 16-bit inputs on tensor cores -> tile shape. Every entry is compiled for sm_80 and sm_90 by
# tests/test_compile.py (python -m mmfast.kernels.aot); none spills. BLOCK_M = 32 holds a typical
# ColPali query (≤ 32 tokens) in one block; full-fp32 dots run on FMA units, hence the thin BLOCK_D.
MAXSIM_TILE_CONFIGS = {True: MaxsimTileConfig(32, 64, 32, 4, 2), False: MaxsimTileConfig(32, 64, 8, 4, 2)}
TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit(do_not_specialize=["query_tokens", "doc_tokens", "dim", "stride_q", "stride_d", "stride_out"])
def late_interaction_topk_maxsim_kernel(
    q_ptr, d_ptr, bias_ptr, real_ptr, divisor_ptr, out_ptr,
    query_tokens, doc_tokens, dim, stride_q, stride_d, stride_out,
    HAS_DIVISOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    query = tl.program_id(0)
    doc = tl.program_id(1)
    rd = tl.arange(0, BLOCK_D)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for first in range(0, query_tokens, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < query_tokens
        token_rows = query.to(tl.int64) * query_tokens + rows
        q_rows = q_ptr + token_rows[:, None] * stride_q
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
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
            best = tl.maximum(best, tl.max(acc + bias[None, :], axis=1))
        real = tl.load(real_ptr + token_rows, mask=row_ok, other=0.0)
        total += tl.where(real != 0, best, 0.0)
    score = tl.sum(total, axis=0)
    if HAS_DIVISOR:
        score = score / tl.load(divisor_ptr + query)
    tl.store(out_ptr + query.to(tl.int64) * stride_out + doc, score)


def dot_dtype_for(dtype: torch.dtype):
    # triton's interpreter computes bf16×bf16 tl.dot wrongly: it gets float32 operands (exact
    # products either way); the compiled 16-bit path is checked by the AOT compile.
    if isinstance(late_interaction_topk_maxsim_kernel, InterpretedFunction):
        return tl.float32
    return TORCH_TO_TRITON[dtype]


class TritonMaxsim:
    """tile_scores for float32/bf16/fp16 inputs (read as they are: float32 accumulation)."""

    dtypes = tuple(TORCH_TO_TRITON)

    def tile_scores(self, queries, documents, bias, real_query, divisor, out):
        """queries [r·L_q, D], documents [c·L_d, D] (contiguous rows), bias [c·L_d] and real_query
        [r·L_q] float32, divisor [r] float32 or None: writes the [r, c] float32 scores into `out`."""
        n_queries, n_docs = out.shape
        cfg = MAXSIM_TILE_CONFIGS[queries.dtype != torch.float32]
        late_interaction_topk_maxsim_kernel[(n_queries, n_docs)](
            queries, documents, bias, real_query, out if divisor is None else divisor, out,
            queries.shape[0] // n_queries, documents.shape[0] // n_docs, queries.shape[1], queries.stride(0),
            documents.stride(0), out.stride(0),
            HAS_DIVISOR=divisor is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            DOT_DTYPE=dot_dtype_for(queries.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip


def compile_specs():
    """Every variant `tile_scores` can launch: one per input dtype, with and without the divisor."""
    from mmfast.kernels.compile_spec import CompileSpec

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        cfg = MAXSIM_TILE_CONFIGS[dtype != torch.float32]
        for has_divisor in (False, True):
            signature = {
                "q_ptr": f"*{name}", "d_ptr": f"*{name}", "bias_ptr": "*fp32", "real_ptr": "*fp32",
                "divisor_ptr": "*fp32", "out_ptr": "*fp32", "query_tokens": "i32", "doc_tokens": "i32", "dim": "i32",
                "stride_q": "i32", "stride_d": "i32", "stride_out": "i32", "HAS_DIVISOR": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "DOT_DTYPE": "constexpr",
            }  # fmt: skip
            constexprs = {"HAS_DIVISOR": has_divisor, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                          "BLOCK_D": cfg.block_d, "DOT_DTYPE": TORCH_TO_TRITON[dtype]}  # fmt: skip
            yield CompileSpec(
                name=f"late_interaction_topk_maxsim[{name},divisor={int(has_divisor)}]",
                kernel=late_interaction_topk_maxsim_kernel, signature=signature, constexprs=constexprs,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

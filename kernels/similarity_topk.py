"""Triton kernel of mmfast.similarity_topk (the API is mmfast/similarity_topk.py): one fused pass,
the score tiles never leave registers.

Grid (query blocks, gallery splits). Each program owns BLOCK_M queries and one contiguous slice of
the gallery; per BLOCK_N-column tile it computes S = Q·Gᵀ with tl.dot (float32 accumulation),
counts the scores above each row's target score (the target set itself excluded), and merges the
tile into a running top-K_SLOTS per row. It writes those K_SLOTS candidates and the count per
(query, split); torch then takes the k best over the splits and sums the counts.

Ordering: each score becomes an int64 key, (order-preserving int32 of its float32 bits) << 32 |
(2³² - 1 - column), so a larger key is a higher score or, on a tie, the lower gallery index, and
every key is unique. Merging a tile: while some row's best remaining tile key beats its weakest
running key, replace that key (one reduction per step; most tiles after the first take a step or
two).

Imports nothing from mmfast.backends: the chunk loop and validation live above this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOW_BITS = 2**32 - 1
# The kernel reads module globals only as constexprs.
KEY_MIN = tl.constexpr(-(2**63))  # below every real key: an invalid column or row
KEY_LOW = tl.constexpr(LOW_BITS)
MAX_K = 128  # slots per query; a larger k takes the torch backend
# Enough programs to fill a GPU several times over; the gallery is split until the grid has this many.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4  # the interpreter runs programs one after the other: splitting buys nothing


@dataclass(frozen=True)
class TopkConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# (slots, 16-bit inputs on tensor cores) -> tile shape. Every entry is compiled for sm_80 and sm_90
# by tests/test_compile.py (python -m mmfast.kernels.aot); none spills. Full-fp32 dots run on FMA
# units and take far more registers per product, hence their thin BLOCK_D; 128 slots of int64 keys
# per row leave room for fewer rows.
TOPK_CONFIGS = {
    (16, True): TopkConfig(64, 64, 32, 8, 2),
    (16, False): TopkConfig(64, 64, 8, 8, 2),
    (128, True): TopkConfig(32, 64, 16, 4, 2),
    (128, False): TopkConfig(32, 64, 16, 8, 2),
}
TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _key_score(key, K_SLOTS: tl.constexpr):
    """The float32 score of a key; -inf for an empty slot's."""
    ordered = (key >> 32).to(tl.int32)
    score = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    return tl.where(key > KEY_MIN + K_SLOTS, score, float("-inf"))


# Counts and sizes that are 1 in ordinary use (one target per query) would otherwise be specialised
# into another compiled kernel than the ones the AOT compile checks.
@triton.jit(do_not_specialize=["n_queries", "n_gallery", "dim", "stride_target", "n_target_slots",
                               "columns_per_split"])  # fmt: skip
def similarity_topk_kernel(
    q_ptr, g_ptr, n_queries, n_gallery, dim, stride_q, stride_g,
    target_ptr, stride_target, n_target_slots, target_score_ptr,
    keys_ptr, count_ptr, columns_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_SLOTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = rows < n_queries
    rd = tl.arange(0, BLOCK_D)
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q  # [BM, 1]
    # Without a target the score is +inf: nothing counts.
    target_score = tl.load(target_score_ptr + rows, mask=row_ok, other=float("inf"))  # [BM]
    count = tl.zeros((BLOCK_M,), dtype=tl.int64)
    # Empty slots hold distinct keys below every real one, so "the weakest slot" is always unique.
    running = tl.zeros((BLOCK_M, K_SLOTS), dtype=tl.int64) + (KEY_MIN + 1) + tl.arange(0, K_SLOTS)[None, :]
    weakest_score = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # the score of the weakest slot
    first = split * columns_per_split
    last = tl.minimum(first + columns_per_split, n_gallery)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BN]
        col_ok = cols < last
        g_cols = g_ptr + cols[None, :].to(tl.int64) * stride_g  # [1, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(0, dim, BLOCK_D):
            a = tl.load(q_rows + (d + rd)[None, :], mask=row_ok[:, None] & ((d + rd)[None, :] < dim), other=0.0)
            b = tl.load(g_cols + (d + rd)[:, None], mask=col_ok[None, :] & ((d + rd)[:, None] < dim), other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")

        # The rank: scores strictly above the target's, the target set excluded (its own score,
        # rounded by another summation order, must never count against it).
        above = (acc > target_score[:, None]) & col_ok[None, :]
        for p in range(n_target_slots):
            excluded = tl.load(target_ptr + rows.to(tl.int64) * stride_target + p, mask=row_ok, other=-1)
            above = above & (cols[None, :] != excluded[:, None])
        count += tl.sum(above.to(tl.int32), axis=1).to(tl.int64)

        # Most tiles past the first few hold no score above any of the block's weakest kept ones
        # (a tie cannot enter: its index is higher); those skip the keys and the merge.
        in_tile = row_ok[:, None] & col_ok[None, :]
        tile_best = tl.max(tl.where(in_tile, acc, float("-inf")), axis=1)
        if tl.max((tile_best > weakest_score).to(tl.int32), axis=0) > 0:
            bits = acc.to(tl.int32, bitcast=True)
            ordered = tl.where(bits == -(2**31), 0, bits ^ ((bits >> 31) & 0x7FFFFFFF))  # -0.0 ties +0.0
            keys = (ordered.to(tl.int64) << 32) | (KEY_LOW - cols[None, :].to(tl.int64))
            keys = tl.where(in_tile, keys, KEY_MIN)
            weakest = tl.min(running, axis=1)
            best = tl.max(keys, axis=1)
            while tl.max((best > weakest).to(tl.int32), axis=0) > 0:
                take = best > weakest
                running = tl.where((running == weakest[:, None]) & take[:, None], best[:, None], running)
                keys = tl.where(keys == best[:, None], KEY_MIN, keys)
                weakest = tl.min(running, axis=1)
                best = tl.max(keys, axis=1)
            weakest_score = _key_score(weakest, K_SLOTS)

    slots = tl.arange(0, K_SLOTS)
    out = (rows[:, None].to(tl.int64) * n_splits + split) * K_SLOTS + slots[None, :]
    tl.store(keys_ptr + out, running, mask=row_ok[:, None])
    tl.store(count_ptr + rows.to(tl.int64) * n_splits + split, count, mask=row_ok)


def slots_for(k: int) -> int:
    return 16 if k <= 16 else MAX_K


def dot_dtype_for(dtype: torch.dtype):
    # triton 3.9's interpreter computes bf16×bf16 tl.dot wrongly: it gets float32 operands (exact
    # products either way); the compiled 16-bit path is checked by the AOT compile.
    if isinstance(similarity_topk_kernel, InterpretedFunction):
        return tl.float32
    return TORCH_TO_TRITON[dtype]


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scores, int64 gallery indices) of int64 keys."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), LOW_BITS - (keys & LOW_BITS)


class TritonSimilarityTopk:
    @staticmethod
    def unsupported_reason(dtype: torch.dtype, n_gallery: int, k: int) -> str | None:
        if dtype not in TORCH_TO_TRITON:
            return f"its kernel takes float32, bfloat16 or float16, got {dtype}"
        if k > MAX_K:
            return f"its kernel keeps at most {MAX_K} items per query, got k = {k}"
        if n_gallery >= 2**31:
            return f"its kernel indexes fewer than 2^31 gallery items, got {n_gallery}"
        return None

    def search(self, query, gallery, k, targets, target_score, advance):
        """(values [Q, k] float32, indices [Q, k] int64, count [Q] int64 of scores above the target or None).
        One launch reads the whole gallery: advance(G) once it has run."""
        query, gallery = (t if t.stride(1) == 1 else t.contiguous() for t in (query, gallery))
        n_queries, dim = query.shape
        n_gallery = gallery.shape[0]
        slots = slots_for(k)
        cfg = TOPK_CONFIGS[(slots, query.dtype != torch.float32)]
        blocks_m = triton.cdiv(n_queries, cfg.block_m)
        if query.is_cuda:
            programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(query.device).multi_processor_count
        else:
            programs = INTERPRETER_PROGRAMS
        wanted_splits = max(1, min(triton.cdiv(programs, blocks_m), triton.cdiv(n_gallery, cfg.block_n)))
        columns_per_split = triton.cdiv(triton.cdiv(n_gallery, wanted_splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(n_gallery, columns_per_split)
        if target_score is None:
            target_score = torch.full((n_queries,), float("inf"), device=query.device)
        # An unused pointer still needs a tensor (of the same type, so no other kernel is compiled).
        target_arg = targets if targets is not None else torch.zeros(1, dtype=torch.int64, device=query.device)
        keys = torch.empty(n_queries, splits * slots, dtype=torch.int64, device=query.device)
        counts = torch.empty(n_queries, splits, dtype=torch.int64, device=query.device)
        similarity_topk_kernel[(blocks_m, splits)](
            query, gallery, n_queries, n_gallery, dim, query.stride(0), gallery.stride(0),
            target_arg, 0 if targets is None else targets.stride(0), 0 if targets is None else targets.shape[1],
            target_score, keys, counts, columns_per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, K_SLOTS=slots,
            DOT_DTYPE=dot_dtype_for(query.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        values, indices = decode_keys(keys.topk(k, dim=1).values)  # unique keys: sorted, exact tie order
        advance(n_gallery)
        return values, indices, None if targets is None else counts.sum(dim=1)


def compile_specs():
    """Every variant `search` can launch: input dtype × slots (target or not is a runtime argument)."""
    from mmfast.kernels.compile_spec import CompileSpec

    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for (slots, tensor_cores), cfg in TOPK_CONFIGS.items():
            if tensor_cores != (dtype != torch.float32):
                continue
            signature = {
                "q_ptr": f"*{name}", "g_ptr": f"*{name}", "n_queries": "i32", "n_gallery": "i32", "dim": "i32",
                "stride_q": "i32", "stride_g": "i32", "target_ptr": "*i64", "stride_target": "i32",
                "n_target_slots": "i32", "target_score_ptr": "*fp32", "keys_ptr": "*i64", "count_ptr": "*i64",
                "columns_per_split": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
                "K_SLOTS": "constexpr", "DOT_DTYPE": "constexpr",
            }  # fmt: skip
            constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d, "K_SLOTS": slots,
                          "DOT_DTYPE": TORCH_TO_TRITON[dtype]}  # fmt: skip
            yield CompileSpec(
                name=f"similarity_topk[{name},slots={slots}]", kernel=similarity_topk_kernel, signature=signature,
                constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

"""The Triton kernel set's Matryoshka row kernel: what csrc/contrastive_loss.cpp's
`contrastive_matryoshka_rows` does on the cpu backend, for the chunk loop of
mmfast/backends/contrastive_matryoshka.py (its docstring has the algebra).

`blocks` [m, rows, N] holds one chunk's segment products P_k = x[:, seg_k]·y[:, seg_k]ᵀ (the chunked
GEMMs, one pass over D). One program per row; its tiles are [M_PAD prefixes, BLOCK_N columns], so a
row's m prefixes move together and their running sums R_k = Σ_{j≤k} P_j are a scan along the tile's
prefix axis, in registers:
  pass 1   S_k = a_k·R_k·b_k with the row kernel's masks and hardness, an online max and sum of exp
           per prefix; the loss of each prefix
  pass 2   G_k (times a_k: `row_scale`), G̃_k = G_k·b_k, α_k = Σ_c G̃_k·R_k and β_k += G̃_k·R_k
           (atomically: the rows' programs share the columns), and the suffix sums H_j = Σ_{k≥j} G̃_k
           (a reverse scan) over the products, which the chunk loop's one GEMM per segment reads
Against the generic path (torch ops around the dense row kernel, ~10 passes over each prefix's
block) this reads each block twice and writes it once, plus β's atomic adds. Those make β's float32
sums' order, hence their last bits, vary between runs on a GPU (the interpreter runs the programs in
order).
Top-k keeps the generic path (its selection is the torch set's sort).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from mmfast.kernel_contract import DirectionOptions
from mmfast.kernels.compile_spec import CompileSpec
from mmfast.kernels.contrastive_loss_fused import direction_params

MATRYOSHKA_NUM_WARPS = 4
PREFIX_WIDTHS = (8, 16)  # M_PAD: the prefixes' axis of a tile, padded; more than 16 take the generic path
# M_PAD × BLOCK_N per tile: 8 float32 or 4 float64 elements a thread at 4 warps, so BLOCK_N shrinks as
# M_PAD grows. A [16, 128] float32 tile (16 a thread) spilled up to 112 bytes with a gradient on
# sm_80/sm_90, a [8, 128] float64 one 4 bytes on sm_80 (kernels/aot.py; tests/test_compile.py).
TILE_ELEMENTS = {"fp32": 1024, "fp64": 512}
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}


# The sizes stay runtime i32: a Python int 1 (one prefix, a one-row chunk) would otherwise be
# specialised into another compiled variant than the ones compile_specs lists.
@triton.jit(do_not_specialize=["m", "rows", "row_offset"])
def matryoshka_rows_kernel(
    blocks_ptr, a_ptr, b_ptr, row_scale_ptr, loss_ptr, alpha_ptr, beta_ptr, params_ptr, ids_ptr,
    m, rows, n, row_offset,
    BLOCK_N: tl.constexpr, M_PAD: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_GRAD: tl.constexpr,
    HAS_IDS: tl.constexpr,
):  # fmt: skip
    inv_temperature = tl.load(params_ptr)
    negative_scale = tl.load(params_ptr + 1)
    margin = tl.load(params_ptr + 2)
    row = tl.program_id(0)
    pos_col = row_offset + row
    prefixes = tl.arange(0, M_PAD)  # [M]
    live = prefixes < m  # the padding prefixes load zeros and store nothing
    offsets = tl.arange(0, BLOCK_N)  # [BN]
    p_rows = blocks_ptr + (prefixes.to(tl.int64) * rows + row) * n  # [M]: row `row` of every block
    b_rows = b_ptr + prefixes.to(tl.int64) * n  # [M]
    a = tl.load(a_ptr + prefixes * rows + row, mask=live, other=0.0)  # [M]
    pos_id = tl.load(ids_ptr + pos_col) if HAS_IDS else 0

    # Each prefix's positive, from the same running sums and products as the tiles below.
    raw_pos = tl.cumsum(tl.load(p_rows + pos_col, mask=live, other=0.0), axis=0)
    pos = a * raw_pos * tl.load(b_rows + pos_col, mask=live, other=0.0)  # [M]
    pos_logit = pos * inv_temperature
    limit = pos + margin

    # Pass 1: per prefix an online max and sum of exp, seeded with its positive (max = its logit, sum = 1).
    running_max = pos_logit
    running_sum = pos_logit * 0.0 + 1.0
    for start in range(0, n, BLOCK_N):
        cols = start + offsets
        col_ok = cols < n
        tile_ok = live[:, None] & col_ok[None, :]
        raw = tl.cumsum(tl.load(p_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0), axis=0)  # R_k
        s = a[:, None] * raw * tl.load(b_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)  # S_k
        keep = col_ok & (cols != pos_col)
        if HAS_IDS:  # a copy of the positive (its class index) is no negative
            keep = keep & (tl.load(ids_ptr + cols, mask=col_ok, other=0) != pos_id)
        keep_tile = tile_ok & keep[None, :]
        if HAS_MARGIN:  # NaN scores are kept and poison the loss, as in torch
            keep_tile = keep_tile & ~(s > limit[:, None])
        logit = tl.where(keep_tile, s * negative_scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logit, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(loss_ptr + prefixes * rows + row, lse - pos_logit, mask=live)

    # Pass 2: G_k (row_scale is a_k·dTotal/dLoss_k), G̃_k = G_k·b_k = dLoss/dR_k, α_k and β_k from
    # G̃_k ⊙ R_k (α per lane, summed once at the end), and the suffix sums H_j = Σ_{k≥j} G̃_k (a
    # reverse scan along the prefixes) over the products, which the one GEMM per segment reads next.
    if HAS_GRAD:
        coef = tl.load(row_scale_ptr + prefixes * rows + row, mask=live, other=0.0) * inv_temperature
        pos_grad = (tl.exp(pos_logit - lse) - 1.0) * coef
        alpha = tl.zeros([M_PAD, BLOCK_N], dtype=a.dtype)
        for start in range(0, n, BLOCK_N):
            cols = start + offsets
            col_ok = cols < n
            tile_ok = live[:, None] & col_ok[None, :]
            tile = p_rows[:, None] + cols[None, :]
            raw = tl.cumsum(tl.load(tile, mask=tile_ok, other=0.0), axis=0)
            b_tile = tl.load(b_rows[:, None] + cols[None, :], mask=tile_ok, other=0.0)
            s = a[:, None] * raw * b_tile
            keep = cols != pos_col
            if HAS_IDS:
                keep = keep & (tl.load(ids_ptr + cols, mask=col_ok, other=0) != pos_id)
            keep_tile = tile_ok & keep[None, :]
            if HAS_MARGIN:
                keep_tile = keep_tile & ~(s > limit[:, None])
            g = tl.where(keep_tile, tl.exp(s * negative_scale - lse[:, None]) * coef[:, None], 0.0)
            g = tl.where(cols[None, :] == pos_col, pos_grad[:, None], g)
            g_tilde = tl.where(tile_ok, g * b_tile, 0.0)
            term = g_tilde * raw
            alpha += term
            tl.atomic_add(beta_ptr + prefixes[:, None].to(tl.int64) * n + cols[None, :], term, mask=tile_ok)
            tl.store(tile, tl.cumsum(g_tilde, axis=0, reverse=True), mask=tile_ok)
        tl.store(alpha_ptr + prefixes * rows + row, tl.sum(alpha, axis=1), mask=live)


def prefix_width(m: int) -> int | None:
    """The compiled M_PAD that holds m prefixes, or None (more than the widest)."""
    return next((width for width in PREFIX_WIDTHS if m <= width), None)


def block_n(dtype_name: str, width: int) -> int:
    """The tile's columns for blocks of `dtype_name` ("fp32", "fp64") and M_PAD = `width`."""
    return TILE_ELEMENTS[dtype_name] // width


def supports(m: int, dtype: torch.dtype, opts: DirectionOptions) -> bool:
    """Dense rows (top-k's selection stays generic), float32/float64 blocks, at most 16 prefixes."""
    return opts.topk is None and dtype in DTYPE_NAMES and prefix_width(m) is not None


def matryoshka_rows(blocks, row_offset, opts: DirectionOptions, a, b, row_scale, loss, alpha, beta, ids):
    """The kernel set's `matryoshka_rows` (backends/contrastive_matryoshka.py's contract): the loss
    [m, rows]; with `row_scale` the blocks end as H_j, α_k into `alpha` and β_k added into `beta`."""
    m, rows, n = blocks.shape
    has_grad = row_scale is not None
    params = direction_params(opts, blocks.dtype, blocks.device, no_margin=0.0)
    width = prefix_width(m)
    matryoshka_rows_kernel[(rows,)](
        blocks, a, b, row_scale if has_grad else loss, loss, alpha if has_grad else loss, beta if has_grad else loss,
        params, loss if ids is None else ids, m, rows, n, row_offset,
        BLOCK_N=block_n(DTYPE_NAMES[blocks.dtype], width), M_PAD=width,
        HAS_MARGIN=opts.false_negative_margin is not None, HAS_GRAD=has_grad, HAS_IDS=ids is not None,
        num_warps=MATRYOSHKA_NUM_WARPS,
    )  # fmt: skip


def compile_specs():
    """Every variant: blocks dtype {fp32, fp64} × M_PAD × HAS_MARGIN × HAS_GRAD × HAS_IDS (without a
    gradient or ids the launcher passes the loss buffer for their pointers, unread)."""
    for dtype, width in itertools.product(("fp32", "fp64"), PREFIX_WIDTHS):
        for has_margin in (False, True):
            for has_grad in (False, True):
                for has_ids in (False, True):
                    signature = {
                        "blocks_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                        "row_scale_ptr": f"*{dtype}", "loss_ptr": f"*{dtype}", "alpha_ptr": f"*{dtype}",
                        "beta_ptr": f"*{dtype}", "params_ptr": f"*{dtype}",
                        "ids_ptr": "*i32" if has_ids else f"*{dtype}", "m": "i32", "rows": "i32", "n": "i32",
                        "row_offset": "i32", "BLOCK_N": "constexpr", "M_PAD": "constexpr",
                        "HAS_MARGIN": "constexpr", "HAS_GRAD": "constexpr", "HAS_IDS": "constexpr",
                    }  # fmt: skip
                    constexprs = {"BLOCK_N": block_n(dtype, width), "M_PAD": width, "HAS_MARGIN": has_margin,
                                  "HAS_GRAD": has_grad, "HAS_IDS": has_ids}  # fmt: skip
                    yield CompileSpec(
                        name=f"contrastive_matryoshka_rows[{dtype},m<={width},margin={int(has_margin)},grad={int(has_grad)},"
                        f"ids={int(has_ids)}]",
                        kernel=matryoshka_rows_kernel, signature=signature, constexprs=constexprs,
                        num_warps=MATRYOSHKA_NUM_WARPS, num_stages=1,
                    )  # fmt: skip

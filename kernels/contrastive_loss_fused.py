"""The tile-fused Triton path of mmfast.contrastive_loss: the row kernel's work moves into the GEMMs'
epilogue and prologue, or into one pass over S, so S is written once and read once.

Per chunk of rows (mmfast/backends/contrastive_loss_fused.py; it still holds a [rows, N] float32 S
and a G buffer: G needs each row's final logsumexp, so it cannot be formed while S is):
  diag        with a margin: s_pos = row-wise x_r·y_pos (torch, float64 sums rounded to float32,
              [rows]): the margin needs the positive before the tile that holds it is seen
  scores      fused_scores_kernel: S_tile = X_blk·Y_tileᵀ (a GEMM); its epilogue applies the masks
              (positive, margin, duplicate ids) and hardness and writes the tile's row max and sum of
              exp [rows, cdiv(N, BLOCK_N)], and, when a gradient is wanted, S in float32 (-inf in
              the padding to 16 columns); without one only the tile statistics leave the kernel.
              Without a margin (HAS_MARGIN = 0) s_pos is the GEMM's own value: the tiles that hold a
              row's positive (a branch per tile; at most 2 column tiles per row block) store it
  merge       lse = the tiles' statistics and the positive merged (torch, [rows, tiles]); loss
  G, dX, dY   kernels/contrastive_loss_fused_grads.py. D <= PROLOGUE_MAX_DIM: fused_grad_x_kernel,
              dX_blk = G·Y with G formed in the A-operand prologue from the S tile (masks,
              exp(logit - lse)·c/τ, (p - 1)·c/τ at the positive); its first D block stores G and the
              tensor-τ reduction Σ_j G_rj·(s_rj - s_pos). Larger D: the same kernel without its GEMM
              ("grads": G and the τ reduction, once per score), then dX = G·Y in cuBLAS. dY += Gᵀ·X_c
              in cuBLAS on the stored G (the kernel set's CublasGemms, as the cublas path)
Candidates in pieces ([targets, negatives]) are launched piece by piece with a column offset; the
positive is global candidate positive_offset + row. Not here (the chunked path keeps them): top-k
(a sparse gradient) and float64 (tl.dot has no float64).

Per score (bf16; DX = D / 256, the grad_x tile's D blocks; instructions: sm_90 SASS per tile element
of the score epilogue (its tiles without a positive) and of the G loops, plain / with ids (and
tensor τ); kernels/roofline_fused.py says how they are counted):
  kernel      tensor FLOPs  MUFU exps  instructions  HBM bytes (per score; + Y re-read per chunk)
  scores      2·D           1          25 / 31       4 (S, with a gradient) + 8/128 (statistics)
  (margin)                             28 / 35       (+ the float64 positive: ≥ 36 per element of X)
  grad_x      2·D           DX         32 / 44 · DX  4 (S) + 2 (G); DX - 1 more S reads from L2
  grads       0             1          21 / 38       4 (S) + 2 (G)
  dX GEMM     2·D           0          0             2 (G)
  dY GEMM     2·D           0          0             2 (G) + the float32 dY read and written per chunk
The prologue's 32 instructions per element and D block against 2·256 tensor FLOPs make grad_x bound
by instruction issue at ~1.85× its GEMM on an H100 (132 SMs × 4 schedulers × 32 lanes × 1.98 GHz =
3.3e13 instructions/s against 989 bf16 TFLOP/s), for every D; the "grads" pass instead costs 6 bytes
per score at 3.35 TB/s. The two break even near D = 1000 if the prologue overlaps the tensor cores
perfectly, near D = 500 if it does not: hence PROLOGUE_MAX_DIM = 512.
The H100 cost model prices this path from these counts and the compiled tiles (kernels/roofline_fused.py;
per shape and kernel in benchmarks/results/gpu_report.txt, summarised in the README's GPU section):
1.20× the GEMM bound (3 GEMMs at cuBLAS's 0.75 of peak) at B = 4096, K = 1, D = 4096 and 1.43× at
B = 32768, K = 3, D = 1024 (bf16), behind the cublas path (1.09×, 1.36×); the issue's ≤ 1.15× is
not met. This design's floor, every GEMM at cuBLAS's rate plus its work beyond them, is 1.08× and
1.32×: at the large shape the G pass (7.7 ms), the epilogue issued after the K loop at one CTA per SM
(3.2 ms) and the merge (0.4 ms) add 11.3 ms to 35.6 ms. Below 1.15× that work has to overlap the
tensor cores: the epilogue by warp specialisation (FA3's producer warps and two consumer
warpgroups alternating wgmma and epilogue), G formed on chip inside the dX/dY GEMMs by specialised
warps (or S recomputed in the backward, flash-attention's way, at the price of a fourth GEMM).
Unproven on hardware: estimates only (the chunked path stays).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from mmfast.kernel_contract import DirectionOptions, triton_interpreter_enabled
from mmfast.kernels.compile_spec import CompileSpec
from mmfast.kernels.contrastive_loss_fused_grads import fused_grad_x_kernel, fused_grads, padded_width
from mmfast.kernels.matmul import (
    TORCH_TO_TRITON,
    MatmulConfig,
    accumulate_dot,
    dot_dtype_for,
    grouped_tile,
    input_precision_for,
)

_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # what tl.dot takes

# (scores config, grad_x config) per kind of dot. scores: a block_m × block_n tile of S, block_k of
# D per step. grad_x: block_m rows × block_k columns of dX, block_n candidates per step. Every pair
# is compiled by tests/test_compile.py for sm_80 and sm_90 with no spill (regs and shared memory:
# `python -m mmfast.kernels.aot --filter contrastive_fused`). The interpreter's tiles are small so
# the tests' odd sizes span several tiles in every direction.
FUSED_CONFIGS = {
    "tensor_core": (MatmulConfig(128, 128, 64, 8, 8, 3), MatmulConfig(64, 32, 256, 1, 8, 4)),  # bf16/fp16
    "tf32": (MatmulConfig(128, 64, 32, 8, 8, 3), MatmulConfig(64, 32, 128, 1, 8, 2)),
    "fp32": (MatmulConfig(64, 64, 16, 8, 8, 3), MatmulConfig(32, 16, 64, 1, 4, 3)),  # full fp32 (FMA)
    "interpreter": (MatmulConfig(16, 16, 32, 2, 1, 1), MatmulConfig(16, 16, 32, 1, 1, 1)),
}


# dX in the prologue of its GEMM forms each G tile D / BLOCK_D times at ~32 instructions each (sm_90
# SASS), which costs more than one 6-byte-per-score pass forming G once beyond D ≈ 500-1000 (see the
# module docstring); there the same kernel forms G alone and dX = G·Y is a plain GEMM.
PROLOGUE_MAX_DIM = 512


def gpu_configs(dot_dtype, input_precision: str) -> tuple[MatmulConfig, MatmulConfig]:
    if dot_dtype != tl.float32:
        return FUSED_CONFIGS["tensor_core"]
    return FUSED_CONFIGS["tf32" if input_precision == "tf32" else "fp32"]


def fused_configs(dot_dtype, input_precision: str) -> tuple[MatmulConfig, MatmulConfig]:
    return FUSED_CONFIGS["interpreter"] if triton_interpreter_enabled() else gpu_configs(dot_dtype, input_precision)


def direction_params(opts: DirectionOptions, dtype: torch.dtype, device, no_margin: float) -> torch.Tensor:
    """[1/τ, 1/τ + α, margin] as a device tensor in `dtype` (`no_margin` without a margin). The
    scalars go through memory: a Python float argument would arrive as float32 and cost float64
    inputs seven digits, and a tensor τ stays on the device (no sync)."""
    margin = no_margin if opts.false_negative_margin is None else opts.false_negative_margin
    inv_t = opts.inv_temperature
    if isinstance(inv_t, torch.Tensor):
        return torch.stack([inv_t, inv_t + opts.hardness, inv_t * 0.0 + margin]).to(dtype)
    return torch.tensor([inv_t, inv_t + opts.hardness, margin], dtype=dtype).to(device)


# Flags and offsets stay runtime i32 (a Python int 1 would otherwise be specialised into another
# compiled variant than the ones compile_specs lists).
@triton.jit(do_not_specialize=["col_offset", "pos_offset", "first_tile", "store_scores"])
def fused_scores_kernel(
    x_ptr, y_ptr, s_ptr, tile_max_ptr, tile_sum_ptr, pos_ptr, params_ptr, ids_ptr,
    M, N, n_padded, K, col_offset, pos_offset, first_tile, store_scores,
    stride_xm, stride_xk, stride_yn, stride_yk, stride_sm, stride_sn, stride_tm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_MARGIN: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN], in this piece
    rk = tl.arange(0, BLOCK_K)
    # Loads wrap around past the edges (as in matmul_kernel); the masks below drop what wrapped.
    x_ptrs = x_ptr + (rows % M)[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk  # [BM, BK]
    y_ptrs = y_ptr + rk[:, None] * stride_yk + (cols % N)[None, :].to(tl.int64) * stride_yn  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s = accumulate_dot(acc, x_ptrs, y_ptrs, K, stride_xk, stride_yk, BLOCK_K, DOT_DTYPE, INPUT_PRECISION)

    # Epilogue: the row kernel's masks and hardness on the tile in registers.
    negative_scale = tl.load(params_ptr + 1)
    row_ok = rows < M
    col_ok = cols < N
    pos_col = pos_offset + rows - col_offset  # the positive's column in this piece (maybe outside it)
    at_pos = cols[None, :] == pos_col[:, None]
    keep = col_ok[None, :] & ~at_pos
    if HAS_MARGIN:  # s_pos was computed before (positive_scores): the margin needs it for every tile
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)  # [BM]
        keep = keep & ~(s > (pos + tl.load(params_ptr + 2))[:, None])  # NaN stays in
    else:  # s_pos is this GEMM's own value, taken by the tiles that hold a positive (a branch per tile)
        first_pos = pos_offset + pid_m * BLOCK_M - col_offset
        if (first_pos < pid_n * BLOCK_N + BLOCK_N) & (first_pos + BLOCK_M > pid_n * BLOCK_N):
            held = row_ok & (pos_col >= pid_n * BLOCK_N) & (pos_col < pid_n * BLOCK_N + BLOCK_N) & (pos_col < N)
            tl.store(pos_ptr + rows, tl.sum(tl.where(at_pos, s, 0.0), axis=1), mask=held)
    if HAS_IDS:  # a copy of the positive (its class index) is no negative
        pos_id = tl.load(ids_ptr + pos_offset + rows, mask=row_ok, other=0)
        col_id = tl.load(ids_ptr + col_offset + cols, mask=col_ok, other=0)
        keep = keep & (col_id[None, :] != pos_id[:, None])
    logit = tl.where(keep, s * negative_scale, float("-inf"))
    tile_max = tl.max(logit, axis=1)  # [BM]; -inf when the tile has no negative of the row
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    tile_sum = tl.sum(tl.exp(logit - shift[:, None]), axis=1)  # a NaN score makes it NaN, as in torch
    stats = rows.to(tl.int64) * stride_tm + first_tile + pid_n
    tl.store(tile_max_ptr + stats, tile_max, mask=row_ok)
    tl.store(tile_sum_ptr + stats, tile_sum, mask=row_ok)
    # S for the gradient: a masked-off store (store_scores = 0, no gradient) moves no bytes. The
    # padding columns up to n_padded (a multiple of 16) get -inf, whose exp is 0: grad_x then loads
    # S in 16-byte vectors and needs no column mask of its own.
    s_ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_sm + cols[None, :] * stride_sn
    store_rows = row_ok & (tl.full((BLOCK_M,), store_scores, tl.int32) != 0)  # a runtime flag as a mask
    padded = tl.where(col_ok[None, :], s, float("-inf"))
    tl.store(s_ptrs, padded, mask=store_rows[:, None] & (cols[None, :] < n_padded))


def merge_tiles(tile_max: torch.Tensor, tile_sum: torch.Tensor, pos_logit: torch.Tensor) -> torch.Tensor:
    """Each row's logsumexp over its positive and the tiles' (max, sum of exp)."""
    top = torch.maximum(tile_max.amax(dim=1), pos_logit) if tile_max.shape[1] else pos_logit
    total = torch.exp(pos_logit - top) + (tile_sum * torch.exp(tile_max - top[:, None])).sum(dim=1)
    return top + torch.log(total)


def positive_scores(x: torch.Tensor, y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """s_pos = x_r·y_r in float32, summed in float64 and rounded once, for a margin (needed before
    the tiles; without one the score kernel stores the GEMM's own s_pos): the loss and the τ gradient
    (Σ_j G_j·(s_j - s_pos)) are sensitive to it, and a float32 row-dot's rounding differs from the
    GEMM's (it cost the τ gradient 2-3× torch's own error). Blocks of rows bound the float64 copies."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], block):
        rows = slice(start, start + block)
        out[rows] = torch.einsum("rd,rd->r", x[rows].double(), y[rows].double())
    return out


def buffer_columns(pieces) -> tuple[list[int], int]:
    """Where each piece's columns start in the [rows, width] S and G buffers, and the width: every
    start and the row stride are multiples of 16, so every launch sees 16-byte-aligned slices (the
    variants compile_specs compiles)."""
    starts, width = [], 0
    for piece in pieces:
        starts.append(width)
        width += padded_width(piece.shape[0])
    return starts, width


def fused_direction_chunk(x, pieces, opts: DirectionOptions, row_offset: int, loss, ids=None, *, scores=None,
                          grads=None, row_scale=None, grad_x=None, grad_pieces=(), accumulate_x=False,
                          accumulate_pieces=False, temperature_grad=None, gemms=None):  # fmt: skip
    """One chunk of rows x [rows, D] (row r's positive: candidate row_offset + r) against the
    candidate pieces: the loss into `loss`; with `row_scale`, S into `scores` and G into `grads`
    ([rows, width] buffers, laid out by buffer_columns), dX into (or, accumulate_x, onto) grad_x,
    dY onto (accumulate_pieces) or into grad_pieces[i] (None: skipped), and w_r = Σ_j G_rj·s_rj into
    temperature_grad. `gemms.matmul` (the kernel set's cuBLAS GEMMs) runs the GEMMs on the stored G."""
    if opts.topk is not None or x.dtype not in _TYPE_NAMES:  # a path choice's mistake, not the user's
        raise NotImplementedError(f"the fused contrastive path has no top-k and no {x.dtype}: use the chunked one")
    rows, dim = x.shape
    device = x.device
    dot_dtype = dot_dtype_for(x.dtype)
    precision = input_precision_for(dot_dtype)
    score_cfg, grad_cfg = fused_configs(dot_dtype, precision)
    params = direction_params(opts, torch.float32, device, no_margin=float("inf"))
    has_margin = opts.false_negative_margin is not None
    if has_margin:
        pos = positive_scores(x, pieces[0][row_offset : row_offset + rows])
    else:  # the score kernel writes each row's positive from the tile that holds it
        pos = torch.empty(rows, dtype=torch.float32, device=device)
    ids_arg = pos if ids is None else ids
    tiles = [triton.cdiv(p.shape[0], score_cfg.block_n) for p in pieces]
    tile_max = torch.empty(rows, sum(tiles), dtype=torch.float32, device=device)
    tile_sum = torch.empty_like(tile_max)
    want_grad = row_scale is not None
    starts = buffer_columns(pieces)[0]
    col = first_tile = 0  # col: the piece's first candidate
    for piece, n_tiles, start in zip(pieces, tiles, starts, strict=True):
        n = piece.shape[0]
        out = scores[:, start : start + n] if want_grad else tile_max  # unwritten without a gradient
        grid = (triton.cdiv(rows, score_cfg.block_m) * n_tiles,)
        fused_scores_kernel[grid](
            x, piece, out, tile_max, tile_sum, pos, params, ids_arg,
            rows, n, padded_width(n), dim, col, row_offset, first_tile, int(want_grad),
            x.stride(0), x.stride(1), piece.stride(0), piece.stride(1), out.stride(0), out.stride(1),
            tile_max.stride(0),
            BLOCK_M=score_cfg.block_m, BLOCK_N=score_cfg.block_n, BLOCK_K=score_cfg.block_k,
            GROUP_M=score_cfg.group_m, HAS_IDS=ids is not None, HAS_MARGIN=has_margin, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, num_warps=score_cfg.num_warps, num_stages=score_cfg.num_stages,
        )  # fmt: skip
        col += n
        first_tile += n_tiles
    pos_logit = pos * opts.inv_temperature
    lse = merge_tiles(tile_max, tile_sum, pos_logit)
    torch.sub(lse, pos_logit, out=loss)
    if not want_grad:
        return
    lse = lse.contiguous()
    in_prologue = grad_x is not None and dim <= PROLOGUE_MAX_DIM
    fused_grads(x, pieces, starts, scores, grads, lse, pos, params, ids, row_scale, grad_cfg, row_offset=row_offset,
                in_prologue=in_prologue, gemms=gemms, grad_x=grad_x, grad_pieces=grad_pieces,
                accumulate_x=accumulate_x, accumulate_pieces=accumulate_pieces, temperature_grad=temperature_grad,
                dot_dtype=dot_dtype, precision=precision)  # fmt: skip


# Every launch passes x, the pieces, S, G and dX row-major (S and G as column slices): unit strides.


def _signature(kernel, pointers: dict, unit_strides, constexprs: dict) -> dict:
    signature = {arg: pointers.get(arg, "*fp32" if arg.endswith("_ptr") else "i32") for arg in kernel.arg_names}
    signature.update({stride: "constexpr" for stride in unit_strides})
    signature.update({name: "constexpr" for name in constexprs})
    return signature


def _aligned(kernel, *names) -> tuple[str, ...]:
    """What every launch passes as a multiple of 16: the pointers (torch allocations, and slices at
    buffer_columns' starts), D and the row strides (the path runs only for D % 16 == 0)."""
    return (*(arg for arg in kernel.arg_names if arg.endswith("_ptr") and arg not in ("params_ptr", "ids_ptr")), *names)


def compile_specs():
    """Every launchable variant: input dtype (fp32 in both precisions) × HAS_IDS (× HAS_MARGIN for
    the scores, × TEMPERATURE_GRAD for grad_x). Accumulating, storing S, dX and G are runtime flags
    (masked stores and loads), so they multiply no variant."""
    for dtype, name in _TYPE_NAMES.items():
        dot = TORCH_TO_TRITON[dtype]
        for precision in ["ieee", "tf32"] if dtype == torch.float32 else ["ieee"]:
            score_cfg, grad_cfg = gpu_configs(dot, precision)
            for has_ids in (False, True):
                ids = "*i32" if has_ids else "*fp32"
                common = {"HAS_IDS": has_ids, "DOT_DTYPE": dot, "INPUT_PRECISION": precision}
                pointers = {"x_ptr": f"*{name}", "y_ptr": f"*{name}", "ids_ptr": ids}
                kernel = fused_scores_kernel
                for has_margin in (False, True):
                    constexprs = {"stride_xk": 1, "stride_yk": 1, "stride_sn": 1, "BLOCK_M": score_cfg.block_m,
                                  "BLOCK_N": score_cfg.block_n, "BLOCK_K": score_cfg.block_k,
                                  "GROUP_M": score_cfg.group_m, "HAS_MARGIN": has_margin, **common}  # fmt: skip
                    yield CompileSpec(
                        name=f"contrastive_fused_scores[{name},{precision},ids={int(has_ids)},margin={int(has_margin)}]",
                        kernel=kernel, constexprs=constexprs, num_warps=score_cfg.num_warps,
                        signature=_signature(kernel, pointers, ("stride_xk", "stride_yk", "stride_sn"), constexprs),
                        num_stages=score_cfg.num_stages,
                        divisible_by_16=_aligned(kernel, "n_padded", "K", "stride_xm", "stride_yn", "stride_sm"),
                    )  # fmt: skip
                kernel = fused_grad_x_kernel
                for temperature, in_prologue in itertools.product((False, True), (True, False)):
                    unit = ("stride_sn", "stride_yd", "stride_dd", "stride_gn")
                    role = "grad_x" if in_prologue else "grads"  # grads: G alone, no GEMM
                    constexprs = {**dict.fromkeys(unit, 1), "BLOCK_M": grad_cfg.block_m, "BLOCK_N": grad_cfg.block_n,
                                  "BLOCK_D": grad_cfg.block_k, "TEMPERATURE_GRAD": temperature,
                                  "DX_IN_PROLOGUE": in_prologue, **common}  # fmt: skip
                    pointers = {"y_ptr": f"*{name}", "g_ptr": f"*{name}", "ids_ptr": ids}
                    yield CompileSpec(
                        name=f"contrastive_fused_{role}[{name},{precision},ids={int(has_ids)}"
                        f"{',temperature' if temperature else ''}]",
                        kernel=kernel, signature=_signature(kernel, pointers, unit, constexprs),
                        constexprs=constexprs, num_warps=grad_cfg.num_warps, num_stages=grad_cfg.num_stages,
                        divisible_by_16=_aligned(kernel, "n_padded", "D", "stride_sm", "stride_yn", "stride_dm",
                                                 "stride_gm"),
                    )  # fmt: skip

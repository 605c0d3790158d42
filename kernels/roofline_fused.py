"""The cost model's price of the fused contrastive path as built (kernels/contrastive_loss_fused.py,
its chunk loop mmfast/backends/contrastive_loss_fused.py). Pure Python, like kernels/roofline.py.

Per chunk of r rows against N candidates of dimension D (per score; G in the input dtype, 2 bytes
for bf16/fp16, 4 for fp32):
  positive   with a margin only: s_pos = x_r·y_pos in torch, float64: x and y rows read, float64
             copies written and read (without one the score kernel takes s_pos from its tile)
  scores     fused_scores_kernel: the score GEMM on FUSED_TILES' "scores" tile; its epilogue (1 ex2,
             FUSED_INSTRUCTIONS) runs after the K loop, and at one CTA per SM (its compiled registers)
             nothing else on the SM overlaps it: its issue time adds to the tensor time. S written in
             float32 with a gradient, 8 bytes of row statistics per row and 128-column tile. Without
             a margin the tiles that hold a row's positive (at most 2 of a row block's column tiles)
             run a branch that stores it: their scores cost "scores_diagonal" instead
  lse_merge  merge_tiles in torch: ~9 passes over the [r, tiles] float32 statistics (36 bytes per
             row and tile), 1 exp per row and tile
  D <= PROLOGUE_MAX_DIM: grad_x_prologue, dX = G·Y with G formed in the A operand's prologue once
             per D block of the "grad_x" tile (1 ex2 and the instructions per score per block); it
             is interleaved with the asynchronous wgmma in the K loop, so the two overlap (the max).
             S read (4 B; once from HBM, the other D blocks from L2: the tile's A operand is priced
             at 4 bytes), G written once.
  D > PROLOGUE_MAX_DIM: grads, G alone (1 ex2, the instructions, S read, G written; its grid
             splits the candidates, so every SM is busy), then grad_x = G·Y, a cuBLAS GEMM (the
             chunk loop hands the fused kernels the cublas path's GEMMs: CUBLAS_FRACTION, no waves)
  grad_y     dY (+)= Gᵀ·X, a cuBLAS GEMM, dY's float32 read and written per chunk
Instruction counts: sm_90 SASS per score of the epilogue and of the G loops on the bf16 cubins
(nvdisasm; the epilogue: every instruction after the K loop's last wgmma wait, over the 64 tile
elements a thread holds), plain / with duplicate ids (and, for G, a tensor τ); the same counts are
assumed for TF32 and fp32 (not counted). The score epilogue with a margin: 1790 / 2247 instructions
(28 / 35 per score); without one, 1961 / 2433 of which the positive's branch is 369 / 418 (25 / 31
per score on the tiles that skip it, 30 / 38 on those that run it). Issue rate:
kernels/roofline_tiles.py.
"""

from __future__ import annotations

import math

from mmfast.kernels.roofline_tiles import (
    PRECISION_BYTES,
    GemmTile,
    Kernel,
    add_gemm_launch,
    add_stored_g_gemms,
    chunks,
    gemm_fraction,
    occupancy,
)

# kernels/contrastive_loss_fused.FUSED_CONFIGS as tiles (grad_x: block_m rows × block_n = its D
# block of dX, block_k = its candidates per step), with the registers and shared memory of their
# sm_90 compile, the worst over the ids / τ variants and 16-bit dtypes (tests/test_compile.py).
FUSED_TILES = {
    ("tensor_core", "scores"): GemmTile(128, 128, 64, 8, 3, 219, 98304),
    ("tensor_core", "grad_x"): GemmTile(64, 256, 32, 8, 4, 186, 94592),
    ("tf32", "scores"): GemmTile(128, 64, 32, 8, 3, 119, 73728),
    ("tf32", "grad_x"): GemmTile(64, 128, 32, 8, 2, 188, 49280),
    ("fp32", "scores"): GemmTile(64, 64, 16, 8, 3, 80, 16384),
    ("fp32", "grad_x"): GemmTile(32, 64, 16, 4, 3, 96, 14464),
}
FUSED_KIND = {"bf16": "tensor_core", "fp16": "tensor_core", "tf32": "tf32", "fp32": "fp32"}
# SASS lane-instructions per score (per score and D block for grad_x): (plain, with ids / tensor τ).
FUSED_INSTRUCTIONS = {"scores": (25, 31), "scores_diagonal": (30, 38), "scores_margin": (28, 35), "grad_x": (32, 44),
                      "grads": (21, 38)}  # fmt: skip
PROLOGUE_MAX_DIM = 512  # kernels/contrastive_loss_fused.PROLOGUE_MAX_DIM: dX in the prologue up to here
MERGE_BYTES = 36.0  # per row and tile: merge_tiles' torch passes (amax, subtract, exp, multiply, sum)


def fused_kernels(rows: int, n: int, d: int, precision: str, chunk: int, *, gradients: bool = True,
                  aligned: bool = True, at_peak: bool = False, ids: bool = False, margin: bool = False,
                  prologue_max_dim: int = PROLOGUE_MAX_DIM) -> list[Kernel]:  # fmt: skip
    """The fused path's kernels of one loss evaluation (path_kernels' arguments); `ids`: the
    instruction counts with duplicate ids (and a tensor τ); `margin`: with a false-negative margin
    (the float64 positive first); `prologue_max_dim`: where the chunk loop switches from dX in the
    prologue to the G pass (another value prices the other mode)."""
    e = PRECISION_BYTES[precision]
    g_bytes = 4 if e == 4 else 2
    kind = FUSED_KIND[precision]
    score_tile, grad_x_tile = FUSED_TILES[(kind, "scores")], FUSED_TILES[(kind, "grad_x")]
    count = {role: counts[int(ids)] for role, counts in FUSED_INSTRUCTIONS.items()}
    in_prologue = d <= prologue_max_dim
    names = ["positive", "scores", "lse_merge"] if margin else ["scores", "lse_merge"]
    if gradients:
        names += ["grad_x_prologue", "grad_y"] if in_prologue else ["grads", "grad_x", "grad_y"]
    out = {name: Kernel(name) for name in names}
    out["scores"].serial_epilogue = occupancy(score_tile) == 1
    stats_blocks = math.ceil(n / score_tile.block_n)
    padded = math.ceil(n / 16) * 16  # S's row, padded with -inf to 16 columns
    for start, r in chunks(rows, chunk):
        scores = out["scores"]
        busy = add_gemm_launch(scores, False, score_tile, r, n, d, precision, at_peak)
        if margin:
            out["positive"].bytes += r * d * (2 * e + 32.0)
            instructions = count["scores_margin"] * r * n
        else:  # the tiles holding a positive: at most 2 column tiles per row block
            diagonal = min(n, 2 * score_tile.block_n) * r
            instructions = count["scores"] * r * n + (count["scores_diagonal"] - count["scores"]) * diagonal
        scores.add_work(exps=r * n, instructions=instructions, busy=busy)
        scores.bytes += (r + n) * d * e + 8.0 * r * stats_blocks + (4.0 * r * padded if gradients else 0.0)
        out["lse_merge"].bytes += MERGE_BYTES * r * stats_blocks
        out["lse_merge"].add_work(exps=r * stats_blocks)
        if not gradients:
            continue
        if in_prologue:
            grad_x, blocks = out["grad_x_prologue"], math.ceil(d / grad_x_tile.block_n)
            fraction, busy = gemm_fraction(False, grad_x_tile, r, d, precision, at_peak=at_peak, a_bytes=4,
                                           a_in_registers=True)  # fmt: skip
            grad_x.add_gemm(2.0 * r * n * d, fraction, precision)
            grad_x.add_work(exps=r * n * blocks, instructions=count["grad_x"] * r * n * blocks, busy=busy)
            grad_x.bytes += (4.0 + g_bytes) * r * padded + n * d * e + 4.0 * r * d
        else:
            out["grads"].add_work(exps=r * n, instructions=count["grads"] * r * n)
            out["grads"].bytes += (4.0 + g_bytes) * r * padded
            grad_x = out["grad_x"]
        add_stored_g_gemms(None if in_prologue else grad_x, out["grad_y"], True, r, n, d, precision,
                           first=start == 0, aligned=aligned, at_peak=at_peak)  # fmt: skip
    return list(out.values())

"""The cost model of mmfast.late_interaction_loss's Triton backend on an H100 SXM (pure Python; the GPU,
the tile fractions and Kernel are kernels/roofline_tiles.py's): one fwd+bwd of B queries of L_q tokens
against N candidates of L_d tokens, D dims. Estimates, not measurements: nobody here has a GPU.

  maxsim          kernels/late_interaction_loss.py: the token-score GEMM ([B·L_q, N·L_d] × D) in a
                  64 × 64 × BLOCK_D Triton tile (its fraction of peak from tile_fraction, with the
                  compiled registers and shared memory of MAXSIM_TILES), plus its epilogue on CUDA
                  cores, ~6 lane-instructions per token score (bias add, row max, compare, select,
                  min over the columns holding the max) not overlapped with the GEMM (serial). HBM:
                  every document once (a document's programs run back to back over the query blocks,
                  so it is read from L2 after the first), the queries, and the max and arg-max written.
  sort            torch.sort (CUB radix sort) of the B·L_q·N int32 keys with their int64 order: about
                  3 passes over 20-bit keys, each reading and writing 12 bytes per pair, plus the keys
                  built from the arg-max (read 4, written 4) and searchsorted (negligible).
  grad_query      the gather: per (query token, candidate) the arg-max (4 B) and the winning document
                  row (D·e bytes, from HBM: the documents outgrow L2), 2·D FLOPs on the FP32 units.
  grad_documents  the segmented sum: per pair its int64 order entry (8 B) and a query row (L2-resident,
                  B·L_q·D·e bytes in all), 2·D FLOPs; dD written once (N·L_d·D·e).
Against: the bare GEMM of the token scores (one GEMM at cuBLAS's 0.75 of peak) and colpali-engine's
einsum path (the forward GEMM and the two backward GEMMs at cuBLAS's fraction, or its token scores in
the input dtype written, read by amax, their gradient written, and read by both backward GEMMs: 5
times their bytes, whichever is longer).
"""

from __future__ import annotations

from mmfast.kernels.roofline_tiles import CUBLAS_FRACTION, H100, PRECISION_BYTES, GemmTile, Kernel, tile_fraction

# kernels/late_interaction_loss.py's MAXSIM_CONFIGS with the sm_90 registers and shared memory of
# their compiled variants (python -m mmfast.kernels.aot --filter late_interaction; the worst over
# bf16/fp16 for the 16-bit entry). tests/test_compile.py checks these numbers against the compile.
MAXSIM_TILES = {"16-bit": GemmTile(64, 64, 32, 8, 2, 127, 8192), "fp32": GemmTile(64, 64, 8, 8, 2, 114, 4096)}
EPILOGUE_INSTRUCTIONS_PER_SCORE = 6.0
SORT_BYTES_PER_PAIR = 3 * 2 * 12 + 8.0


def late_interaction_kernels(b: int, n: int, lq: int, ld: int, d: int, precision: str) -> list[Kernel]:
    """The kernels of one fwd+bwd (module docstring); `precision` "bf16", "fp16" or "fp32"."""
    e = PRECISION_BYTES[precision]
    query_tokens, pairs = b * lq, b * lq * n
    maxsim = Kernel("maxsim", serial_epilogue=True)
    tile = MAXSIM_TILES["fp32" if precision == "fp32" else "16-bit"]
    fit = tile_fraction(tile, query_tokens, n * tile.block_n, precision)
    maxsim.add_gemm(2.0 * query_tokens * n * ld * d, fit["fraction"], precision)
    maxsim.add_work(instructions=EPILOGUE_INSTRUCTIONS_PER_SCORE * query_tokens * n * ld, busy=fit["waves"])
    maxsim.bytes = (n * ld + query_tokens) * d * e + 8.0 * pairs
    sort = Kernel("sort", bytes=SORT_BYTES_PER_PAIR * pairs)
    grad_query = Kernel("grad_query", bytes=(4.0 + d * e) * pairs + 4.0 * query_tokens * d)
    grad_query.cuda_core_flops = 2.0 * pairs * d
    grad_documents = Kernel("grad_documents", bytes=8.0 * pairs + n * ld * d * e + query_tokens * d * e)
    grad_documents.cuda_core_flops = 2.0 * pairs * d
    return [maxsim, sort, grad_query, grad_documents]


def bare_gemm_seconds(b: int, n: int, lq: int, ld: int, d: int, precision: str) -> float:
    """The GEMM of every token score at cuBLAS's fraction of peak: what the fused forward is held to."""
    return 2.0 * b * lq * n * ld * d / (H100.peak(precision) * CUBLAS_FRACTION)


def einsum_seconds(b: int, n: int, lq: int, ld: int, d: int, precision: str) -> float:
    """colpali-engine's fwd+bwd: three GEMMs of the token scores at cuBLAS's fraction, or its token
    scores' traffic (5 passes in the input dtype), whichever is longer."""
    score_bytes = float(b) * lq * n * ld * PRECISION_BYTES[precision]
    return max(3 * bare_gemm_seconds(b, n, lq, ld, d, precision), 5 * score_bytes / H100.hbm_bytes_per_s)

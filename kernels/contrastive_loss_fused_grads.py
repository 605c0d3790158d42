"""The backward half of the fused contrastive path (kernels/contrastive_loss_fused.py, which runs
the score kernel and the merge first): G from the stored S, and the two gradient GEMMs on it.

Per chunk of rows and candidate piece:
  D <= PROLOGUE_MAX_DIM: fused_grad_x_kernel forms G in the A-operand prologue of dX = G·Y (once
              per D block); its first D block stores G and the tensor-τ reduction.
  larger D:   the same kernel without its GEMM ("grads": G and the τ reduction, once per score),
              then dX = G·Y on the stored G
  dY          dY (+)= Gᵀ·X_c on the stored G
The plain GEMMs on the stored G (dX for D > PROLOGUE_MAX_DIM, dY) run through the kernel set's
cuBLAS GEMMs (`gemms`, mmfast.backends.chunked.CublasGemms: torch.mm into float32, handed in by the
kernel set), on every device: they are plain GEMMs, where cuBLAS (0.75 of peak in the cost model)
beats the Triton tile (0.55); under the interpreter the same calls run on exact float32 copies, so
the tests cover the code that runs on CUDA. Only the prologue GEMM, whose A operand is formed in
registers, is Triton's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GRADS_PROGRAMS = 1024  # enough programs of the G-alone kernel to fill an H100 (132 SMs) several times


def padded_width(n: int) -> int:
    """S's and G's row of n candidates, padded to 16 columns (16-byte vectors, aligned launches)."""
    return triton.cdiv(n, 16) * 16


@triton.jit(do_not_specialize=["col_offset", "pos_offset", "accumulate", "store_dx", "store_grads", "split_cols"])
def fused_grad_x_kernel(
    s_ptr, y_ptr, dx_ptr, g_ptr, lse_ptr, pos_ptr, row_scale_ptr, params_ptr, ids_ptr, w_ptr,
    M, N, n_padded, D, col_offset, pos_offset, accumulate, store_dx, store_grads, split_cols,
    stride_sm, stride_sn, stride_yn, stride_yd, stride_dm, stride_dd, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_IDS: tl.constexpr,
    TEMPERATURE_GRAD: tl.constexpr, DX_IN_PROLOGUE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Grid (D blocks, row blocks): the D blocks of one row block are neighbours in launch order, so
    # they read the same S rows while those are in L2, and the row blocks running at once share each
    # Y tile. Without DX_IN_PROLOGUE (G alone; dX is a GEMM on the stored G) axis 0 splits the
    # candidates instead, split_cols each (a multiple of BLOCK_N), so that a chunk of few rows still
    # fills the GPU; each split writes its own partial τ reduction.
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    if DX_IN_PROLOGUE:
        first_col = 0
        last_col = N
        first_block = rows * 0 + pid_d == 0  # [BM]: the D block that stores G and the τ reduction
        w_row = 0
    else:
        first_col = pid_d * split_cols
        last_col = tl.minimum(N, first_col + split_cols)
        first_block = rows >= 0
        w_row = pid_d
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    rn = tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < M
    inv_temperature = tl.load(params_ptr)
    negative_scale = tl.load(params_ptr + 1)
    margin = tl.load(params_ptr + 2)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0) * inv_temperature  # 0 past the edge
    pos_grad = (tl.exp(pos * inv_temperature - lse) - 1.0) * coef
    limit = pos + margin
    pos_col = pos_offset + rows - col_offset
    if HAS_IDS:
        pos_id = tl.load(ids_ptr + pos_offset + rows, mask=row_ok, other=0)

    # Scalar 64-bit bases advanced per step, 32-bit offsets within a tile: tensors of 64-bit pointers
    # cost two registers per element and spilled this kernel.
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    s_base = s_ptr + first_row * stride_sm + first_col * stride_sn
    g_base = g_ptr + first_row * stride_gm + first_col * stride_gn
    y_base = y_ptr + first_col.to(tl.int64) * stride_yn
    local = tl.arange(0, BLOCK_M)
    s_offsets = local[:, None] * stride_sm + rn[None, :] * stride_sn  # [BM, BN]
    g_offsets = local[:, None] * stride_gm + rn[None, :] * stride_gn  # [BM, BN]
    y_offsets = rn[:, None] * stride_yn + (dcols % D)[None, :] * stride_yd  # [BN, BD]
    # G is stored once, by the first D block (and not at all when no candidate wants a gradient).
    # The runtime flags become row masks: a masked-off load or store moves no bytes.
    g_rows = row_ok & (tl.full((BLOCK_M,), store_grads, tl.int32) != 0) & first_block
    dx_rows = row_ok & (tl.full((BLOCK_M,), store_dx, tl.int32) != 0)
    add_rows = dx_rows & (tl.full((BLOCK_M,), accumulate, tl.int32) != 0)
    dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * stride_dm + dcols[None, :] * stride_dd
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    weighted = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(first_col, last_col, BLOCK_N):
        cols = start + rn
        col_ok = cols < N
        # S is -inf past N (the score kernel's padding, and this load's `other`): its exp is 0, so G
        # needs no column mask, and the masks here are whole 16-byte vectors.
        s = tl.load(s_base + s_offsets, mask=row_ok[:, None] & (cols < n_padded)[None, :], other=float("-inf"))
        # Prologue: G from S in registers, the row kernel's formula.
        keep = (cols[None, :] != pos_col[:, None]) & ~(s > limit[:, None])
        if HAS_IDS:
            col_id = tl.load(ids_ptr + col_offset + cols, mask=col_ok, other=0)
            keep = keep & (col_id[None, :] != pos_id[:, None])
        # exp2 of (logit - lse)·log2 e: the ex2 instruction alone (tl.exp adds a range fix-up sequence),
        # and exact where it matters, as logit - lse is near 0 for the large terms.
        g = tl.where(keep, tl.exp2((s * negative_scale - lse[:, None]) * 1.4426950408889634) * coef[:, None], 0.0)
        g = tl.where(cols[None, :] == pos_col[:, None], pos_grad[:, None], g)
        if TEMPERATURE_GRAD:  # Σ_j G_j·(s_j - s_pos): the positive's own term is 0
            above = tl.where(s == float("-inf"), 0.0, s - pos[:, None])  # no 0·(-inf) past the edges
            weighted += tl.sum(tl.where(keep, g * above, 0.0), axis=1)
        tl.store(g_base + g_offsets, g.to(g_ptr.dtype.element_ty), mask=g_rows[:, None] & (cols < n_padded)[None, :])
        if DX_IN_PROLOGUE:
            y = tl.load(y_base + y_offsets, mask=col_ok[:, None], other=0.0)
            acc = tl.dot(g.to(DOT_DTYPE), y.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        s_base += BLOCK_N * stride_sn
        g_base += BLOCK_N * stride_gn
        y_base += BLOCK_N * stride_yn
    if DX_IN_PROLOGUE:
        # Added at the end, in the accumulator's layout: loaded at the start it stays live in a
        # second layout through the loop (spills, as in matmul_kernel's 128×128 tiles).
        acc += tl.load(dx_ptrs, mask=add_rows[:, None] & (dcols[None, :] < D), other=0.0)
        tl.store(dx_ptrs, acc, mask=dx_rows[:, None] & (dcols[None, :] < D))
    if TEMPERATURE_GRAD:
        tl.store(w_ptr + w_row * M + rows, weighted, mask=row_ok & first_block)


def fused_grads(x, pieces, starts, scores, grads, lse, pos, params, ids, row_scale, grad_cfg, *, row_offset: int,
                in_prologue: bool, gemms, grad_x, grad_pieces, accumulate_x, accumulate_pieces, temperature_grad,
                dot_dtype, precision):  # fmt: skip
    """G of one chunk x [rows, D] against the candidate pieces from its S (`scores`, laid out at
    `starts`) and row logsumexp `lse`, into `grads`; dX into (or, accumulate_x, onto) grad_x, dY
    onto (accumulate_pieces) or into grad_pieces[i] (None: skipped), w_r into temperature_grad."""
    rows, dim = x.shape
    row_blocks = triton.cdiv(rows, grad_cfg.block_m)
    w_parts = []
    col = 0
    for i, (piece, start) in enumerate(zip(pieces, starts, strict=True)):
        n = piece.shape[0]
        s, g = scores[:, start : start + n], grads[:, start : start + n]
        dx = lse if grad_x is None else grad_x
        if in_prologue:
            blocks, split_cols = triton.cdiv(dim, grad_cfg.block_k), n
        else:  # G alone: split the candidates until there are ~GRADS_PROGRAMS programs
            tiles = triton.cdiv(n, grad_cfg.block_n)
            split_cols = triton.cdiv(tiles, min(tiles, triton.cdiv(GRADS_PROGRAMS, row_blocks))) * grad_cfg.block_n
            blocks = triton.cdiv(n, split_cols)
        w = None if temperature_grad is None else torch.empty(1 if in_prologue else blocks, rows, device=x.device)
        fused_grad_x_kernel[(blocks, row_blocks)](
            s, piece, dx, g, lse, pos, row_scale, params, pos if ids is None else ids, lse if w is None else w,
            rows, n, padded_width(n), dim, col, row_offset, int(accumulate_x or i > 0), int(in_prologue),
            int(grad_pieces[i] is not None or (grad_x is not None and not in_prologue)), split_cols,
            s.stride(0), s.stride(1), piece.stride(0), piece.stride(1), dx.stride(0), dx.stride(-1),
            g.stride(0), g.stride(1),
            BLOCK_M=grad_cfg.block_m, BLOCK_N=grad_cfg.block_n, BLOCK_D=grad_cfg.block_k, HAS_IDS=ids is not None,
            TEMPERATURE_GRAD=w is not None, DX_IN_PROLOGUE=in_prologue, DOT_DTYPE=dot_dtype,
            INPUT_PRECISION=precision, num_warps=grad_cfg.num_warps, num_stages=grad_cfg.num_stages,
        )  # fmt: skip
        if w is not None:
            w_parts.append(w.sum(dim=0))
        if grad_x is not None and not in_prologue:
            gemms.matmul(g, piece, grad_x, accumulate=accumulate_x or i > 0)
        if grad_pieces[i] is not None:
            gemms.matmul(g.T, x, grad_pieces[i], accumulate=accumulate_pieces)
        col += n
    if temperature_grad is not None:
        torch.sum(torch.stack(w_parts), dim=0, out=temperature_grad)

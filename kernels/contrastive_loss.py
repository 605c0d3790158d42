"""Triton kernels of mmfast.contrastive_loss (the chunk loop is mmfast/backends/contrastive_loss.py,
which builds TritonContrastiveKernels with the torch kernel set as its fallback).

Per chunk of rows:
  scores      S = X·Yᵀ in float32                     kernels/matmul.py, DOT_DTYPE = input dtype
  row kernel  masks + hardness + exact logsumexp,      softmax_rows_kernel below: one program per
              then G = dLoss/dS in the input dtype       row, two passes over it (online max/sum, then G);
                                                         with duplicate ids it reads one int32 per
                                                         candidate (HAS_IDS) and leaves out copies
  gradients   dX = G·Y, dY += Gᵀ·X into float32        kernels/matmul.py (bf16/fp16 G and inputs:
                                                         tensor cores)
The top-k path selects with torch.sort on the same float32 chunk (a stable sort: ties to the lower
index) and applies its sparse gradient with gathers and index_add_, as the torch backend does.
float64 inputs use torch.mm for the GEMMs (tl.dot has no float64) and the row kernel in float64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mmfast.kernel_contract import DirectionOptions
from mmfast.kernels import contrastive_loss_matryoshka, roofline
from mmfast.kernels.compile_spec import CompileSpec
from mmfast.kernels.contrastive_loss_fused import buffer_columns, direction_params, fused_direction_chunk
from mmfast.kernels.matmul import TritonGemms, device_arch, fp32_matmul_allows_tf32

# The paths of the dense loss (the chunk loop of mmfast/backends/contrastive_loss.py either way):
#   "chunked"  Triton GEMMs (kernels/matmul.py) around the Triton row kernel
#   "cublas"   torch.mm GEMMs (cuBLAS, float32 output from bf16/fp16) around the same row kernel
#   "fused"    kernels/contrastive_loss_fused.py: the row kernel's work in the GEMMs' epilogue and
#              prologue (its own chunk loop, mmfast/backends/contrastive_loss_fused.py); no top-k,
#              no float64, D a multiple of 16
# "auto" asks the cost model (kernels/roofline.py) on sm_90+ CUDA devices, the only GPU it models;
# elsewhere (sm_80, float64, CPU tensors under the interpreter) it keeps "chunked". It does not pick
# "fused": unproven on hardware, it runs when forced, even where the model, which prices it, puts it
# ahead (bf16 at B = 4096, D = 512 in benchmarks/gpu_report.py; "cublas" everywhere else). The
# variable forces a path (the tests run every one).
PATH_VARIABLE = "MMFAST_CONTRASTIVE_PATH"
PATH_CHOICES = ("auto", "chunked", "cublas", "fused")
ROOFLINE_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# One program per row, BLOCK_N candidates per step. Every launchable combination is compiled by
# tests/test_compile.py: scores dtype {fp32, fp64} × G dtype × HAS_MARGIN × HAS_GRAD × TEMPERATURE_GRAD
# × HAS_IDS.
ROW_BLOCK_N = 1024
ROW_NUM_WARPS = 4


@triton.jit
def softmax_rows_kernel(
    s_ptr, stride_s, g_ptr, stride_g, n, row_offset, params_ptr, row_scale_ptr, loss_ptr, temperature_grad_ptr,
    ids_ptr, n_block, column_diag_ptr, column_lse_ptr, column_coef_ptr, column_positive_ptr, column_ids_ptr,
    BLOCK_N: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_GRAD: tl.constexpr, TEMPERATURE_GRAD: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_COLUMNS: tl.constexpr,
):  # fmt: skip
    # The scalars come through memory in the scores' dtype: a Python float argument would arrive as
    # float32 and cost float64 inputs seven digits.
    inv_temperature = tl.load(params_ptr)
    negative_scale = tl.load(params_ptr + 1)
    margin = tl.load(params_ptr + 2)
    row = tl.program_id(0)
    s_row = s_ptr + row.to(tl.int64) * stride_s
    pos_col = row_offset + row
    pos = tl.load(s_row + pos_col)
    pos_logit = pos * inv_temperature
    limit = pos + margin
    # A candidate whose class index is the positive's is a copy of it, never a negative.
    pos_id = tl.load(ids_ptr + pos_col) if HAS_IDS else 0
    offsets = tl.arange(0, BLOCK_N)  # [BN]

    # Pass 1: online max and sum of exp over the negatives, seeded with the positive (running_max =
    # its logit, running_sum = exp(0) = 1), so the max is finite from the start.
    running_max = pos_logit
    running_sum = pos_logit * 0.0 + 1.0
    for start in range(0, n, BLOCK_N):
        cols = start + offsets
        s = tl.load(s_row + cols, mask=cols < n, other=0.0)  # [BN]
        keep = (cols < n) & (cols != pos_col)
        if HAS_MARGIN:
            keep = keep & ~(s > limit)  # NaN scores are kept and poison the loss, as in torch
        if HAS_IDS:
            keep = keep & (tl.load(ids_ptr + cols, mask=cols < n, other=0) != pos_id)  # [BN]
        logit = tl.where(keep, s * negative_scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logit, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logit - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(loss_ptr + row, lse - pos_logit)

    # Pass 2: G = c·(softmax - onehot)/τ, into g (the scores themselves for float32 inputs; a bf16 or
    # fp16 buffer otherwise, which the gradient GEMMs then read as tensor-core operands). With
    # TEMPERATURE_GRAD also w = Σ_j G_j·s_j, from G before its rounding to the g dtype, summed as
    # Σ_j G_j·(s_j - s_pos) (the same, as Σ_j G_j = 0) so that nothing cancels against G_pos; per lane
    # over the blocks and across lanes once at the end (a per-block reduction made the fp64 variant
    # spill on sm_90).
    # HAS_COLUMNS (a symmetric loss on one process, mmfast/backends/contrastive_columns.py): G also gets
    # the column gradient on the block columns [0, n_block), from the column logsumexps; the column
    # class indices always come (distinct ones without query ids), which costs one int32 per column.
    if HAS_GRAD:
        g_row = g_ptr + row.to(tl.int64) * stride_g
        coef = tl.load(row_scale_ptr + row) * inv_temperature
        pos_grad = (tl.exp(pos_logit - lse) - 1.0) * coef
        weighted = tl.zeros([BLOCK_N], dtype=pos_logit.dtype)
        own_column_id = tl.load(column_ids_ptr + pos_col) if HAS_COLUMNS else 0
        for start in range(0, n, BLOCK_N):
            cols = start + offsets
            s = tl.load(s_row + cols, mask=cols < n, other=0.0)
            keep = cols != pos_col
            if HAS_MARGIN:
                keep = keep & ~(s > limit)
            if HAS_IDS:
                keep = keep & (tl.load(ids_ptr + cols, mask=cols < n, other=0) != pos_id)
            g = tl.where(keep, tl.exp(s * negative_scale - lse) * coef, 0.0)
            g = tl.where(cols == pos_col, pos_grad, g)
            if TEMPERATURE_GRAD:
                weighted += tl.where(cols < n, g * (s - pos), 0.0)
            if HAS_COLUMNS:
                in_block = cols < n_block
                c_diag = tl.load(column_diag_ptr + cols, mask=in_block, other=0.0)
                c_lse = tl.load(column_lse_ptr + cols, mask=in_block, other=0.0)
                c_coef = tl.load(column_coef_ptr + cols, mask=in_block, other=0.0)
                c_keep = in_block & (tl.load(column_ids_ptr + cols, mask=in_block, other=0) != own_column_id)
                if HAS_MARGIN:
                    c_keep = c_keep & ~(s > c_diag + margin)
                column_g = tl.where(c_keep, tl.exp(s * negative_scale - c_lse) * c_coef, 0.0)
                g += tl.where(cols == pos_col, tl.load(column_positive_ptr + pos_col), column_g)
            tl.store(g_row + cols, g.to(g_row.dtype.element_ty), mask=cols < n)
        if TEMPERATURE_GRAD:
            tl.store(temperature_grad_ptr + row, tl.sum(weighted, axis=0))


COLUMN_BLOCK_R = 32
COLUMN_BLOCK_C = 128
COLUMN_NUM_WARPS = 4


@triton.jit
def column_stats_kernel(
    b_ptr, stride_b, rows, n_cols, row_offset, params_ptr, diag_ptr, ids_ptr, max_ptr, sum_ptr, weighted_ptr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_IDS: tl.constexpr,
    WEIGHTED: tl.constexpr,
):  # fmt: skip
    """A symmetric loss's column statistics (mmfast/backends/contrastive_columns.py): merges one chunk's
    block [rows, B] into each column's running max and float64 sum of exp(logit - max) (and, WEIGHTED,
    Σ exp(logit - max)·(s - d_i)). One program per BLOCK_C columns, online over BLOCK_R-row tiles in
    the scores' dtype; the merge into the running sums is in float64."""
    negative_scale = tl.load(params_ptr + 1)
    margin = tl.load(params_ptr + 2)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    col_ok = cols < n_cols
    diag = tl.load(diag_ptr + cols, mask=col_ok, other=0.0)
    own_id = tl.load(ids_ptr + cols, mask=col_ok, other=0) if HAS_IDS else 0
    old_max = tl.load(max_ptr + cols, mask=col_ok, other=0.0)
    running_max = old_max
    running_sum = tl.zeros([BLOCK_C], dtype=diag.dtype)
    weighted = tl.zeros([BLOCK_C], dtype=diag.dtype)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)  # [BR]
        inside = (r < rows)[:, None] & col_ok[None, :]  # [BR, BC]
        v = tl.load(b_ptr + r[:, None].to(tl.int64) * stride_b + cols[None, :], mask=inside, other=0.0)
        keep = inside & ((row_offset + r)[:, None] != cols[None, :])
        if HAS_MARGIN:
            keep = keep & ~(v > (diag + margin)[None, :])
        if HAS_IDS:
            row_id = tl.load(ids_ptr + row_offset + r, mask=r < rows, other=0)
            keep = keep & (row_id[:, None] != own_id[None, :])
        logit = tl.where(keep, v * negative_scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logit, axis=0))
        rescale = tl.exp(running_max - new_max)
        e = tl.exp(logit - new_max[None, :])
        running_sum = running_sum * rescale + tl.sum(e, axis=0)
        if WEIGHTED:
            weighted = weighted * rescale + tl.sum(e * (v - diag[None, :]), axis=0)
        running_max = new_max
    rescale = tl.exp((old_max - running_max).to(tl.float64))
    total = tl.load(sum_ptr + cols, mask=col_ok, other=0.0) * rescale + running_sum.to(tl.float64)
    tl.store(sum_ptr + cols, total, mask=col_ok)
    if WEIGHTED:
        total_weighted = tl.load(weighted_ptr + cols, mask=col_ok, other=0.0) * rescale + weighted.to(tl.float64)
        tl.store(weighted_ptr + cols, total_weighted, mask=col_ok)
    tl.store(max_ptr + cols, running_max, mask=col_ok)


class TritonContrastiveKernels(TritonGemms):
    """Triton GEMMs and row kernel; the top-k selection and its sparse gradient are the torch
    kernel set's (`fallback`, mmfast.backends.contrastive_kernels.TorchContrastiveKernels)."""

    dense_bytes_per_score = 6  # float32 scores + a 16-bit G

    def __init__(self, fallback, cublas):
        super().__init__(fallback)
        self.cublas = cublas  # mmfast.backends.chunked.CublasGemms, handed in by the chunk loop's module

    def path(self, n_rows, n_candidates, dim, dtype, opts: DirectionOptions, *, chunk, device, gradients=True) -> str:
        """The path for this problem: the one MMFAST_CONTRASTIVE_PATH forces, or "auto"'s choice."""
        forced = os.environ.get(PATH_VARIABLE, "").strip() or "auto"
        if forced not in PATH_CHOICES:
            raise ValueError(f"{PATH_VARIABLE}={forced!r}: expected one of {', '.join(PATH_CHOICES)}")
        if forced == "fused":  # where it applies; the rest (top-k, float64, other D) stays chunked
            return "fused" if self.fused_supports(dim, dtype, opts) else "chunked"
        if forced != "auto":
            return forced
        if dtype == torch.float64 or device.type != "cuda" or device_arch(device) < 90:
            return "chunked"
        precision = ROOFLINE_PRECISION.get(dtype) or ("tf32" if fp32_matmul_allows_tf32() else "fp32")
        aligned = dim % 16 == 0 and n_candidates % 16 == 0
        dense = gradients and opts.topk is None  # top-k's gradient is sparse: only its score GEMM counts
        return roofline.choose_path(n_rows, n_candidates, dim, precision, chunk, gradients=dense, aligned=aligned)

    def gemms(self, path: str):
        return self.cublas if path == "cublas" else self

    @property
    def topk_bytes_per_score(self) -> int:
        return self.fallback.topk_bytes_per_score

    temperature_bytes_per_score = 0  # the row kernel reads S again in its second pass
    column_dense_bytes_per_score = 0  # the row kernel adds the column gradient as it writes G

    @property
    def column_topk_bytes_per_score(self) -> int:
        return self.fallback.column_topk_bytes_per_score

    def column_topk(self, block, row_offset, opts: DirectionOptions, diag, ids, values, index):
        self.fallback.column_topk(block, row_offset, opts, diag, ids, values, index)

    def column_stats(self, block, row_offset, opts: DirectionOptions, diag, ids, running_max, running_sum,
                     weighted=None):  # fmt: skip
        n_cols = block.shape[1]
        params = direction_params(opts, block.dtype, block.device, no_margin=0.0)
        column_stats_kernel[(triton.cdiv(n_cols, COLUMN_BLOCK_C),)](
            block, block.stride(0), block.shape[0], n_cols, row_offset, params, diag,
            diag if ids is None else ids, running_max, running_sum, running_sum if weighted is None else weighted,
            BLOCK_R=COLUMN_BLOCK_R, BLOCK_C=COLUMN_BLOCK_C, HAS_MARGIN=opts.false_negative_margin is not None,
            HAS_IDS=ids is not None, WEIGHTED=weighted is not None, num_warps=COLUMN_NUM_WARPS,
        )  # fmt: skip

    fused_bytes_per_score = {torch.float32: 8, torch.bfloat16: 6, torch.float16: 6}  # S + G, by input dtype

    def fused_supports(self, dim: int, dtype: torch.dtype, opts: DirectionOptions) -> bool:
        """The fused path takes no top-k, only tl.dot dtypes, and D a multiple of 16 (the aligned
        launches its AOT variants are compiled as)."""
        return opts.topk is None and dtype in self.fused_bytes_per_score and dim % 16 == 0

    def fused_buffer_width(self, pieces) -> int:
        """Columns of the fused path's S and G buffers (buffer_columns: 16-aligned pieces)."""
        return buffer_columns(pieces)[1]

    def fused_chunk(self, x, pieces, opts: DirectionOptions, row_offset, loss, ids, **grads):
        # The GEMMs on its stored G are plain GEMMs: the cublas path's (kernels/contrastive_loss_fused_grads.py).
        fused_direction_chunk(x, pieces, opts, row_offset, loss, ids, gemms=self.cublas, **grads)

    def matryoshka_rows_supports(self, m: int, dtype: torch.dtype, opts: DirectionOptions) -> bool:
        return contrastive_loss_matryoshka.supports(m, dtype, opts)

    def matryoshka_rows(self, blocks, row_offset, opts: DirectionOptions, a, b, row_scale, loss, alpha, beta, ids):
        """Matryoshka's dense rows in one program per row (kernels/contrastive_loss_matryoshka.py)."""
        contrastive_loss_matryoshka.matryoshka_rows(blocks, row_offset, opts, a, b, row_scale, loss, alpha, beta, ids)

    def topk_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, index, coef,
                  temperature_grad=None, ids=None):  # fmt: skip
        self.fallback.topk_rows(scores, row_offset, opts, row_scale, loss, index, coef, temperature_grad, ids)

    def sparse_grads(self, x, pieces, index, coef, grad_x, grad_pieces):
        self.fallback.sparse_grads(x, pieces, index, coef, grad_x, grad_pieces)

    def softmax_rows(self, scores, row_offset, opts: DirectionOptions, row_scale, loss, grad_out,
                     temperature_grad=None, ids=None, columns=None):  # fmt: skip
        rows = scores.shape[0]
        has_grad = row_scale is not None
        grad_out = scores if grad_out is None else grad_out
        params = direction_params(opts, scores.dtype, scores.device, no_margin=0.0)
        has_columns = columns is not None and has_grad
        column_args = (0, loss, loss, loss, loss, loss)  # unread placeholders
        if has_columns:
            n_block = columns.lse.shape[0]
            column_ids = columns.ids
            if column_ids is None:  # distinct classes: only the column's own query is left out
                column_ids = torch.arange(n_block, dtype=torch.int32, device=scores.device)
            column_args = (n_block, columns.diag, columns.lse, columns.coef, columns.positive, column_ids)
        softmax_rows_kernel[(rows,)](
            scores, scores.stride(0), grad_out, grad_out.stride(0), scores.shape[1], row_offset, params,
            row_scale if has_grad else loss, loss, loss if temperature_grad is None else temperature_grad,
            loss if ids is None else ids, *column_args,
            BLOCK_N=ROW_BLOCK_N, HAS_MARGIN=opts.false_negative_margin is not None, HAS_GRAD=has_grad,
            TEMPERATURE_GRAD=temperature_grad is not None, HAS_IDS=ids is not None, HAS_COLUMNS=has_columns,
            num_warps=ROW_NUM_WARPS,
        )  # fmt: skip


def compile_specs():
    """Every variant of the row kernel: scores dtype × G dtype × HAS_MARGIN × HAS_GRAD × TEMPERATURE_GRAD
    × HAS_IDS × HAS_COLUMNS (the temperature reduction and the column terms only exist with a
    gradient; without ids or columns the launcher passes the loss buffer for their pointers, unread);
    and of the column statistics: scores dtype × HAS_MARGIN × HAS_IDS × WEIGHTED."""
    variants = [("fp32", None), ("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("fp64", None), ("fp64", "fp64")]
    for scores, grads in variants:
        for has_margin in (False, True):
            for temperature_grad in (False, True) if grads else (False,):
                for has_ids in (False, True):
                    for has_columns in (False, True) if grads else (False,):
                        yield _row_spec(scores, grads, has_margin, temperature_grad, has_ids, has_columns)
    for scores in ("fp32", "fp64"):
        for has_margin in (False, True):
            for has_ids in (False, True):
                for weighted in (False, True):
                    signature = {
                        "b_ptr": f"*{scores}", "stride_b": "i32", "rows": "i32", "n_cols": "i32", "row_offset": "i32",
                        "params_ptr": f"*{scores}", "diag_ptr": f"*{scores}",
                        "ids_ptr": "*i32" if has_ids else f"*{scores}", "max_ptr": f"*{scores}", "sum_ptr": "*fp64",
                        "weighted_ptr": "*fp64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
                        "HAS_MARGIN": "constexpr", "HAS_IDS": "constexpr", "WEIGHTED": "constexpr",
                    }  # fmt: skip
                    constexprs = {"BLOCK_R": COLUMN_BLOCK_R, "BLOCK_C": COLUMN_BLOCK_C, "HAS_MARGIN": has_margin,
                                  "HAS_IDS": has_ids, "WEIGHTED": weighted}  # fmt: skip
                    yield CompileSpec(
                        name=f"contrastive_column_stats[{scores},margin={int(has_margin)},ids={int(has_ids)}"
                        f"{',temperature' if weighted else ''}]",
                        kernel=column_stats_kernel, signature=signature, constexprs=constexprs,
                        num_warps=COLUMN_NUM_WARPS, num_stages=1,
                    )  # fmt: skip


def _row_spec(scores, grads, has_margin, temperature_grad, has_ids, has_columns) -> CompileSpec:
    signature = {
        "s_ptr": f"*{scores}", "stride_s": "i32", "g_ptr": f"*{grads or scores}", "stride_g": "i32",
        "n": "i32", "row_offset": "i32", "params_ptr": f"*{scores}", "row_scale_ptr": f"*{scores}",
        "loss_ptr": f"*{scores}", "temperature_grad_ptr": f"*{scores}",
        "ids_ptr": "*i32" if has_ids else f"*{scores}", "n_block": "i32", "column_diag_ptr": f"*{scores}",
        "column_lse_ptr": f"*{scores}", "column_coef_ptr": f"*{scores}", "column_positive_ptr": f"*{scores}",
        "column_ids_ptr": "*i32" if has_columns else f"*{scores}", "BLOCK_N": "constexpr",
        "HAS_MARGIN": "constexpr", "HAS_GRAD": "constexpr", "TEMPERATURE_GRAD": "constexpr",
        "HAS_IDS": "constexpr", "HAS_COLUMNS": "constexpr",
    }  # fmt: skip
    constexprs = {"BLOCK_N": ROW_BLOCK_N, "HAS_MARGIN": has_margin, "HAS_GRAD": grads is not None,
                  "TEMPERATURE_GRAD": temperature_grad, "HAS_IDS": has_ids, "HAS_COLUMNS": has_columns}  # fmt: skip
    return CompileSpec(
        name=f"contrastive_softmax_rows[{scores},grad={grads},margin={int(has_margin)}"
        f"{',temperature' if temperature_grad else ''},ids={int(has_ids)}{',columns' if has_columns else ''}]",
        kernel=softmax_rows_kernel, signature=signature, constexprs=constexprs,
        num_warps=ROW_NUM_WARPS, num_stages=1,
    )  # fmt: skip

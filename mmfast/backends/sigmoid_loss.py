"""The chunked sigmoid (SigLIP) loss, shared by the torch, cpu and triton backends.

Per chunk of rows of the queries x against the candidates y (targets, then the negatives):

    S = x[chunk] · yᵀ                        GEMM 1 -> a [rows, N] scratch buffer, never [B, N]
    loss, G = row kernel(S)                  logits t·S + b, labels, Σ_j -log σ(z·logit), and
                                             G = t·g written over S, g = dLoss/dlogit
    dx[chunk] = G · y ;  dy += Gᵀ · x[chunk]  GEMMs 2 and 3 (only when gradients are wanted)

g_ij = row_scale_i · (-z_ij) · σ(-z_ij·logit_ij). A scale t or bias b that wants a gradient adds
reductions per row to the row kernel: Σ_j g_ij·s_ij (dTotal/dt = its sum over rows) and Σ_j g_ij
(dTotal/db).

Labels: candidate j is a positive of row i when j = positive_offset + i or, with duplicate ids
(mmfast/duplicate_ids.class_index: int32 [N]), when ids[j] equals the id of that candidate.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from mmfast._extension import load_extension
from mmfast.backends.chunked import TorchGemms, chunk_rows, scratch, work_copy
from mmfast.distributed import Gathered
from mmfast.kernel_contract import compute_dtype


class GradientNeeds(NamedTuple):
    """Which inputs want a gradient, in the order of the op's inputs and of its returned gradients."""

    query: bool = False
    target: bool = False
    negatives: bool = False
    gathered_targets: bool = False
    logit_scale: bool = False
    logit_bias: bool = False

    def returned(self, *, local: bool) -> GradientNeeds:
        """The gradients the op returns: across devices (not `local`) the rows read the gathered
        targets, not the local ones; on one process there are no gathered targets."""
        return self._replace(target=self.target and local, gathered_targets=self.gathered_targets and not local)


NO_GRADIENTS = GradientNeeds()


class TorchSigmoidKernels(TorchGemms):
    """Pure-PyTorch row kernel; GEMMs through torch.mm (MKL on CPU, cuBLAS on CUDA)."""

    # Scratch bytes per score: S, the labels, the signed logits, log σ's temporary and g.
    bytes_per_score = 17

    def pair_rows(self, scores, row_offset, scale, bias, row_scale, loss, grad_out, scale_grad=None,
                     bias_grad=None, ids=None):  # fmt: skip
        """Loss of each row into `loss`; with row_scale, G = scale·g into grad_out (here always
        `scores`), and Σ_j g_j·s_j into `scale_grad`, Σ_j g_j into `bias_grad` when given.
        `scale`, `bias`: numbers or 0-d tensors in the scores' dtype."""
        rows = torch.arange(scores.shape[0], device=scores.device)
        cols = rows + row_offset
        if ids is None:
            positive = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            positive[rows, cols] = True
        else:
            positive = ids[None, :] == ids[cols][:, None]
        logits = scores * scale + bias
        signed = torch.where(positive, logits, -logits)
        torch.sum(torch.nn.functional.logsigmoid(signed), dim=1, out=loss).neg_()
        if row_scale is None:
            return
        g = torch.sigmoid(signed.neg_()).mul_(row_scale[:, None])
        g = torch.where(positive, -g, g)
        if scale_grad is not None:
            torch.sum(g * scores, dim=1, out=scale_grad)
        if bias_grad is not None:
            torch.sum(g, dim=1, out=bias_grad)
        torch.mul(g, scale, out=grad_out)


class CpuSigmoidKernels(TorchSigmoidKernels):
    """The C++ row kernel (csrc/sigmoid_loss.cpp); GEMMs stay on MKL through torch.mm."""

    bytes_per_score = 4  # G overwrites S in place

    def __init__(self, extension):
        self.ext = extension

    def pair_rows(self, scores, row_offset, scale, bias, row_scale, loss, grad_out, scale_grad=None,
                     bias_grad=None, ids=None):  # fmt: skip
        # Tensor parameters are on the CPU here: float() reads them without a device sync.
        self.ext.sigmoid_pair_rows(
            scores, row_offset, float(scale), float(bias), row_scale, loss, scale_grad, bias_grad, ids
        )


@functools.cache
def sigmoid_kernels(backend: str):
    """The kernel set of a resolved backend (one instance per backend)."""
    if backend == "cpu":
        return CpuSigmoidKernels(load_extension())
    if backend == "triton":
        from mmfast.kernels.sigmoid_loss import TritonSigmoidKernels  # needs triton: imported when asked

        return TritonSigmoidKernels(fallback=TorchSigmoidKernels())
    return TorchSigmoidKernels()


def sigmoid_loss_rows(
    backend: str,
    query: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    row_scale: torch.Tensor | None,
    needs: GradientNeeds,
    gathered: Gathered | None = None,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-row loss [B] (in compute_dtype) and, when `row_scale` is given, the gradients of
    Σ_i row_scale_i·loss_i for the inputs flagged in `needs`, in its order (query, target,
    negatives, gathered targets, logit_scale, logit_bias); None for those not asked for or not read.
    A tensor logit_scale / logit_bias (0-d) gets its gradient in its own dtype.

    On one process (`gathered` None) the candidates are [target; negatives]; across devices they are
    [gathered.targets; gathered.negatives] (`negatives` is then gathered.negatives) and query i's
    positive is gathered target gathered.offset + i. `ids`: the candidates' int32 class indices [N]
    (duplicate_ids.class_index) or None.
    """
    kernels = sigmoid_kernels(backend)
    score_dtype = compute_dtype(query.dtype)

    def work(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or x.shape[0] == 0 else work_copy(x, score_dtype, kernels.native_low_precision)

    local = gathered is None
    want = row_scale is not None
    returned = needs.returned(local=local) if want else NO_GRADIENTS
    q, n = work(query), work(negatives)
    candidates_t = work(target) if local else work(gathered.targets)
    pieces = [candidates_t] if n is None else [candidates_t, n]
    n_rows, n_candidates = q.shape[0], sum(p.shape[0] for p in pieces)
    positive_offset = 0 if local else gathered.offset

    def grad_buffer(flag: bool, like: torch.Tensor | None) -> torch.Tensor | None:
        return torch.empty(like.shape, dtype=score_dtype, device=like.device) if flag and like is not None else None

    grad_q = grad_buffer(returned.query, q)
    grad_t = grad_buffer(returned.target or returned.gathered_targets, candidates_t)
    grad_n = grad_buffer(returned.negatives, n)
    grad_pieces = [grad_t, grad_n][: len(pieces)]

    def parameter(value):  # a tensor stays on the device, in the compute dtype: no sync
        return value.detach().to(score_dtype) if isinstance(value, torch.Tensor) else value

    scale, bias = parameter(logit_scale), parameter(logit_bias)
    want_scale = returned.logit_scale and isinstance(logit_scale, torch.Tensor)
    want_bias = returned.logit_bias and isinstance(logit_bias, torch.Tensor)
    scale_grad = torch.empty(n_rows, dtype=score_dtype, device=q.device) if want_scale else None
    bias_grad = torch.empty(n_rows, dtype=score_dtype, device=q.device) if want_bias else None
    chunk = chunk_rows(n_rows, n_candidates, kernels.bytes_per_score, score_dtype, q.device)
    scores_buffer = scratch("scores", chunk, n_candidates, score_dtype, q.device)
    grad_dtype = kernels.grad_dtype(score_dtype, q.dtype)
    separate = want and grad_dtype != score_dtype
    grad_scratch = scratch("grads", chunk, n_candidates, grad_dtype, q.device) if separate else None
    loss = torch.empty(n_rows, dtype=score_dtype, device=q.device)
    scale_rows = None if row_scale is None else row_scale.to(score_dtype).contiguous()
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        scores = scores_buffer[: stop - start]
        kernels.scores(q[start:stop], pieces, scores)
        grads = None if not want else scores if grad_scratch is None else grad_scratch[: stop - start]
        kernels.pair_rows(
            scores, positive_offset + start, scale, bias, None if scale_rows is None else scale_rows[start:stop],
            loss[start:stop], grads, None if scale_grad is None else scale_grad[start:stop],
            None if bias_grad is None else bias_grad[start:stop], ids,
        )  # fmt: skip
        if grads is not None:
            grad_q_chunk = None if grad_q is None else grad_q[start:stop]
            kernels.dense_grads(grads, q[start:stop], pieces, grad_q_chunk, grad_pieces, False, start > 0)

    def finish(grad: torch.Tensor | None, like: torch.Tensor | None, flag: bool) -> torch.Tensor | None:
        if not (flag and like is not None):
            return None
        # Negatives with no rows (K = 0) still get a gradient of their (empty) shape.
        return torch.zeros_like(like) if grad is None else grad.to(like.dtype)

    def parameter_grad(rows: torch.Tensor | None, value) -> torch.Tensor | None:
        return None if rows is None else rows.sum(dtype=torch.float64).to(value.dtype)  # B numbers, in float64

    return (
        loss,
        finish(grad_q, query, returned.query),
        finish(grad_t, target, returned.target),
        finish(grad_n, negatives, returned.negatives),
        finish(grad_t, None if local else gathered.targets, returned.gathered_targets),
        parameter_grad(scale_grad, logit_scale),
        parameter_grad(bias_grad, logit_bias),
    )

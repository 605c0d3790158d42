"""The fused symmetric loss on one process (mmfast/backends/contrastive_columns.py): the column half read
from the row pass's B × B block, against the float64 reference on every backend, with chunks small
enough that the column statistics and top-k selections merge across many of them; and the GEMM
work it saves."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import mmfast
from mmfast.backends import chunked
from mmfast.backends import contrastive_loss as contrastive_loss_backend
from mmfast.backends.contrastive_loss import contrastive_kernels
from tests.helpers import BACKENDS
from tests.test_contrastive_loss import check_against_reference, make_inputs, run
from tests.test_contrastive_loss_ids import make_ids, with_ids

SYMMETRIC_SETS = {
    "symmetric": {"symmetric": True},
    "llave": {"symmetric": True, "hardness": 9.0},
    "margin": {"symmetric": True, "false_negative_margin": 0.05},
    "negative_margin": {"symmetric": True, "false_negative_margin": -0.05, "hardness": 2.0},
    "topk": {"symmetric": True, "topk": 3},
    "everything": {"symmetric": True, "temperature": 0.05, "hardness": 4.0, "false_negative_margin": 0.05, "topk": 2},
}


@pytest.fixture
def small_chunks(monkeypatch):
    """A scratch budget of a few rows per chunk: every column's statistics merge across chunks."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 1024)


@pytest.mark.parametrize("ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", SYMMETRIC_SETS.values(), ids=SYMMETRIC_SETS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_across_chunks_float64(backend, options, reduction, ids, small_chunks):
    q, t, n = make_inputs(37, 12, 1, seed=41, peaky=True)
    weight = torch.linspace(0.5, 1.5, 37, dtype=torch.float64)
    kwargs = with_ids(options, *make_ids(37, 37, seed=42)) if ids else options
    check_against_reference(backend, q, t, n, torch.float64, weight=weight, reduction=reduction, **kwargs)


@pytest.mark.parametrize("options", ["llave", "everything", "negative_margin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_temperature_across_chunks(backend, options, small_chunks):
    q, t, n = make_inputs(37, 9, 0, seed=43, m=11)
    options = {k: v for k, v in SYMMETRIC_SETS[options].items() if k != "temperature"}
    ids = with_ids(options, *make_ids(37, 11, seed=44))
    for dtype, tau in ((torch.float64, 0.3), (torch.float32, 0.03)):
        check_against_reference(backend, q, t, n, dtype, learned_temperature=tau, **options)
        check_against_reference(backend, q, t, n, dtype, learned_temperature=tau, reduction="none", **ids)


@pytest.mark.parametrize("k", [0, 2], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("b", [1, 2, 37], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_float32(backend, b, k, small_chunks):
    q, t, n = make_inputs(b, 19, k, seed=45 + b + k)
    # (LLaVE's α = 9 at τ = 0.02 in float32 is left to test_dtypes: at B = 2 the unfused loss on main
    # was already 2.3× PyTorch's own error on this input, a float32 score rounding times 1/τ + α = 59.)
    for options in ("symmetric", "everything", "margin"):
        check_against_reference(backend, q, t, n, torch.float32, **SYMMETRIC_SETS[options])
    check_against_reference(backend, q, t, n, torch.float32, reduction="none", **SYMMETRIC_SETS["topk"])


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("options", ["llave", "everything"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, options, small_chunks):
    q, t, n = make_inputs(33, 40, 1, seed=46)
    kwargs = with_ids(SYMMETRIC_SETS[options], *make_ids(33, 33, seed=47))
    check_against_reference(backend, q, t, n, dtype, **kwargs)
    check_against_reference(backend, q, t, n, dtype, reduction="none", **SYMMETRIC_SETS[options])


@pytest.mark.parametrize("options", [{"false_negative_margin": -10.0}, {"ids": True}, {"ids": True, "topk": 2}],
                         ids=["margin", "ids", "ids_topk"])  # fmt: skip
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_negative_left_out_gives_zero(backend, options, small_chunks):
    """Every negative of every row and column is left out: loss 0 and no gradient, in every chunk."""
    q, t, n = make_inputs(9, 8, 1, seed=48)
    options = dict(options, symmetric=True)
    if options.pop("ids", False):
        options |= {"candidate_ids": torch.zeros(18, dtype=torch.long), "query_ids": torch.zeros(9, dtype=torch.long)}
    loss, grads = run(backend, q, t, n, torch.float64, reduction="none", **options)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_topk_ties_go_to_the_lower_query_across_chunks(backend, small_chunks):
    """Repeated queries tie exactly in every column (entries are multiples of 1/4: exact dot products);
    the column selection must keep the lower query index, also when the copies sit in other chunks."""
    g = torch.Generator().manual_seed(49)
    q = torch.randint(-2, 3, (13, 4), generator=g).double() / 4
    t = torch.randint(-2, 3, (13, 4), generator=g).double() / 4
    q[5::4] = q[1]  # the same query at rows 1, 5, 9
    q[12] = q[0]
    for dtype in (torch.float64, torch.float32):
        for options in ({"topk": 2}, {"topk": 1, "false_negative_margin": 0.0}):
            ours = run(backend, q, t, None, dtype, symmetric=True, temperature=0.5, **options)
            truth = run("reference", q, t, None, torch.float64, symmetric=True, temperature=0.5, **options)
            torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-6, atol=1e-7)
            for a, r in zip(ours[1], truth[1], strict=True):
                torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"false_negative_margin": 0.2}, {"topk": 2}], ids=["plain", "margin", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_across_chunks(backend, reduction, options, small_chunks):
    q, t, n = (x.requires_grad_() for x in make_inputs(5, 3, 1, seed=50))
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 1.5, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 2, 3])

    def loss(q, t, n, tau, weight):
        return mmfast.contrastive_loss(q, t, n, temperature=tau, weight=weight, reduction=reduction, backend=backend,
                                       symmetric=True, query_ids=ids, **options)  # fmt: skip

    assert gradcheck(loss, (q, t, n, tau, weight), eps=1e-6, atol=1e-7)


def gemm_work(backend, monkeypatch, b, d, k, *, reduction="mean", **options) -> int:
    """Multiply-adds of every GEMM the kernel set runs (scores and dense gradients) for one loss and
    backward, counted from the shapes handed to it, in units of B·B·D."""
    kernels = type(contrastive_kernels(backend))
    work = []
    scores, dense_grads = kernels.scores, kernels.dense_grads

    def counting_scores(self, x, pieces, out):
        work.append(x.shape[0] * out.shape[1] * x.shape[1])
        return scores(self, x, pieces, out)

    def counting_grads(self, grad_scores, x, pieces, grad_x, grad_pieces, *args):
        for piece, grad_piece in zip(pieces, grad_pieces, strict=True):
            work.append(((grad_x is not None) + (grad_piece is not None)) * x.shape[0] * piece.shape[0] * x.shape[1])
        return dense_grads(self, grad_scores, x, pieces, grad_x, grad_pieces, *args)

    monkeypatch.setattr(kernels, "scores", counting_scores)
    monkeypatch.setattr(kernels, "dense_grads", counting_grads)
    inputs = [x if x is None else x.float().requires_grad_() for x in make_inputs(b, d, k, seed=51)]
    loss = mmfast.contrastive_loss(*inputs, backend=backend, symmetric=True, reduction=reduction, **options)
    loss.sum().backward()
    return sum(work) / (b * b * d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows_per_chunk", [None, 5])
def test_symmetric_does_four_gemms_not_six(backend, rows_per_chunk, monkeypatch):
    """K = 0: the statistics pass's block, the row pass's scores and the two gradient GEMMs (4 B×B×D,
    where two directional passes took 6), less the row pass's GEMM on the last chunk's block, which
    the scratch still holds (B×B×D in all with one chunk; 24 rows in chunks of 4, 5, 5, 5, 5); K hard
    negatives per row: 4 + 3K less the same; top-k: one score GEMM; reduction "none": a loss-only
    forward (1 + K), then the fused backward."""
    b, d = 24, 8
    if rows_per_chunk is not None:
        monkeypatch.setattr(contrastive_loss_backend, "chunk_rows", lambda n_rows, *args: min(n_rows, rows_per_chunk))
    saved = min(b, rows_per_chunk or b) / b  # the last chunk, a full one (the partial chunk goes first)
    assert gemm_work(backend, monkeypatch, b, d, 0) == pytest.approx(4 - saved)
    assert gemm_work(backend, monkeypatch, b, d, 1, hardness=9.0) == pytest.approx(7 - saved)
    assert gemm_work(backend, monkeypatch, b, d, 2, false_negative_margin=0.1) == pytest.approx(10 - saved)
    assert gemm_work(backend, monkeypatch, b, d, 1, topk=3) == 2  # [B, 2B] scores, sparse gradients
    assert gemm_work(backend, monkeypatch, b, d, 1, reduction="none") == pytest.approx(2 + 7 - saved)


def test_torch_backend_calls_torch_mm_four_times_the_block(monkeypatch):
    """The same count at the bottom, for the GEMMs that really run on the torch backend (torch.mm and
    addmm_ on one chunk): the symmetric K = 0 loss multiplies 3·B·B·D, not 6 (the one chunk's block
    stays in the scratch from the statistics pass to the row pass)."""
    b, d = 20, 6
    work = []
    mm, addmm_ = torch.mm, torch.Tensor.addmm_

    def counting_mm(a, m, **kwargs):
        work.append(a.shape[0] * a.shape[1] * m.shape[1])
        return mm(a, m, **kwargs)

    def counting_addmm_(self, a, m, **kwargs):
        work.append(a.shape[0] * a.shape[1] * m.shape[1])
        return addmm_(self, a, m, **kwargs)

    q, t = (x.float().requires_grad_() for x in make_inputs(b, d, 0, seed=52)[:2])
    monkeypatch.setattr(torch, "mm", counting_mm)
    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm_)
    mmfast.contrastive_loss(q, t, backend="torch", symmetric=True, hardness=9.0).backward()
    monkeypatch.undo()
    assert sum(work) == 3 * b * b * d

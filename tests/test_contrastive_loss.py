"""mmfast.contrastive_loss against the float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.backends.contrastive_kernels import contrastive_kernels
from tests.helpers import CONTRASTIVE_BACKENDS, assert_within_torch_error, unit_rows

OPTION_SETS = {
    "plain": {},
    "temperature": {"temperature": 0.05},
    "hardness": {"hardness": 9.0},
    "margin": {"false_negative_margin": 0.1},
    "negative_margin": {"false_negative_margin": -0.05},
    "topk": {"topk": 2},
    "symmetric": {"symmetric": True},
    "llave": {"hardness": 9.0, "symmetric": True},
    "unime": {"false_negative_margin": 0.1, "topk": 8},
    "everything": {"temperature": 0.05, "hardness": 4.0, "false_negative_margin": 0.05, "topk": 3, "symmetric": True},
}


def make_inputs(b, d, k, seed, *, m=None, peaky=False):
    g = torch.Generator().manual_seed(seed)
    q, t = unit_rows(b, d, generator=g), unit_rows(b, d, generator=g)
    if m is not None:
        n = unit_rows(m, d, generator=g)
    elif k:
        n = unit_rows(b, k, d, generator=g)
    else:
        n = None
    if peaky and n is not None:
        # Near-copies of the targets among the negatives: false negatives and near-ties.
        flat = n.view(-1, d)
        rows = torch.arange(min(flat.shape[0], b))
        flat[rows] = torch.nn.functional.normalize(t[rows] + 1e-3 * torch.randn(len(rows), d, generator=g), dim=-1)
    return q, t, n


def temperature_dtype(dtype: torch.dtype) -> torch.dtype:
    """A learned τ's dtype in the tests: float64 for float64 inputs, float32 otherwise (its gradient
    comes from float32 arithmetic; the error criterion follows the gradient's dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(backend, q, t, n, dtype, *, weight=None, reduction="mean", seed=0, learned_temperature=None, **options):
    """Loss and gradients of (query, target, negatives[, temperature]) for `backend` in `dtype`; with
    `learned_temperature` τ is a 0-d tensor leaf of that value."""
    inputs = [x.detach().to(dtype).requires_grad_() for x in (q, t, n) if x is not None]
    negatives = inputs[2] if n is not None else None
    leaves = list(inputs)
    if learned_temperature is not None:
        options["temperature"] = torch.tensor(learned_temperature, dtype=temperature_dtype(dtype), requires_grad=True)
        leaves.append(options["temperature"])
    loss = mmfast.contrastive_loss(
        inputs[0], inputs[1], negatives, weight=weight, reduction=reduction, backend=backend, **options
    )
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) + 0.5
    grads = torch.autograd.grad(loss, leaves, grad_out)
    return loss.detach(), grads


def check_against_reference(backend, q, t, n, dtype, **kwargs):
    ours = run(backend, q, t, n, dtype, **kwargs)
    # The truth is float64 arithmetic on the very values the kernel sees (inputs rounded to dtype).
    q, t, n = (None if x is None else x.to(dtype).double() for x in (q, t, n))
    truth = run("reference", q, t, n, torch.float64, **kwargs)
    own = run("reference", q, t, n, dtype, **kwargs)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours[0].dtype == expected_dtype
    assert_within_torch_error("loss", ours[0], truth[0], own[0])
    names = ["query", "target", "negatives"][: 3 if n is not None else 2]
    names += ["temperature"] if kwargs.get("learned_temperature") is not None else []
    for name, a, r, o in zip(names, ours[1], truth[1], own[1], strict=True):
        assert a.dtype == (temperature_dtype(dtype) if name == "temperature" else dtype) and a.shape == r.shape
        assert_within_torch_error(f"grad {name}", a, r, o)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_every_option_float64(backend, options, reduction, weighted):
    q, t, n = make_inputs(7, 100, 3, seed=1)
    weight = torch.rand(7, dtype=torch.float64) + 0.5 if weighted else None
    check_against_reference(backend, q, t, n, torch.float64, weight=weight, reduction=reduction, **options)


@pytest.mark.parametrize("k", [0, 1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("d", [3, 100, 257], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("b", [1, 7, 129], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_odd_sizes_float32(backend, b, d, k):
    q, t, n = make_inputs(b, d, k, seed=b * 1000 + d * 10 + k)
    check_against_reference(backend, q, t, n, torch.float32, **OPTION_SETS["everything"])
    check_against_reference(backend, q, t, n, torch.float32, reduction="none", **OPTION_SETS["plain"])


@pytest.mark.parametrize("options", ["plain", "llave", "unime"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_dtypes(backend, dtype, options):
    q, t, n = make_inputs(33, 64, 1, seed=7)
    check_against_reference(backend, q, t, n, dtype, **OPTION_SETS[options])
    check_against_reference(backend, q, t, n, dtype, reduction="none", **OPTION_SETS[options])


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_negatives_not_per_query(backend):
    """[M, D] negatives with M ≠ B·K, shared by every query."""
    q, t, n = make_inputs(7, 33, 0, seed=3, m=5)
    check_against_reference(backend, q, t, n, torch.float64, **OPTION_SETS["everything"])
    check_against_reference(backend, q, t, n, torch.float32, **OPTION_SETS["unime"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("options", ["margin", "unime", "everything", "llave"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_peaky_inputs(backend, options, dtype):
    q, t, n = make_inputs(17, 48, 3, seed=11, peaky=True)
    check_against_reference(backend, q, t, n, dtype, **OPTION_SETS[options])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_topk_ties_go_to_the_lower_index(backend, symmetric):
    """Exact duplicates among the negatives tie exactly; the kept one must be the lower index.

    Entries are multiples of 1/4 in a few dimensions, so every dot product is exact in any dtype and
    summation order, and the ties are real ties on every backend."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2, 3, (6, 4), generator=g).double() / 4
    t = torch.randint(-2, 3, (6, 4), generator=g).double() / 4
    n = torch.randint(-2, 3, (6, 2, 4), generator=g).double() / 4
    n[:, 1] = n[0, 0]  # the same vector many times over
    for dtype in (torch.float64, torch.float32):
        ours = run(backend, q, t, n, dtype, topk=2, symmetric=symmetric, temperature=0.5)
        truth = run("reference", q, t, n, torch.float64, topk=2, symmetric=symmetric, temperature=0.5)
        for a, r in zip(ours[1], truth[1], strict=True):
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "which", [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_gradient_of_any_subset_of_inputs(backend, reduction, which):
    q, t, n = make_inputs(9, 20, 2, seed=2)
    inputs = [x.clone().requires_grad_(flag) for x, flag in zip((q, t, n), which, strict=True)]
    reference = [x.clone().requires_grad_(flag) for x, flag in zip((q, t, n), which, strict=True)]
    opts = dict(reduction=reduction, symmetric=True, hardness=2.0)
    ours = mmfast.contrastive_loss(*inputs, backend=backend, **opts).sum()
    ref = mmfast.contrastive_loss(*reference, backend="reference", **opts).sum()
    ours.backward()
    ref.backward()
    for a, r in zip(inputs, reference, strict=True):
        assert (a.grad is None) == (r.grad is None)
        if r.grad is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_no_grad_does_no_gradient_work(backend, topk, monkeypatch):
    q, t, n = (x.requires_grad_() for x in make_inputs(9, 20, 2, seed=4))
    expected = mmfast.contrastive_loss(q, t, n, topk=topk, backend="reference")
    kernels = contrastive_kernels(backend)

    def forbidden(*args, **kwargs):
        raise AssertionError("gradient kernels ran under torch.no_grad")

    monkeypatch.setattr(type(kernels), "dense_grads", forbidden)
    monkeypatch.setattr(type(kernels), "sparse_grads", forbidden)
    with torch.no_grad():
        loss = mmfast.contrastive_loss(q, t, n, topk=topk, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_many_chunks(backend, options, monkeypatch):
    """A tiny scratch budget forces chunks of a few rows: positives must follow the row offset."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 4096)
    q, t, n = make_inputs(129, 16, 1, seed=9)
    check_against_reference(backend, q, t, n, torch.float64, **OPTION_SETS[options])


def test_module_matches_functional():
    q, t, n = make_inputs(7, 10, 1, seed=12)
    module = mmfast.ContrastiveLoss(temperature=0.05, hardness=3.0, symmetric=True, backend="cpu")
    weight = torch.rand(7, dtype=torch.float64)
    expected = mmfast.contrastive_loss(q, t, n, temperature=0.05, hardness=3.0, symmetric=True, weight=weight)
    torch.testing.assert_close(module(q, t, n, weight=weight), expected)
    assert "hardness=3.0" in repr(module)


@pytest.mark.parametrize("embeddings_need_grad", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_weight_gradient(backend, reduction, embeddings_need_grad):
    """A weight that requires grad gets d loss / d weight (each row's unweighted loss, over B for
    "mean"), whether or not the embeddings need a gradient too."""
    q, t, n = make_inputs(5, 8, 1, seed=13)
    results = []
    for be in (backend, "reference"):
        inputs = [x.clone().requires_grad_(embeddings_need_grad) for x in (q, t, n)]
        weight = torch.linspace(0.5, 1.5, 5, dtype=torch.float64).requires_grad_()
        loss = mmfast.contrastive_loss(*inputs, weight=weight, reduction=reduction, backend=be, hardness=2.0)
        loss.backward(torch.linspace(1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape))
        results.append((weight.grad, inputs[0].grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    if embeddings_need_grad:
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)

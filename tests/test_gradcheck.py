"""torch.autograd.gradcheck on every op with autograd (contrastive_loss, distillation_loss, the
pooling ops), a second backward through the fused mean/sum losses, and double backward's clear
error. similarity_topk has no autograd: it detaches its inputs (retrieval evaluation)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import mmfast
from tests.helpers import BACKENDS, unit_rows
from tests.test_contrastive_loss import make_inputs

# No hardness: its α·stopgrad(s) term is, by definition, not differentiated, which finite differences
# cannot know (test_temperature.py checks it against the reference, and τ by finite differences).
CONTRASTIVE_OPTIONS = {
    "plain": {},
    "margin": {"false_negative_margin": 0.1},
    "topk": {"topk": 2},
    "everything": {"false_negative_margin": 0.2, "topk": 3, "symmetric": True},
}


def contrastive_inputs(seed):
    q, t, n = make_inputs(5, 3, 2, seed=seed)  # tiny odd sizes, float64
    tau = torch.tensor(0.3, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, t, n, tau, weight)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", CONTRASTIVE_OPTIONS.values(), ids=CONTRASTIVE_OPTIONS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_loss_gradcheck(backend, options, reduction):
    def loss(q, t, n, tau, weight):
        return mmfast.contrastive_loss(q, t, n, temperature=tau, weight=weight, reduction=reduction, backend=backend,
                                       **options)  # fmt: skip

    assert gradcheck(loss, contrastive_inputs(seed=31), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_gradcheck(backend, reduction):
    g = torch.Generator().manual_seed(32)
    sq, st = unit_rows(5, 3, generator=g).requires_grad_(), unit_rows(5, 3, generator=g).requires_grad_()
    tq, tt = unit_rows(5, 4, generator=g), unit_rows(5, 4, generator=g)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def loss(sq, st, tau):
        return mmfast.distillation_loss(sq, st, tq, tt, student_temperature=tau, teacher_temperature=0.2,
                                        reduction=reduction, backend=backend)  # fmt: skip

    assert gradcheck(loss, (sq, st, tau), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pool", [mmfast.last_token_pool, mmfast.mean_pool], ids=["last", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_gradcheck(backend, pool, normalize):
    hidden = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(33)).requires_grad_()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    assert gradcheck(lambda h: pool(h, mask, normalize=normalize, backend=backend), (hidden,))


def test_similarity_topk_has_no_autograd():
    q = torch.randn(4, 3, requires_grad=True)
    result = mmfast.similarity_topk(q, torch.randn(6, 3), k=2)
    assert not result.values.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_backward_recomputes_the_same_gradients(backend, reduction):
    leaves = contrastive_inputs(seed=34)
    loss = mmfast.contrastive_loss(*leaves[:3], temperature=leaves[3], weight=leaves[4], reduction=reduction,
                                   backend=backend, **CONTRASTIVE_OPTIONS["everything"])  # fmt: skip
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, torch.tensor(2.0, dtype=loss.dtype), retain_graph=True)
    third = torch.autograd.grad(loss, leaves)
    for a, b, c in zip(first, second, third, strict=True):
        torch.testing.assert_close(b, 2 * a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(35)
    sq, st = (unit_rows(5, 3, generator=g).requires_grad_() for _ in range(2))
    tq, tt = unit_rows(5, 4, generator=g), unit_rows(5, 4, generator=g)
    distill = mmfast.distillation_loss(sq, st, tq, tt, reduction=reduction, backend=backend)
    first = torch.autograd.grad(distill, (sq, st), retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(distill, (sq, st)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_backward_twice_with_retain_graph_accumulates_like_autograd():
    q, t, n = (x.requires_grad_() for x in make_inputs(5, 4, 1, seed=36))
    ours = mmfast.contrastive_loss(q, t, n, backend="cpu")
    ours.backward(retain_graph=True)
    ours.backward()
    reference = [x.detach().clone().requires_grad_() for x in (q, t, n)]
    expected = mmfast.contrastive_loss(*reference, backend="reference")
    expected.backward(retain_graph=True)
    expected.backward()
    for a, r in zip((q, t, n), reference, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_a_clear_mmfast_error(backend):
    leaves = contrastive_inputs(seed=37)
    loss = mmfast.contrastive_loss(*leaves[:3], temperature=leaves[3], backend=backend)
    grads = torch.autograd.grad(loss, leaves[:4], create_graph=True)
    expected = torch.autograd.grad(mmfast.contrastive_loss(*leaves[:3], temperature=leaves[3], backend=backend),
                                   leaves[:4])  # fmt: skip
    for a, b in zip(grads, expected, strict=True):  # the first-order gradients are right
        torch.testing.assert_close(a.detach(), b)
    with pytest.raises(RuntimeError, match=r"mmfast.contrastive_loss: double backward .* backend='reference'"):
        sum(g.sum() for g in grads).backward()
    sq, st = leaves[0], leaves[1]
    for op, output in [
        ("distillation_loss", mmfast.distillation_loss(sq, st, sq.detach(), st.detach(), backend=backend)),
        (
            "last_token_pool / mean_pool",
            mmfast.mean_pool(leaves[2], torch.ones(5, 2, dtype=torch.long), backend=backend).sum(),
        ),  # fmt: skip
    ]:
        (grad,) = torch.autograd.grad(output, sq if op == "distillation_loss" else leaves[2], create_graph=True)
        with pytest.raises(RuntimeError, match=f"mmfast.{op}: double backward"):
            grad.sum().backward()


def test_the_reference_backend_differentiates_twice():
    q, t, n, tau, _ = contrastive_inputs(seed=38)

    def loss(q, t, tau):
        return mmfast.contrastive_loss(q, t, n, temperature=tau, false_negative_margin=0.1, backend="reference")

    assert gradgradcheck(loss, (q, t, tau))

"""The chunk loops' kept CPU scratch (mmfast/backends/chunked.scratch): one buffer per thread, role and
dtype, grown to the largest request; and the ops give the same results when it holds stale garbage
from an earlier call (NaN here) as when it is fresh."""

from __future__ import annotations

import threading

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from tests.helpers import unit_rows


def test_scratch_is_kept_per_role_and_dtype_and_grows():
    chunked.release_scratch()
    first = chunked.scratch("scores", 3, 5, torch.float32, "cpu")
    again = chunked.scratch("scores", 2, 7, torch.float32, "cpu")
    assert first.shape == (3, 5) and again.shape == (2, 7) and again.is_contiguous()
    assert again.data_ptr() == first.data_ptr()  # 14 ≤ 15 elements: the same storage
    grads = chunked.scratch("grads", 3, 5, torch.float32, "cpu")
    wide = chunked.scratch("scores", 3, 5, torch.float64, "cpu")
    assert len({first.data_ptr(), grads.data_ptr(), wide.data_ptr()}) == 3
    grown = chunked.scratch("scores", 4, 5, torch.float32, "cpu")
    assert (
        grown.shape == (4, 5) and chunked.scratch("scores", 3, 5, torch.float32, "cpu").data_ptr() == grown.data_ptr()
    )
    mmfast.release_scratch()  # the public face of chunked.release_scratch
    assert chunked._SCRATCH.buffers == {}


def test_scratch_is_per_thread():
    chunked.release_scratch()
    here = chunked.scratch("scores", 4, 4, torch.float32, "cpu").data_ptr()
    there = []
    worker = threading.Thread(target=lambda: there.append(chunked.scratch("scores", 4, 4, torch.float32, "cpu")))
    worker.start()
    worker.join()
    assert there[0].data_ptr() != here


def poison_kept_scratch():
    for buffer in chunked._SCRATCH.buffers.values():
        buffer.fill_(float("nan"))


def contrastive_step(backend, seed, **options):
    g = torch.Generator().manual_seed(seed)
    q, t, n = (unit_rows(rows, 6, generator=g).requires_grad_() for rows in (19, 19, 23))
    loss = mmfast.contrastive_loss(q, t, n, backend=backend, **options)
    return [loss.detach(), *torch.autograd.grad(loss, (q, t, n))]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(
    "options",
    [{}, {"symmetric": True, "hardness": 9.0}, {"symmetric": True, "false_negative_margin": 0.05, "topk": 3}],
    ids=["plain", "llave", "unime"],
)
def test_contrastive_loss_ignores_stale_scratch(backend, options, monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 512)  # a few rows per chunk
    chunked.release_scratch()
    fresh = contrastive_step(backend, 1, **options)
    contrastive_step(backend, 2, **options)  # leaves its scratch behind
    poison_kept_scratch()
    assert chunked._SCRATCH.buffers, "the loop kept no scratch"
    again = contrastive_step(backend, 1, **options)
    for got, want in zip(again, fresh, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_distillation_loss_ignores_stale_scratch(backend, monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 512)

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        sq, st = (unit_rows(17, 5, generator=g).requires_grad_() for _ in range(2))
        tq, tt = (unit_rows(17, 9, generator=g) for _ in range(2))
        loss = mmfast.distillation_loss(sq, st, tq, tt, backend=backend)
        return [loss.detach(), *torch.autograd.grad(loss, (sq, st))]

    chunked.release_scratch()
    fresh = step(3)
    step(4)
    poison_kept_scratch()
    for got, want in zip(step(3), fresh, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("inference_first", [True, False])
def test_scratch_kept_across_inference_mode(inference_first):
    """A loss evaluated under torch.inference_mode (an evaluation loop) and one trained outside it
    share the kept scratch, in either order."""
    chunked.release_scratch()
    g = torch.Generator().manual_seed(5)
    q, t = unit_rows(21, 6, generator=g), unit_rows(21, 6, generator=g)

    def evaluate():
        with torch.inference_mode():
            return mmfast.contrastive_loss(q, t, backend="cpu", symmetric=True)

    def train():
        leaf = q.clone().requires_grad_()
        loss = mmfast.contrastive_loss(leaf, t, backend="cpu", symmetric=True)
        loss.backward()
        return loss.detach(), leaf.grad

    first, second = (evaluate, train) if inference_first else (train, evaluate)
    first()
    second()
    evaluated, (trained, grad) = evaluate(), train()
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=0)
    assert torch.isfinite(grad).all()

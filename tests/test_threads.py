"""The C++ kernels give the same answer at every thread count.

Their work is split by `at::parallel_for` and, in places, by the thread count itself (similarity_topk's
and the late-interaction loss's query blocks per worker, the Matryoshka row kernel's per-thread scratch).
`make test` runs the suite on pytest-xdist workers with one thread each on a 2-core machine, so this file
runs every C++ op at 1, 2 and 3 threads (3 splits unevenly) on sizes that split, and checks the
results, gradients included, against the one-thread run. Inputs are float64: a split that reorders a sum
moves the result by a few units of 1e-16, far below the tolerance, while a row computed twice, skipped
or written by the wrong thread is a gross error (outputs start NaN-filled: tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from tests.helpers import unit_rows

THREADS = (2, 3)
B, K, D = 301, 2, 40


def _inputs(*shapes, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [unit_rows(*s, generator=g).requires_grad_() for s in shapes]


def _run(case, threads: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leaves, outputs = case()
        differentiable = [o for o in outputs if o.is_floating_point() and o.requires_grad]
        grads = torch.autograd.grad(sum(o.sum() for o in differentiable), leaves) if differentiable else ()
        return [o.detach() for o in outputs], list(grads)
    finally:
        torch.set_num_threads(saved)


def contrastive(**options):
    def case():
        q, t, n = _inputs((B, D), (B, D), (B * K, D), seed=1)
        weight = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        return [q, t, n], [mmfast.contrastive_loss(q, t, n, weight=weight, reduction="none", backend="cpu", **options)]

    return case


def sigmoid():
    q, t, n = _inputs((B, D), (B, D), (B * K, D), seed=3)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    out = mmfast.sigmoid_loss(q, t, n, logit_scale=scale, logit_bias=bias, reduction="none", backend="cpu")
    return [q, t, n, scale, bias], [out]


def distillation():
    sq, st, tq, tt = _inputs((B, D), (B, D), (B, 24), (B, 24), seed=4)
    out = mmfast.distillation_loss(sq, st, tq.detach(), tt.detach(), reduction="none", backend="cpu")
    return [sq, st], [out]


def _token_masks(n: int, length: int, seed: int) -> torch.Tensor:
    lengths = torch.randint(1, length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.arange(length) < lengths[:, None]


def late_interaction(loss: str):
    def case():
        n_queries, q_len, d_len, dim = 37, 7, 19, 16
        q, d, n = _inputs((n_queries, q_len, dim), (n_queries, d_len, dim), (2 * n_queries, d_len, dim), seed=5)
        out = mmfast.late_interaction_loss(
            q, d, n, query_mask=_token_masks(n_queries, q_len, 6), document_mask=_token_masks(n_queries, d_len, 7),
            negative_mask=_token_masks(2 * n_queries, d_len, 8), loss=loss, reduction="none", backend="cpu",
        )  # fmt: skip
        return [q, d, n], [out]

    return case


def similarity_search():
    (q, g) = (x.detach() for x in _inputs((203, D), (4099, D), seed=9))
    target = torch.arange(203) * 7
    found = mmfast.similarity_topk(q, g, 10, target=target, backend="cpu")
    return [], [found.values, found.indices, found.target_rank]


def screened_similarity_search():
    """The bf16-screened float32 search (no target): its query blocks split by thread count as above."""
    (q, g) = (x.detach().float() for x in _inputs((1203, 72), (1299, 72), seed=15))
    found = mmfast.similarity_topk(q, g, 10, backend="cpu", screen="bf16")
    return [], [found.values, found.indices]


def late_interaction_search():
    (q, c) = (x.detach() for x in _inputs((29, 5, 16), (211, 13, 16), seed=10))
    masks = {"query_mask": _token_masks(29, 5, 11), "corpus_mask": _token_masks(211, 13, 12)}
    found = mmfast.late_interaction_topk(q, c, 7, target=torch.arange(29), backend="cpu", **masks)
    return [], [found.values, found.indices, found.target_rank]


def pooling(mode):
    def case():
        (hidden,) = _inputs((67, 33, 48), seed=13)
        mask = _token_masks(67, 33, 14)
        pool = mmfast.last_token_pool if mode == "last" else mmfast.mean_pool
        return [hidden], [pool(hidden, mask, backend="cpu")]

    return case


CASES = {
    "contrastive": contrastive(),
    "contrastive-symmetric-hardness": contrastive(symmetric=True, hardness=9.0),
    "contrastive-margin-topk": contrastive(false_negative_margin=0.1, topk=8),
    "contrastive-matryoshka": contrastive(matryoshka_dims=(8, 24, 40), matryoshka_weights=(1.0, 0.5, 2.0)),
    "sigmoid": sigmoid,
    "distillation": distillation,
    "late-interaction-infonce": late_interaction("infonce"),
    "late-interaction-pairwise": late_interaction("pairwise"),
    "similarity-topk": similarity_search,
    "similarity-topk-screened": screened_similarity_search,
    "late-interaction-topk": late_interaction_search,
    "last-token-pool": pooling("last"),
    "mean-pool": pooling("mean"),
}


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("name", CASES)
def test_every_thread_count_gives_the_one_thread_answer(name, threads):
    outputs, grads = _run(CASES[name], 1)
    for value in (*outputs, *grads):
        assert not value.is_floating_point() or torch.isfinite(value).all()
    threaded_outputs, threaded_grads = _run(CASES[name], threads)
    for actual, expected in zip((*threaded_outputs, *threaded_grads), (*outputs, *grads), strict=True):
        if actual.is_floating_point():
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)
        else:
            assert torch.equal(actual, expected)

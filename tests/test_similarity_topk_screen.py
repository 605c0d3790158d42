"""The cpu backend's bf16-screened search (`screen="bf16"`, and "auto" where the CPU multiplies bf16).

Its GEMMs run on bf16 copies; an item is scored in float32 only when its bf16 score, within a proven
bound, could enter a row's top-k. So the results must be what the float32 search would give: checked
against the float64 reference exactly (integer rows, exact in bf16, full of ties) and within float32
rounding (random rows), and on inputs built so that bf16 cannot tell the items apart at all: there the
bound alone decides which items are rescored, and a missing or too-small bound returns the first k items.
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import similarity_topk as backend_module
from mmfast.backends.similarity_topk import CpuSimilarityTopk, bf16_dot_products, screens
from tests.helpers import unit_rows
from tests.test_similarity_topk import check_exact, check_within_rounding, integer_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def screened(query, gallery, k, dtype=torch.float32):
    return mmfast.similarity_topk(query.to(dtype), gallery.to(dtype), k, backend="cpu", screen="bf16")


def bf16_blind_rows(n_queries: int, n_gallery: int, dim: int, generator: torch.Generator):
    """Queries of ±1 with as many of each sign (exact in bf16, a bf16 score of exactly 0 against any
    constant row), and items 1 + δ with |δ| < 2^-9, which bf16 rounds to all ones: every bf16 score is 0,
    while the float32 scores Σ q δ spread with a deviation of ~0.0055."""
    signs = torch.ones(n_queries, dim, dtype=torch.float64)
    signs[:, dim // 2 :] = -1
    query = signs.gather(1, torch.rand(n_queries, dim, generator=generator).argsort(dim=1))
    gallery = 1 + (torch.rand(n_gallery, dim, generator=generator, dtype=torch.float64) - 0.5) * 2.0**-9
    return query, gallery


@pytest.mark.parametrize("k", [1, 7, 100])
def test_items_bf16_cannot_tell_apart_are_ranked_by_their_float32_scores(k):
    gen = torch.Generator().manual_seed(21)
    query, gallery = bf16_blind_rows(37, 1_301, 96, gen)
    assert (gallery.bfloat16() == 1).all() and ((query.bfloat16().double() @ gallery.bfloat16().double().T) == 0).all()
    # The float32 scores cancel (Σ|q g| ≈ 96 for scores ≈ 0.01), so near ties may swap within rounding;
    # the first k items, which a screen without its bound returns, lie far below the true top-k.
    check_within_rounding(screened(query, gallery, k), query, gallery, k, None, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_at_odd_sizes_equal_the_reference_bit_for_bit(dtype, monkeypatch):
    """Integer rows (exact in bf16 and float32, scores tie a lot): values, indices in tie order. Sizes
    cross the kernel's 512-row and 512-item blocks, none full; then chunks of one block each."""
    gen = torch.Generator().manual_seed(22)
    query, gallery = integer_rows(259, 67, gen), integer_rows(1_299, 67, gen)
    for k in (1, 100, 513):
        check_exact("cpu", query, gallery, k, None, dtype)
        assert torch.equal(screened(query, gallery, k, dtype).indices, mmfast.similarity_topk(
            query.to(dtype), gallery.to(dtype), k, backend="cpu", screen="off").indices)  # fmt: skip
    monkeypatch.setattr(CpuSimilarityTopk, "chunk_bytes", 1)
    monkeypatch.setattr(backend_module, "SCREEN_MIN_DIM", 1)  # "auto" screens this D = 67 here anyway
    for k in (3, 600):
        result = mmfast.similarity_topk(query.to(dtype), gallery.to(dtype), k, backend="cpu", screen="bf16")
        reference = mmfast.similarity_topk(query, gallery, k, backend="reference")
        assert torch.equal(result.values.double(), reference.values) and torch.equal(result.indices, reference.indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_random_rows_within_float32_rounding(dtype):
    gen = torch.Generator().manual_seed(23)
    for n_queries, n_gallery, dim in ((33, 1_150, 100), (600, 700, 5), (7, 3, 130)):
        query, gallery = unit_rows(n_queries, dim, generator=gen), unit_rows(n_gallery, dim, generator=gen)
        for k in (1, 5, 40):
            check_within_rounding(screened(query, gallery, k, dtype), query, gallery, k, None, dtype)


def test_chunks_with_scores_near_float32_range_take_the_float32_kernel(monkeypatch):
    """Rows scaled by 2^52 (||q|| ||g|| > 2^100, where the bound's margins are not proven): those chunks go
    to the float32 kernel; a search mixing such chunks with ordinary ones is still exact."""
    monkeypatch.setattr(CpuSimilarityTopk, "chunk_bytes", 1)
    gen = torch.Generator().manual_seed(24)
    query, gallery = integer_rows(19, 70, gen), integer_rows(1_100, 70, gen)
    gallery[512:1024] *= 2.0**100  # the second chunk only
    calls = []
    original = CpuSimilarityTopk.screen_rows
    monkeypatch.setattr(CpuSimilarityTopk, "screen_rows", lambda self, rows: calls.append(len(rows)) or original(
        self, rows))  # fmt: skip
    check_exact("cpu", query * 2.0**-60, gallery, 30, None, torch.float32)
    assert calls == [19, 512, 512, 76]
    query, gallery = unit_rows(9, 80, generator=gen) * 2.0**52, unit_rows(1_030, 80, generator=gen) * 2.0**52
    result = screened(query, gallery, 12)
    plain = mmfast.similarity_topk(query.float(), gallery.float(), 12, backend="cpu", screen="off")
    assert torch.equal(result.values, plain.values) and torch.equal(result.indices, plain.indices)


def test_auto_screens_float32_cpu_searches_without_target_on_bf16_hardware():
    hardware = bf16_dot_products()
    assert screens("auto", "cpu", torch.float32, 64, None) is hardware
    assert screens("auto", "cpu", torch.bfloat16, 768, None) is hardware
    for backend, dtype, dim, targets in (
        ("cpu", torch.float64, 768, None),
        ("torch", torch.float32, 768, None),
        ("cpu", torch.float32, 63, None),
        ("cpu", torch.float32, 768, torch.zeros(1)),
    ):
        assert not screens("auto", backend, dtype, dim, targets)  # fmt: skip
    assert screens("bf16", "cpu", torch.float32, 3, None) and not screens("off", "cpu", torch.float32, 768, None)
    calls = []
    original = CpuSimilarityTopk.search_screened
    try:
        CpuSimilarityTopk.search_screened = lambda self, *a: calls.append(1) or original(self, *a)
        mmfast.similarity_topk(torch.randn(5, 64), torch.randn(40, 64), 3, backend="cpu")
        mmfast.similarity_topk(torch.randn(5, 64), torch.randn(40, 64), 3, backend="cpu", target=torch.zeros(5).long())
    finally:
        CpuSimilarityTopk.search_screened = original
    assert calls == ([1] if hardware else [])


@pytest.mark.parametrize("case", [
    (dict(screen="fast"), ValueError, "screen must be one of 'auto', 'bf16', 'off', got 'fast'"),
    (dict(screen="bf16", backend="torch"), ValueError, "screen='bf16' is a cpu-backend search; .*'torch'"),
    (dict(screen="bf16", target=torch.zeros(4).long()), ValueError, "screen='bf16' does not count target ranks"),
    (dict(screen="bf16", dtype=torch.float64), ValueError, "screen='bf16' screens float32 scores; torch.float64"),
], ids=["name", "backend", "target", "float64"])  # fmt: skip
def test_bad_screen_is_named(case):
    overrides, error, message = case
    dtype = overrides.pop("dtype", torch.float32)
    args = dict(backend="cpu") | overrides
    with pytest.raises(error, match=message):
        mmfast.similarity_topk(torch.randn(4, 8, dtype=dtype), torch.randn(6, 8, dtype=dtype), 2, **args)

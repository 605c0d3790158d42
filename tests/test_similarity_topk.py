"""mmfast.similarity_topk against the float64 reference, on every backend.

Two regimes:
- exact: small-integer embeddings, whose scores every dtype and summation order computes exactly and
  which tie a lot: values, indices (tie order) and ranks must equal the reference's bit for bit;
- rounding: random unit rows, checked against the float64 reference on the same (rounded) inputs up
  to a rigorous bound on the float32 accumulation error of each score (`score_error_bound`). Only
  items whose scores lie within that bound of each other may swap, so a wrong pick still fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.backends.similarity_topk import CpuSimilarityTopk
from mmfast.reference.similarity_topk import similarity_topk_reference
from tests.helpers import BACKENDS, unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
TRITON_MAX_K = 128


def integer_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-2, 3, (n, d), generator=generator).double()


def target_forms(n_queries: int, n_gallery: int, generator: torch.Generator):
    """None, a [Q] index and a [Q, 3] set padded with -1 (with a repeated index in it)."""
    single = torch.randint(0, n_gallery, (n_queries,), generator=generator)
    sets = torch.randint(0, n_gallery, (n_queries, 3), generator=generator)
    sets[::2, 1] = -1
    sets[1::3, 2] = sets[1::3, 0]
    return [None, single, sets]


def run(backend, query, gallery, k, target, dtype):
    return mmfast.similarity_topk(query.to(dtype), gallery.to(dtype), k, target=target, backend=backend)


def check_result_types(result, n_queries, k, dtype, target):
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(result, mmfast.SimilarityTopK)
    assert result.values.shape == (n_queries, k) and result.values.dtype == score_dtype
    assert result.indices.shape == (n_queries, k) and result.indices.dtype == torch.int64
    assert not torch.isnan(result.values).any()
    if target is None:
        assert result.target_rank is None
    else:
        assert result.target_rank.shape == (n_queries,) and result.target_rank.dtype == torch.int64


def check_exact(backend, query, gallery, k, target, dtype):
    ours = run(backend, query, gallery, k, target, dtype)
    values, indices, rank = similarity_topk_reference(query.to(dtype), gallery.to(dtype), k, target)
    check_result_types(ours, query.shape[0], min(k, gallery.shape[0]), dtype, target)
    torch.testing.assert_close(ours.values.double(), values, rtol=0, atol=0)
    assert torch.equal(ours.indices, indices), (ours.indices, indices)
    if target is not None:
        assert torch.equal(ours.target_rank, rank), (ours.target_rank, rank)


def triton_takes(k: int, n_gallery: int) -> bool:
    return min(k, n_gallery) <= TRITON_MAX_K


@pytest.mark.parametrize("d", [3, 100], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("g", [1, 5, 300], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("q", [1, 7, 129], ids=lambda q: f"Q{q}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_odd_sizes(backend, q, g, d):
    gen = torch.Generator().manual_seed(q * 1000 + g * 10 + d)
    query, gallery = integer_rows(q, d, gen), integer_rows(g, d, gen)
    for k, target in zip((1, 5, g + 3), target_forms(q, g, gen), strict=True):
        if backend == "triton" and not triton_takes(k, g):  # k = 17...128 is covered by the tests below
            with pytest.raises(ValueError, match="keeps at most 128"):
                run(backend, query, gallery, k, target, torch.float32)
            continue
        check_exact(backend, query, gallery, k, target, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_every_dtype(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    query, gallery = integer_rows(33, 20, gen), integer_rows(70, 20, gen)
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(ValueError, match="backend='triton' is unavailable.*float64"):
            run(backend, query, gallery, 5, None, dtype)
        return
    for k, target in zip((1, 5, 40), target_forms(33, 70, gen), strict=True):
        check_exact(backend, query, gallery, k, target, dtype)


def score_error_bound(query: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[Q, G] bound on |computed - exact| for a dot product accumulated in float32 (float64) in any
    order: γ_{D+1}·Σ_d |q_d g_d| (Higham, Accuracy and Stability, §3.1), doubled to cover the float64
    reference's own error. Products of 16-bit inputs are exact in float32; the +1 covers fp32's."""
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    terms = query.shape[1] + 1
    gamma = terms * unit / (1 - terms * unit)
    return 2 * gamma * (query.double().abs() @ gallery.double().abs().T)


def check_within_rounding(result, query, gallery, k, target, dtype):
    """`result` must be the exact top-k (ties to the lower index) of some score matrix within
    `score_error_bound` of the float64 one, and the rank that matrix gives."""
    query, gallery = query.to(dtype), gallery.to(dtype)
    exact = query.double() @ gallery.double().T
    bound = score_error_bound(query, gallery, dtype)
    n_queries, n_gallery = exact.shape
    check_result_types(result, n_queries, min(k, n_gallery), dtype, target)
    values, indices = result.values.double(), result.indices
    assert ((indices >= 0) & (indices < n_gallery)).all()
    assert all(len(set(row)) == len(row) for row in indices.tolist()), "an index repeats in a row"
    claimed = exact.gather(1, indices)
    assert ((values - claimed).abs() <= bound.gather(1, indices)).all(), "a value is not its item's score"
    assert (values[:, 1:] <= values[:, :-1]).all(), "not best first"
    tied = values[:, 1:] == values[:, :-1]
    assert (indices[:, 1:] > indices[:, :-1])[tied].all(), "a tie is not in gallery-index order"
    left_out = torch.ones_like(exact, dtype=torch.bool).scatter_(1, indices, False)
    surely_above = (exact - bound) > values[:, -1:]
    assert not (left_out & surely_above).any(), "an item left out surely beats the k-th"
    if target is None:
        return
    sets = target[:, None] if target.dim() == 1 else target
    member = torch.zeros_like(exact, dtype=torch.bool)
    member.scatter_(1, sets.clamp_min(0), sets >= 0)
    best = exact.masked_fill(~member, -torch.inf).amax(dim=1, keepdim=True)
    slack = bound.masked_fill(~member, 0).amax(dim=1, keepdim=True)
    lowest = ((exact - bound > best + slack) & ~member).sum(dim=1)
    highest = ((exact + bound > best - slack) & ~member).sum(dim=1)
    rank = result.target_rank - 1
    assert ((lowest <= rank) & (rank <= highest)).all(), (rank, lowest, highest)


# float64 on triton is refused (test_exact_ties_every_dtype checks that), so that pair is not a case here.
@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b in BACKENDS for d in DTYPES if not (b == "triton" and d == torch.float64)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_random_rows_within_rounding(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    for q, g, d in ((33, 150, 100), (7, 5, 3)):
        query, gallery = unit_rows(q, d, generator=gen), unit_rows(g, d, generator=gen)
        for k, target in zip((1, 5, 20), target_forms(q, g, gen), strict=True):
            result = run(backend, query, gallery, k, target, dtype)
            check_within_rounding(result, query, gallery, k, target, dtype)


def test_the_rounding_check_can_fail():
    gen = torch.Generator().manual_seed(6)
    query, gallery = unit_rows(7, 50, generator=gen), unit_rows(40, 50, generator=gen)
    target = torch.randint(0, 40, (7,), generator=gen)
    good = mmfast.similarity_topk(query.float(), gallery.float(), 5, target=target)
    check_within_rounding(good, query, gallery, 5, target, torch.float32)
    swapped = good.indices.clone()
    swapped[:, [3, 4]] = swapped[:, [4, 3]]  # random scores: never within rounding of each other
    wrong_rank = good.target_rank + 1
    for bad in (good._replace(indices=swapped), good._replace(target_rank=wrong_rank)):
        with pytest.raises(AssertionError):
            check_within_rounding(bad, query, gallery, 5, target, torch.float32)
    sixth = torch.full_like(good.indices[:, :1], -1)
    scores = query.double() @ gallery.double().T
    sixth[:, 0] = scores.sort(dim=1, descending=True).indices[:, 5]
    dropped = good._replace(indices=torch.cat([good.indices[:, :4], sixth], dim=1))
    with pytest.raises(AssertionError):
        check_within_rounding(dropped, query, gallery, 5, target, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tiny_chunks(backend, monkeypatch):
    """Tiles of a few scores (k spans several of them); on triton, one gallery split per column block."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 64)
    if backend == "triton":
        from mmfast.kernels import similarity_topk as triton_kernels

        monkeypatch.setattr(triton_kernels, "INTERPRETER_PROGRAMS", 1000)
    gen = torch.Generator().manual_seed(7)
    query, gallery = integer_rows(13, 9, gen), integer_rows(150, 9, gen)
    for k, target in zip((1, 7, 30), target_forms(13, 150, gen), strict=True):
        check_exact(backend, query, gallery, k, target, torch.float32)
        check_exact(backend, query, gallery, k, target, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_counts_only_strictly_higher_items(backend):
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # query 0 scores 1, 0, 1, 2, .5, 1: item 0 has one item above it (3); its duplicates 2 and 5 do not count.
    target = torch.tensor([[0, -1], [1, -1], [1, 4]])
    result = mmfast.similarity_topk(query, gallery, 3, target=target, backend=backend)
    assert result.target_rank.tolist() == [2, 1, 2]
    assert result.indices.tolist() == [[3, 0, 2], [1, 4, 0], [3, 0, 1]]
    assert result.values.tolist() == [[2.0, 1.0, 1.0], [1.0, 0.5, 0.0], [2.0, 1.0, 1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_forms_agree(backend):
    gen = torch.Generator().manual_seed(8)
    query, gallery = unit_rows(9, 16, generator=gen).float(), unit_rows(40, 16, generator=gen).float()
    single = torch.randint(0, 40, (9,), generator=gen)
    padded = torch.stack([single, single, -torch.ones_like(single)], dim=1)
    forms = (single, single[:, None], single.to(torch.int32), padded)
    ranks = [mmfast.similarity_topk(query, gallery, 3, target=t, backend=backend).target_rank for t in forms]
    for rank in ranks[1:]:
        assert torch.equal(rank, ranks[0])
    both = torch.stack([single, (single + 1) % 40], dim=1)
    best = mmfast.similarity_topk(query, gallery, 3, target=both, backend=backend).target_rank
    alone = [mmfast.similarity_topk(query, gallery, 3, target=both[:, i], backend=backend).target_rank for i in (0, 1)]
    assert torch.equal(best, torch.minimum(*alone))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_and_any_strides(backend):
    gen = torch.Generator().manual_seed(9)
    query = unit_rows(20, 8, generator=gen).float().requires_grad_()
    gallery_t = unit_rows(8, 30, generator=gen).float().requires_grad_()  # a [D, G] tensor: pass its transpose
    target = torch.arange(10)
    result = mmfast.similarity_topk(query[::2], gallery_t.T, 4, target=target, backend=backend)
    assert not result.values.requires_grad and result.values.grad_fn is None
    expected = mmfast.similarity_topk(query[::2].detach().contiguous(), gallery_t.T.detach().contiguous(), 4,
                                      target=target, backend="reference")  # fmt: skip
    torch.testing.assert_close(result.values, expected.values)
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.target_rank, expected.target_rank)


def test_auto_and_reference_backends_agree():
    gen = torch.Generator().manual_seed(10)
    query, gallery = integer_rows(6, 5, gen), integer_rows(12, 5, gen)
    target = torch.randint(0, 12, (6,), generator=gen)
    auto = mmfast.similarity_topk(query, gallery, 4, target=target)
    reference = mmfast.similarity_topk(query, gallery, 4, target=target, backend="reference")
    assert reference.values.dtype == torch.float64
    for a, b in zip(auto, reference, strict=True):
        assert torch.equal(a, b)
    values, indices, rank = auto  # a NamedTuple unpacks
    assert rank is auto.target_rank


def test_triton_declines_what_its_kernel_cannot_do():
    query, gallery = torch.randn(3, 4), torch.randn(200, 4)
    with pytest.raises(ValueError, match="backend='triton' is unavailable.*at most 128 items per query, got k = 129"):
        mmfast.similarity_topk(query, gallery, 129, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' is unavailable.*float64"):
        mmfast.similarity_topk(query.double(), gallery.double(), 3, backend="triton")


Q, G, D = 4, 6, 3
NO_META = "meta tensors hold no data|it needs CPU tensors, got meta|it does not run on meta tensors"


def bad_inputs():
    q, g = torch.randn(Q, D), torch.randn(G, D)
    nan_g = g.clone()
    nan_g[4, 1] = float("nan")
    inf_q = q.clone()
    inf_q[2, 0] = float("inf")
    return [
        ("query as list", dict(query=q.tolist()), TypeError, "query must be a torch.Tensor"),
        ("gallery 1-D", dict(gallery=g[0]), ValueError, r"gallery must be 2-D \[G, D\]"),
        ("query 3-D", dict(query=q[None]), ValueError, r"query must be 2-D \[Q, D\]"),
        ("int query", dict(query=q.long()), TypeError, "query must be float32, bfloat16, float16 or float64"),
        ("dtype mismatch", dict(gallery=g.double()), TypeError, "gallery has dtype torch.float64 but query has"),
        ("D mismatch", dict(gallery=torch.randn(G, D + 1)), ValueError, "gallery has D = 4 but query has D = 3"),
        ("empty query", dict(query=q[:0]), ValueError, "query needs at least one row"),
        ("empty gallery", dict(gallery=g[:0]), ValueError, "gallery needs at least one row"),
        ("D = 0", dict(query=q[:, :0], gallery=g[:, :0]), ValueError, "query needs at least one row and D >= 1"),
        ("device", dict(gallery=g.to("meta")), ValueError, "gallery is on meta but query is on cpu"),
        ("meta", dict(query=q.to("meta"), gallery=g.to("meta")), ValueError, NO_META),
        ("meta with target", dict(query=q.to("meta"), gallery=g.to("meta"), target=torch.zeros(Q, dtype=torch.long,
         device="meta")), ValueError, NO_META),
        ("NaN", dict(gallery=nan_g), ValueError, "gallery row 4 has a NaN or infinite value"),
        ("inf", dict(query=inf_q), ValueError, "query row 2 has a NaN or infinite value"),
        ("k = 0", dict(k=0), ValueError, "k must be >= 1, got 0"),
        ("k negative", dict(k=-3), ValueError, "k must be >= 1, got -3"),
        ("k float", dict(k=2.0), TypeError, "k must be an int, got float"),
        ("k bool", dict(k=True), TypeError, "k must be an int, got bool"),
        ("k tensor", dict(k=torch.tensor(2)), TypeError, "k must be an int, got Tensor"),
        ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
        ("target list", dict(target=[0, 1, 2, 3]), TypeError, "target must be a torch.Tensor"),
        ("target float", dict(target=torch.zeros(Q)), TypeError, "target must hold integer gallery indices"),
        ("target bool", dict(target=torch.zeros(Q, dtype=torch.bool)), TypeError, "target must hold integer"),
        ("target short", dict(target=torch.zeros(Q - 1, dtype=torch.long)), ValueError, r"target must be \[Q\] or"),
        ("target 3-D", dict(target=torch.zeros(Q, 1, 1, dtype=torch.long)), ValueError, r"target must be \[Q\] or"),
        ("target P = 0", dict(target=torch.zeros(Q, 0, dtype=torch.long)), ValueError, "P >= 1"),
        ("target device", dict(target=torch.zeros(Q, dtype=torch.long, device="meta")), ValueError,
         "target is on meta but query is on cpu"),
        ("target too big", dict(target=torch.tensor([0, 1, G, 2])), ValueError,
         r"target\[2\] = 6 is not a gallery index in \[0, 6\)$"),
        ("target -1 in [Q]", dict(target=torch.tensor([0, -1, 1, 2])), ValueError,
         r"target\[1\] = -1 is not a gallery index in \[0, 6\)$"),
        ("target < -1", dict(target=torch.tensor([[0, 1], [1, -2], [2, 2], [3, 3]])), ValueError,
         r"target\[1, 1\] = -2 is not a gallery index in \[0, 6\) or -1 \(padding\)"),
        ("target row empty", dict(target=torch.tensor([[0, 1], [-1, -1], [2, -1], [-1, -1]])), ValueError,
         r"target rows \[1, 3\] have no valid entry"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_bad_input_is_named(backend, case):
    _, overrides, error, message = case
    args = dict(query=torch.randn(Q, D), gallery=torch.randn(G, D), k=2, target=None, backend=backend)
    args.update(overrides)
    with pytest.raises(error, match=message):
        mmfast.similarity_topk(args.pop("query"), args.pop("gallery"), args.pop("k"), **args)


def memory_mapped(gallery: torch.Tensor, folder, form: str, name: str = "gallery"):
    """`gallery` written to a new file and opened memory-mapped: a numpy memmap, or a torch.from_file tensor."""
    if form == "numpy":
        path = folder / f"{name}.npy"
        np.save(path, gallery.numpy())
        return np.load(path, mmap_mode="r")
    path = folder / f"{name}.bin"
    gallery.contiguous().numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=gallery.numel(), dtype=gallery.dtype).view(gallery.shape)


@pytest.mark.parametrize("form", ["numpy", "torch.from_file"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_memory_mapped_gallery_equals_in_memory(backend, dtype, form, tmp_path, monkeypatch):
    """A gallery memory-mapped from a file, read in several chunks (the last one short), gives exactly
    the in-memory search: values, indices with their tie order, ranks. Integer rows tie a lot; the
    random half checks the float32 GEMM path gives the same bits from the file."""
    monkeypatch.setattr(CpuSimilarityTopk, "chunk_bytes", 1)  # chunks of one 512-item block
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 40_000)
    gen = torch.Generator().manual_seed(12)
    n_queries, n_gallery, d = 131, 1_037, 29
    ties = integer_rows(n_gallery, d, gen)
    random_rows = unit_rows(n_gallery, d, generator=gen)
    cases = {
        "ties": (ties, integer_rows(n_queries, d, gen)),
        "random": (random_rows, unit_rows(n_queries, d, generator=gen)),
    }
    for name, (rows, query) in cases.items():
        gallery, query = rows.to(dtype), query.to(dtype)
        mapped = memory_mapped(gallery, tmp_path, form, name)
        for k, target in zip((1, 9, 300), target_forms(n_queries, n_gallery, gen), strict=True):
            expected = mmfast.similarity_topk(query, gallery, k, target=target, backend=backend)
            got = mmfast.similarity_topk(query, mapped, k, target=target, backend=backend)
            for a, b in zip(got, expected, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
        if name == "ties":  # and both equal the float64 reference, ties included
            check_exact(backend, query.double(), gallery.double(), 9, None, dtype)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_blocks_at_odd_sizes_are_exact(backend):
    """Several query blocks and item blocks (512) of the cpu kernel, none of them full; then more queries
    than 2 × 512 per thread, so its query blocks take their largest size (512 rows), the last one not full."""
    gen = torch.Generator().manual_seed(13)
    query, gallery = integer_rows(259, 7, gen), integer_rows(1_299, 7, gen)
    for k, target in zip((1, 100, 513), target_forms(259, 1_299, gen), strict=True):
        check_exact(backend, query, gallery, k, target, torch.float32)
    many = 2 * 512 * torch.get_num_threads() + 77
    target = target_forms(many, 700, gen)[2]
    check_exact(backend, integer_rows(many, 7, gen), gallery[:700], 60, target, torch.float32)


def test_progress_bar_counts_every_gallery_item(capfd, tmp_path):
    gen = torch.Generator().manual_seed(14)
    query, gallery = unit_rows(5, 8, generator=gen).float(), unit_rows(700, 8, generator=gen).float()
    plain = mmfast.similarity_topk(query, gallery, 3)
    shown = mmfast.similarity_topk(query, memory_mapped(gallery, tmp_path, "numpy"), 3, progress=True)
    assert torch.equal(plain.indices, shown.indices) and torch.equal(plain.values, shown.values)
    err = capfd.readouterr().err
    assert "similarity_topk" in err and "100%" in err and "700/700" in err, err


def test_nan_in_a_later_chunk_of_a_memory_mapped_gallery_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(CpuSimilarityTopk, "chunk_bytes", 1)
    gallery = torch.randn(1_200, 4)
    gallery[1_100, 2] = float("nan")
    with pytest.raises(ValueError, match="gallery row 1100 has a NaN or infinite value"):
        mmfast.similarity_topk(torch.randn(3, 4), memory_mapped(gallery, tmp_path, "numpy"), 2, backend="cpu")


def bad_numpy_galleries():
    g = np.random.default_rng(0).standard_normal((G, D)).astype(np.float32)
    return [
        ("numpy 1-D", g[0], ValueError, r"gallery must be 2-D \[G, D\], got a numpy array of shape \(3,\)"),
        ("numpy int", g.astype(np.int32), TypeError, "gallery must be float32, float16 or float64, got a numpy array"),
        ("numpy big-endian", g.astype(">f4"), TypeError, "gallery has byte order '>'"),
        ("numpy reversed", g[::-1], ValueError, "gallery's strides .* are negative"),
        ("numpy dtype mismatch", g.astype(np.float64), TypeError, "gallery has dtype torch.float64 but query has"),
    ]


@pytest.mark.parametrize("case", bad_numpy_galleries(), ids=lambda c: c[0])
def test_bad_numpy_gallery_is_named(case):
    _, gallery, error, message = case
    with pytest.raises(error, match=message):
        mmfast.similarity_topk(torch.randn(Q, D), gallery, 2)


def test_bad_progress_is_named():
    with pytest.raises(TypeError, match="progress must be True or False, got str"):
        mmfast.similarity_topk(torch.randn(Q, D), torch.randn(G, D), 2, progress="yes")

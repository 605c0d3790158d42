"""mmfast.late_interaction_topk against the float64 reference, on every backend.

Two regimes, as tests/test_similarity_topk.py's:
- exact: small-integer token vectors, whose MaxSim scores every dtype and summation order computes
  exactly and which tie a lot: values, indices (tie order) and ranks must equal the reference's;
- rounding: random unit token vectors, checked against the float64 reference on the same (rounded)
  inputs up to a rigorous bound on each score's float32 error (`maxsim_error_bound`). Only documents
  whose scores lie within that bound of each other may swap, so a wrong pick still fails.
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.reference.late_interaction_topk import late_interaction_topk_reference
from tests.helpers import BACKENDS, unit_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def integer_tokens(n: int, tokens: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-2, 3, (n, tokens, d), generator=generator).double()


def ragged_mask(n: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Random lengths 1..tokens (row 0 keeps a single token), as integer 0/1."""
    lengths = torch.randint(1, tokens + 1, (n,), generator=generator)
    lengths[0] = 1
    return (torch.arange(tokens)[None, :] < lengths[:, None]).to(torch.int64)


def target_forms(n_queries: int, n_corpus: int, generator: torch.Generator):
    """None, a [Q] index and a [Q, 3] set padded with -1 (with a repeated index in it)."""
    single = torch.randint(0, n_corpus, (n_queries,), generator=generator)
    sets = torch.randint(0, n_corpus, (n_queries, 3), generator=generator)
    sets[::2, 1] = -1
    sets[1::3, 2] = sets[1::3, 0]
    return [None, single, sets]


def run(backend, query, corpus, k, dtype, **options):
    return mmfast.late_interaction_topk(query.to(dtype), corpus.to(dtype), k, backend=backend, **options)


def check_result_types(result, n_queries, k, dtype, target):
    score_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert isinstance(result, mmfast.LateInteractionTopK)
    assert result.values.shape == (n_queries, k) and result.values.dtype == score_dtype
    assert result.indices.shape == (n_queries, k) and result.indices.dtype == torch.int64
    assert not torch.isnan(result.values).any()
    if target is None:
        assert result.target_rank is None
    else:
        assert result.target_rank.shape == (n_queries,) and result.target_rank.dtype == torch.int64


def check_exact(backend, query, corpus, k, dtype, **options):
    ours = run(backend, query, corpus, k, dtype, **options)
    values, indices, rank = late_interaction_topk_reference(query.to(dtype), corpus.to(dtype), k, **options)
    check_result_types(ours, query.shape[0], min(k, corpus.shape[0]), dtype, options.get("target"))
    # A normalised score is an integer over the query's length: float32's quotient rounds.
    tolerance = 1e-6 if options.get("normalize_scores") and dtype != torch.float64 else 0
    torch.testing.assert_close(ours.values.double(), values, rtol=tolerance, atol=0)
    assert torch.equal(ours.indices, indices), (ours.indices, indices)
    if options.get("target") is not None:
        assert torch.equal(ours.target_rank, rank), (ours.target_rank, rank)


@pytest.mark.parametrize("tokens", [(1, 1), (3, 17), (32, 70)], ids=lambda t: f"Lq{t[0]}-Ld{t[1]}")
@pytest.mark.parametrize("g", [1, 5, 41], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("q", [1, 7], ids=lambda q: f"Q{q}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_odd_sizes_and_masks(backend, q, g, tokens):
    query_tokens, doc_tokens = tokens
    gen = torch.Generator().manual_seed(q * 1000 + g * 10 + query_tokens)
    query, corpus = integer_tokens(q, query_tokens, 5, gen), integer_tokens(g, doc_tokens, 5, gen)
    query_mask, corpus_mask = ragged_mask(q, query_tokens, gen), ragged_mask(g, doc_tokens, gen).bool()
    for k, target, normalize in zip((1, 4, g + 3), target_forms(q, g, gen), (False, True, False), strict=True):
        for masks in ({}, dict(query_mask=query_mask, corpus_mask=corpus_mask)):
            check_exact(backend, query, corpus, k, torch.float32, target=target, normalize_scores=normalize, **masks)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_every_dtype(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    query, corpus = integer_tokens(9, 6, 20, gen), integer_tokens(30, 11, 20, gen)
    masks = dict(query_mask=ragged_mask(9, 6, gen), corpus_mask=ragged_mask(30, 11, gen))
    if backend == "triton" and dtype == torch.float64:
        with pytest.raises(ValueError, match="backend='triton' is unavailable.*float64"):
            run(backend, query, corpus, 5, dtype)
        return
    for k, target, normalize in zip((1, 5, 20), target_forms(9, 30, gen), (True, False, True), strict=True):
        check_exact(backend, query, corpus, k, dtype, target=target, normalize_scores=normalize, **masks)


def maxsim_error_bound(query, corpus, query_mask, corpus_mask, dtype) -> torch.Tensor:
    """[Q, G] bound on |computed − exact| of a MaxSim score accumulated in float32 (float64) in any
    order: each token score is within e_ts = γ_{D+1}·Σ_d |q_d c_d| (Higham §3.1), so each max is
    within max_s e_ts; the sum of L_q maxima adds γ_{L_q}·Σ_t |max_t|. Doubled for the reference."""
    unit = 2.0**-53 if dtype == torch.float64 else 2.0**-24

    def gamma(n):
        return n * unit / (1 - n * unit)

    q, c = query.double(), corpus.double()
    token_bound = gamma(q.shape[2] + 1) * torch.einsum("qtd,gsd->qgts", q.abs(), c.abs())
    token_bound = token_bound.masked_fill(~corpus_mask.bool()[None, :, None, :], 0).amax(dim=3)
    maxima = torch.einsum("qtd,gsd->qgts", q, c).masked_fill(~corpus_mask.bool()[None, :, None, :], -torch.inf)
    maxima = maxima.amax(dim=3).abs()
    real = query_mask.bool()[:, None, :]
    per_score = (token_bound * real).sum(dim=2) + gamma(q.shape[1] + 1) * (maxima * real).sum(dim=2)
    return 2 * per_score


def check_within_rounding(result, query, corpus, k, dtype, query_mask, corpus_mask, target):
    query, corpus = query.to(dtype), corpus.to(dtype)
    exact = late_interaction_topk_reference(query, corpus, corpus.shape[0], query_mask=query_mask,
                                            corpus_mask=corpus_mask)  # fmt: skip
    exact = torch.empty_like(exact[0]).scatter_(1, exact[1], exact[0])  # [Q, G] in corpus order
    bound = maxsim_error_bound(query, corpus, query_mask, corpus_mask, dtype)
    n_queries, n_corpus = exact.shape
    check_result_types(result, n_queries, min(k, n_corpus), dtype, target)
    values, indices = result.values.double(), result.indices
    assert all(len(set(row)) == len(row) for row in indices.tolist()), "an index repeats in a row"
    claimed = exact.gather(1, indices)
    assert ((values - claimed).abs() <= bound.gather(1, indices)).all(), "a value is not its document's score"
    assert (values[:, 1:] <= values[:, :-1]).all(), "not best first"
    tied = values[:, 1:] == values[:, :-1]
    assert (indices[:, 1:] > indices[:, :-1])[tied].all(), "a tie is not in corpus-index order"
    left_out = torch.ones_like(exact, dtype=torch.bool).scatter_(1, indices, False)
    assert not (left_out & ((exact - bound) > values[:, -1:])).any(), "a document left out surely beats the k-th"
    if target is None:
        return
    sets = target[:, None] if target.dim() == 1 else target
    member = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, sets.clamp_min(0), sets >= 0)
    best = exact.masked_fill(~member, -torch.inf).amax(dim=1, keepdim=True)
    slack = bound.masked_fill(~member, 0).amax(dim=1, keepdim=True)
    lowest = ((exact - bound > best + slack) & ~member).sum(dim=1)
    highest = ((exact + bound > best - slack) & ~member).sum(dim=1)
    rank = result.target_rank - 1
    assert ((lowest <= rank) & (rank <= highest)).all(), (rank, lowest, highest)


@pytest.mark.parametrize(
    "backend, dtype",
    [(b, d) for b in BACKENDS for d in DTYPES if not (b == "triton" and d == torch.float64)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_random_tokens_within_rounding(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    for q, g, lq, ld, d in ((13, 60, 9, 33, 40), (3, 4, 2, 3, 3)):
        query, corpus = unit_rows(q, lq, d, generator=gen), unit_rows(g, ld, d, generator=gen)
        query_mask, corpus_mask = ragged_mask(q, lq, gen).bool(), ragged_mask(g, ld, gen).bool()
        for k, target in zip((1, 5, 20), target_forms(q, g, gen), strict=True):
            result = run(backend, query, corpus, k, dtype, query_mask=query_mask, corpus_mask=corpus_mask,
                         target=target)  # fmt: skip
            check_within_rounding(result, query, corpus, k, dtype, query_mask, corpus_mask, target)


def test_the_rounding_check_can_fail():
    gen = torch.Generator().manual_seed(6)
    query, corpus = unit_rows(5, 4, 30, generator=gen), unit_rows(40, 9, 30, generator=gen)
    query_mask, corpus_mask = ragged_mask(5, 4, gen).bool(), ragged_mask(40, 9, gen).bool()
    target = torch.randint(0, 40, (5,), generator=gen)
    args = dict(query_mask=query_mask, corpus_mask=corpus_mask, target=target)
    good = mmfast.late_interaction_topk(query.float(), corpus.float(), 5, **args)
    check_within_rounding(good, query, corpus, 5, torch.float32, query_mask, corpus_mask, target)
    swapped = good.indices.clone()
    swapped[:, [3, 4]] = swapped[:, [4, 3]]
    unmasked = mmfast.late_interaction_topk(query.float(), corpus.float(), 5, target=target)  # padding counted
    for bad in (good._replace(indices=swapped), good._replace(target_rank=good.target_rank + 1), unmasked):
        with pytest.raises(AssertionError):
            check_within_rounding(bad, query, corpus, 5, torch.float32, query_mask, corpus_mask, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tiny_tiles(backend, monkeypatch):
    """Tiles of one (query, document) pair or a few: k spans several of them."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 64)
    gen = torch.Generator().manual_seed(7)
    query, corpus = integer_tokens(6, 3, 4, gen), integer_tokens(50, 5, 4, gen)
    masks = dict(query_mask=ragged_mask(6, 3, gen), corpus_mask=ragged_mask(50, 5, gen))
    for k, target in zip((1, 7, 30), target_forms(6, 50, gen), strict=True):
        check_exact(backend, query, corpus, k, torch.float32, target=target, **masks)
        check_exact(backend, query, corpus, k, torch.bfloat16, target=target, normalize_scores=True, **masks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_scores_ranks_and_padding(backend):
    # Document 1's padding token would win every query token if it counted; query 1's padding too.
    corpus = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [9.0, 9.0]], [[1.0, 0.0], [0.0, 0.0]]])
    corpus_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]])
    query_mask = torch.tensor([[True, True], [True, False]])
    # scores: query 0: 2, 1, 1; query 1: 1, 0.5, 0.
    result = mmfast.late_interaction_topk(query, corpus, 3, query_mask=query_mask, corpus_mask=corpus_mask,
                                          target=torch.tensor([2, 1]), backend=backend)  # fmt: skip
    assert result.values.tolist() == [[2.0, 1.0, 1.0], [1.0, 0.5, 0.0]]
    assert result.indices.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert result.target_rank.tolist() == [2, 2]  # query 0's target ties document 1: a tie is not above
    normalised = mmfast.late_interaction_topk(query, corpus, 2, query_mask=query_mask, corpus_mask=corpus_mask,
                                              normalize_scores=True, backend=backend)  # fmt: skip
    assert normalised.values.tolist() == [[1.0, 0.5], [1.0, 0.5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_vector_case_is_similarity_topk(backend):
    """One token per query and document: MaxSim is the dot product."""
    gen = torch.Generator().manual_seed(8)
    query, corpus = unit_rows(9, 1, 16, generator=gen).float(), unit_rows(40, 1, 16, generator=gen).float()
    target = torch.randint(0, 40, (9, 2), generator=gen)
    ours = mmfast.late_interaction_topk(query, corpus, 6, target=target, backend=backend)
    theirs = mmfast.similarity_topk(query[:, 0], corpus[:, 0], 6, target=target, backend="reference")
    torch.testing.assert_close(ours.values, theirs.values.float())
    assert torch.equal(ours.indices, theirs.indices) and torch.equal(ours.target_rank, theirs.target_rank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_and_any_strides(backend):
    gen = torch.Generator().manual_seed(9)
    query = unit_rows(10, 4, 8, generator=gen).float().requires_grad_()
    corpus_t = unit_rows(8, 6, 20, generator=gen).float().requires_grad_()  # [D, L_d, G]: pass its permutation
    target = torch.arange(5)
    result = mmfast.late_interaction_topk(query[::2], corpus_t.permute(2, 1, 0), 4, target=target, backend=backend)
    assert not result.values.requires_grad and result.values.grad_fn is None
    expected = mmfast.late_interaction_topk(query[::2].detach().contiguous(),
                                            corpus_t.permute(2, 1, 0).detach().contiguous(), 4, target=target,
                                            backend="reference")  # fmt: skip
    torch.testing.assert_close(result.values, expected.values)
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.target_rank, expected.target_rank)


def test_auto_and_reference_backends_agree():
    gen = torch.Generator().manual_seed(10)
    query, corpus = integer_tokens(6, 3, 5, gen), integer_tokens(12, 4, 5, gen)
    target = torch.randint(0, 12, (6,), generator=gen)
    auto = mmfast.late_interaction_topk(query, corpus, 4, target=target)
    reference = mmfast.late_interaction_topk(query, corpus, 4, target=target, backend="reference")
    assert reference.values.dtype == torch.float64
    for a, b in zip(auto, reference, strict=True):
        assert torch.equal(a, b)


Q, G, LQ, LD, D = 4, 6, 3, 5, 2
NO_META = "meta tensors hold no data|it needs CPU tensors, got meta|it does not run on meta tensors"


def bad_inputs():
    q, c = torch.randn(Q, LQ, D), torch.randn(G, LD, D)
    nan_c = c.clone()
    nan_c[4, 1, 0] = float("nan")
    inf_q = q.clone()
    inf_q[2, 0, 1] = float("inf")
    no_token = torch.ones(G, LD, dtype=torch.bool)
    no_token[3] = False
    return [
        ("query as list", dict(query=q.tolist()), TypeError, "query must be a torch.Tensor"),
        ("corpus 2-D", dict(corpus=c[0]), ValueError, r"corpus must be 3-D \[rows, tokens, D\]"),
        ("int query", dict(query=q.long()), TypeError, "query must be float32, bfloat16, float16 or float64"),
        ("dtype mismatch", dict(corpus=c.double()), TypeError, "corpus has dtype torch.float64 but query has"),
        ("D mismatch", dict(corpus=torch.randn(G, LD, D + 1)), ValueError, "corpus has D = 3 but query has D = 2"),
        ("empty query", dict(query=q[:0]), ValueError, "query has an empty dimension"),
        ("empty corpus tokens", dict(corpus=c[:, :0]), ValueError, "corpus has an empty dimension"),
        ("device", dict(corpus=c.to("meta")), ValueError, "corpus is on meta but query is on cpu"),
        ("meta", dict(query=q.to("meta"), corpus=c.to("meta")), ValueError, NO_META),
        ("NaN", dict(corpus=nan_c), ValueError, "corpus row 4 has a NaN or infinite value"),
        ("inf", dict(query=inf_q), ValueError, "query row 2 has a NaN or infinite value"),
        ("k = 0", dict(k=0), ValueError, "k must be >= 1, got 0"),
        ("k float", dict(k=2.0), TypeError, "k must be an int, got float"),
        ("k bool", dict(k=True), TypeError, "k must be an int, got bool"),
        ("normalize int", dict(normalize_scores=1), TypeError, "normalize_scores must be a bool, got int"),
        ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
        ("mask shape", dict(query_mask=torch.ones(Q, LQ + 1, dtype=torch.bool)), ValueError,
         r"query_mask must have shape \(4, 3\), got \(4, 4\)"),
        ("mask float", dict(corpus_mask=torch.ones(G, LD)), TypeError, "corpus_mask must be a bool or integer"),
        ("mask list", dict(corpus_mask=[[1] * LD] * G), TypeError, "corpus_mask must be a torch.Tensor or None"),
        ("mask device", dict(query_mask=torch.ones(Q, LQ, dtype=torch.bool, device="meta")), ValueError,
         "query_mask is on meta but its embeddings are on cpu"),
        ("mask row empty", dict(corpus_mask=no_token), ValueError, "corpus_mask row 3 has no real token"),
        ("target list", dict(target=[0, 1, 2, 3]), TypeError, "target must be a torch.Tensor"),
        ("target float", dict(target=torch.zeros(Q)), TypeError, "target must hold integer corpus indices"),
        ("target short", dict(target=torch.zeros(Q - 1, dtype=torch.long)), ValueError, r"target must be \[Q\] or"),
        ("target too big", dict(target=torch.tensor([0, 1, G, 2])), ValueError,
         r"target\[2\] = 6 is not a corpus index in \[0, 6\)$"),
        ("target < -1", dict(target=torch.tensor([[0, 1], [1, -2], [2, 2], [3, 3]])), ValueError,
         r"target\[1, 1\] = -2 is not a corpus index in \[0, 6\) or -1 \(padding\)"),
        ("target row empty", dict(target=torch.tensor([[0, 1], [-1, -1], [2, -1], [-1, -1]])), ValueError,
         r"target rows \[1, 3\] have no valid entry"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_bad_input_is_named(backend, case):
    _, overrides, error, message = case
    args = dict(query=torch.randn(Q, LQ, D), corpus=torch.randn(G, LD, D), k=2, backend=backend)
    args.update(overrides)
    with pytest.raises(error, match=message):
        mmfast.late_interaction_topk(args.pop("query"), args.pop("corpus"), args.pop("k"), **args)

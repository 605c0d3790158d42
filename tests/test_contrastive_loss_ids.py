"""Duplicate-aware mmfast.contrastive_loss (candidate_ids, query_ids) against the float64 reference,
on every backend: every option, odd sizes, every dtype, every input's gradient, the edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfast
from mmfast._extension import load_extension
from mmfast.backends import chunked
from mmfast.reference import contrastive_loss_reference
from tests.helpers import BACKENDS, CONTRASTIVE_BACKENDS, unit_rows
from tests.test_contrastive_loss import OPTION_SETS, check_against_reference, make_inputs, run


def make_ids(b: int, n_negatives: int, seed: int, *, kind: str = "mixed"):
    """(candidate_ids [B + M], query_ids [B]).

    mixed: few distinct values, so targets repeat (shared label texts), negatives copy targets, and
        queries repeat; distinct: no two equal; same: one id for everything (every negative masked);
    negatives_only: the negatives share ids among themselves but never a target's (nothing masked)."""
    g = torch.Generator().manual_seed(seed)
    n = b + n_negatives
    if kind == "mixed":
        return torch.randint(0, max(2, b // 2), (n,), generator=g), torch.randint(0, max(2, b // 2), (b,), generator=g)
    if kind == "distinct":
        return torch.randperm(n, generator=g) * 7 - 3, torch.randperm(b, generator=g) + 100
    if kind == "same":
        return torch.full((n,), 5), torch.full((b,), -2)
    if kind == "negatives_only":
        return torch.cat([torch.arange(b), torch.full((n_negatives,), b)]), torch.arange(b)
    raise ValueError(kind)


def with_ids(options: dict, candidate_ids, query_ids) -> dict:
    """The options plus the ids (query_ids only for the symmetric loss, which alone takes them)."""
    out = dict(options, candidate_ids=candidate_ids)
    if options.get("symmetric"):
        out["query_ids"] = query_ids
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_every_option_float64(backend, options, reduction):
    q, t, n = make_inputs(7, 100, 3, seed=1, peaky=True)
    ids = make_ids(7, 21, seed=2)
    weight = torch.rand(7, dtype=torch.float64) + 0.5
    check_against_reference(backend, q, t, n, torch.float64, weight=weight, reduction=reduction,
                            **with_ids(options, *ids))  # fmt: skip


@pytest.mark.parametrize("k", [0, 1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("b", [1, 7, 129], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_odd_sizes_float32(backend, b, k):
    q, t, n = make_inputs(b, 37, k, seed=b * 10 + k)
    ids = make_ids(b, b * k, seed=b + k)
    check_against_reference(backend, q, t, n, torch.float32, **with_ids(OPTION_SETS["everything"], *ids))
    check_against_reference(backend, q, t, n, torch.float32, reduction="none", **with_ids({}, *ids))


@pytest.mark.parametrize("options", ["plain", "llave", "unime"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_dtypes(backend, dtype, options):
    q, t, n = make_inputs(33, 64, 1, seed=7)
    ids = make_ids(33, 33, seed=8)
    check_against_reference(backend, q, t, n, dtype, **with_ids(OPTION_SETS[options], *ids))
    check_against_reference(backend, q, t, n, dtype, reduction="none", **with_ids(OPTION_SETS[options], *ids))


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_many_chunks(backend, options, monkeypatch):
    """Chunks of a few rows: each row must compare against its own positive's id (row offset)."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 4096)
    q, t, n = make_inputs(129, 16, 1, seed=9)
    check_against_reference(backend, q, t, n, torch.float64, **with_ids(OPTION_SETS[options], *make_ids(129, 129, 3)))


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_negatives_not_per_query(backend):
    q, t, n = make_inputs(7, 33, 0, seed=3, m=5)
    ids = make_ids(7, 5, seed=4)
    check_against_reference(backend, q, t, n, torch.float64, **with_ids(OPTION_SETS["everything"], *ids))


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_every_negative_masked_gives_zero(backend, options):
    """One id for every candidate and query: no row has a negative left, so every row's loss is 0
    and no input gets a gradient (exactly: logsumexp of the positive alone is the positive)."""
    q, t, n = make_inputs(5, 12, 2, seed=5)
    ids = with_ids(options, *make_ids(5, 10, 0, kind="same"))
    loss, grads = run(backend, q, t, n, torch.float32, reduction="none", **ids)
    assert torch.equal(loss, torch.zeros(5))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))
    check_against_reference(backend, q, t, n, torch.float64, **ids)


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_only_the_symmetric_half_fully_masked(backend):
    """query_ids all equal: every target's negatives (the other queries) are masked, the queries'
    candidates not: the loss is half the forward direction's."""
    q, t, n = make_inputs(6, 12, 1, seed=6)
    candidate_ids, _ = make_ids(6, 6, 0, kind="distinct")
    ids = dict(candidate_ids=candidate_ids, query_ids=torch.zeros(6, dtype=torch.int64))
    options = dict(symmetric=True, hardness=2.0, reduction="none")
    loss, _ = run(backend, q, t, n, torch.float64, **ids, **options)
    forward_only, _ = run(backend, q, t, n, torch.float64, **dict(options, symmetric=False))
    torch.testing.assert_close(loss, 0.5 * forward_only, rtol=1e-12, atol=1e-12)
    check_against_reference(backend, q, t, n, torch.float64, **ids, **options)


def test_duplicate_positives_are_not_negatives():
    """The rule on a case worked by hand: targets 0 and 2 are the same label, so for query 0 the
    loss is over {target 0, target 1} only."""
    q, t, _ = make_inputs(3, 8, 0, seed=7)
    ids = torch.tensor([4, 9, 4])
    loss = mmfast.contrastive_loss(q, t, candidate_ids=ids, reduction="none", temperature=0.1, backend="cpu")
    scores = q @ t.T / 0.1
    expected0 = torch.logsumexp(scores[0, [0, 1]], 0) - scores[0, 0]
    expected2 = torch.logsumexp(scores[2, [1, 2]], 0) - scores[2, 2]
    torch.testing.assert_close(loss[0], expected0)
    torch.testing.assert_close(loss[2], expected2)
    torch.testing.assert_close(loss[1], torch.logsumexp(scores[1], 0) - scores[1, 1])


@pytest.mark.parametrize(
    "which", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_gradient_of_any_subset_of_inputs(backend, reduction, which):
    q, t, n = make_inputs(9, 20, 2, seed=2)
    candidate_ids, query_ids = make_ids(9, 18, seed=3)
    results = []
    for be in (backend, "reference"):
        inputs = [x.clone().requires_grad_(flag) for x, flag in zip((q, t, n), which, strict=True)]
        weight = torch.linspace(0.5, 1.5, 9, dtype=torch.float64).requires_grad_()
        loss = mmfast.contrastive_loss(*inputs, weight=weight, reduction=reduction, symmetric=True, hardness=2.0,
                                       candidate_ids=candidate_ids, query_ids=query_ids, backend=be)  # fmt: skip
        loss.sum().backward()
        results.append([x.grad for x in (*inputs, weight)])
    for a, r in zip(*results, strict=True):
        assert (a is None) == (r is None)
        if r is not None:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_any_integer_dtype(dtype):
    q, t, n = make_inputs(6, 10, 1, seed=8)
    candidate_ids, query_ids = make_ids(6, 6, seed=9)
    options = dict(symmetric=True, topk=3, backend="cpu")
    expected = mmfast.contrastive_loss(q, t, n, candidate_ids=candidate_ids, query_ids=query_ids, **options)
    got = mmfast.contrastive_loss(q, t, n, candidate_ids=candidate_ids.to(dtype), query_ids=query_ids.to(dtype),
                                  **options)  # fmt: skip
    assert torch.equal(got, expected)


options_strategy = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.02, 0.5]),
        "symmetric": st.booleans(),
        "hardness": st.sampled_from([0.0, 9.0, -5.0]),
        "false_negative_margin": st.one_of(st.none(), st.floats(-0.2, 0.3)),
        "topk": st.one_of(st.none(), st.integers(1, 12)),
        "reduction": st.sampled_from(["mean", "none"]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 30), d=st.integers(1, 40), k=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
       options=options_strategy, backend=st.sampled_from(BACKENDS),
       kind=st.sampled_from(["distinct", "negatives_only"]))  # fmt: skip
def test_ids_that_mask_nothing_change_nothing(b, d, k, seed, options, backend, kind):
    """Ids with no candidate sharing a positive's id give bitwise the loss and gradients of no ids."""
    g = torch.Generator().manual_seed(seed)
    q, t = unit_rows(b, d, generator=g), unit_rows(b, d, generator=g)
    n = unit_rows(b, k, d, generator=g) if k else None
    ids = with_ids(options, *make_ids(b, b * k, seed, kind=kind))
    with_, without = (run(backend, q, t, n, torch.float64, **extra, **options) for extra in (ids_only(ids), {}))
    assert torch.equal(with_[0], without[0])
    for a, r in zip(with_[1], without[1], strict=True):
        assert torch.equal(a, r)


def ids_only(options: dict) -> dict:
    return {key: options[key] for key in ("candidate_ids", "query_ids") if key in options}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 30), d=st.integers(1, 40), k=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
       options=options_strategy, backend=st.sampled_from(BACKENDS))  # fmt: skip
def test_any_shape_options_and_ids_match_reference(b, d, k, seed, options, backend):
    g = torch.Generator().manual_seed(seed)
    q, t = unit_rows(b, d, generator=g), unit_rows(b, d, generator=g)
    n = unit_rows(b, k, d, generator=g) if k else None
    ids = ids_only(with_ids(options, *make_ids(b, b * k, seed)))
    ours = run(backend, q, t, n, torch.float64, seed=seed, **ids, **options)
    expected = run("reference", q, t, n, torch.float64, seed=seed, **ids, **options)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-9, atol=1e-10)
    for a, r in zip(ours[1], expected[1], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("symmetric", [False, True])
def test_masked_candidate_counts_match_the_reference_mask(symmetric):
    b, m = 9, 14
    candidate_ids, query_ids = make_ids(b, m, seed=10)
    counts = mmfast.masked_candidate_counts(b, candidate_ids, query_ids if symmetric else None)
    rows = torch.arange(b)
    expected = (candidate_ids[None, :] == candidate_ids[:b, None]).sum(1) - 1
    if symmetric:
        expected += (query_ids[None, :] == query_ids[rows, None]).sum(1) - 1
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)


def test_module_takes_ids():
    q, t, n = make_inputs(7, 10, 1, seed=12)
    candidate_ids, query_ids = make_ids(7, 7, seed=13)
    module = mmfast.ContrastiveLoss(temperature=0.05, symmetric=True, backend="cpu")
    expected = mmfast.contrastive_loss(q, t, n, temperature=0.05, symmetric=True, candidate_ids=candidate_ids,
                                       query_ids=query_ids)  # fmt: skip
    torch.testing.assert_close(module(q, t, n, candidate_ids=candidate_ids, query_ids=query_ids), expected)


@pytest.mark.no_poison  # dynamo would trace the test's patched torch.empty
def test_torch_compile_traces_the_loss_with_ids():
    q, t, n = make_inputs(16, 32, 2, seed=14)
    candidate_ids, query_ids = make_ids(16, 32, seed=15)

    def step(q, t, n):
        loss = mmfast.contrastive_loss(q * 2.0, t, n, backend="cpu", symmetric=True, hardness=9.0,
                                       candidate_ids=candidate_ids, query_ids=query_ids)  # fmt: skip
        return loss * 3.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.float().requires_grad_() for x in (q, t, n)]
    eager_leaves = [x.float().requires_grad_() for x in (q, t, n)]
    loss, expected = compiled(*leaves), step(*eager_leaves)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for a, r in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


# --- bad ids: a clear error naming the argument ---


def raises(exc, match, **kwargs):
    q, t, n = make_inputs(4, 8, 2, seed=0)
    with pytest.raises(exc, match=match):
        mmfast.contrastive_loss(q, t, n, **kwargs)


def test_bad_ids():
    raises(TypeError, "candidate_ids must be an integer tensor", candidate_ids=torch.zeros(12))
    raises(TypeError, "candidate_ids must be an integer tensor", candidate_ids=torch.zeros(12, dtype=torch.bool))
    raises(TypeError, "candidate_ids must be a torch.Tensor of integer ids or None", candidate_ids=list(range(12)))
    raises(ValueError, r"candidate_ids must have shape \[12\] \(one id per candidate", candidate_ids=torch.arange(4))
    raises(ValueError, r"candidate_ids must have shape \[12\]", candidate_ids=torch.arange(12)[None])
    raises(ValueError, "candidate_ids is on meta but query is on cpu", candidate_ids=torch.arange(12, device="meta"))
    raises(ValueError, "query_ids mask duplicate queries in the symmetric half", query_ids=torch.arange(4))
    raises(ValueError, r"query_ids must have shape \[4\] \(one id per query\)", symmetric=True,
           query_ids=torch.arange(5))  # fmt: skip
    raises(TypeError, "query_ids must be an integer tensor", symmetric=True, query_ids=torch.zeros(4))


def test_cpu_kernel_checks_its_ids():
    ext = load_extension()
    scores, loss = torch.randn(3, 5), torch.empty(3)
    with pytest.raises(RuntimeError, match=r"mmfast cpu contrastive_loss: ids must be a contiguous CPU Int tensor"):
        ext.contrastive_softmax_rows(scores, 0, 50.0, 0.0, None, None, loss, None, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="ids must be a contiguous CPU Int tensor"):
        ext.contrastive_softmax_rows(scores, 0, 50.0, 0.0, None, None, loss, None, torch.zeros(5, dtype=torch.int64))
    index = torch.empty(3, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="ids must be a contiguous CPU Int tensor"):
        ext.contrastive_topk_rows(scores, 0, 50.0, 0.0, None, 2, None, loss, index, None, None,
                                  torch.zeros(10, dtype=torch.int32)[::2])  # fmt: skip


def test_reference_states_the_rule_plainly():
    """The oracle itself on a hand-checked case, with top-k: the duplicate takes no top-k slot."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    n = torch.tensor([[0.9, 0.0], [0.4, 0.0], [0.1, 0.0]], dtype=torch.float64)  # 0.9 is a copy of the target
    ids = torch.tensor([3, 3, 1, 2])
    loss = contrastive_loss_reference(q, t, n, topk=1, temperature=1.0, candidate_ids=ids)
    torch.testing.assert_close(loss, torch.logsumexp(torch.tensor([0.5, 0.4], dtype=torch.float64), 0) - 0.5)


@pytest.mark.no_poison
def test_custom_op_passes_opcheck_with_ids():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 16, generator=g, dtype=torch.float64).T
    t, n = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 8, generator=g, dtype=torch.float64)
    scale = torch.full((16,), 1 / 16, dtype=torch.float64)
    candidate_ids, query_ids = make_ids(16, 16, seed=3)
    args = (q, t, n, scale, None, None, None, 0, 0.05, True, 1.0, 0.1, 3, "cpu",
            [True, True, True, False, False, False], candidate_ids, query_ids)  # fmt: skip
    torch.library.opcheck(torch.ops.mmfast.contrastive_loss_rows.default, args)


def test_masked_candidate_counts_checks_its_arguments():
    with pytest.raises(ValueError, match="needs candidate_ids or query_ids"):
        mmfast.masked_candidate_counts(3, None)
    with pytest.raises(ValueError, match=r"candidate_ids must have shape \[3\]"):
        mmfast.masked_candidate_counts(3, torch.arange(2))
    with pytest.raises(TypeError, match="candidate_ids must be an integer tensor"):
        mmfast.masked_candidate_counts(3, torch.zeros(5))
    with pytest.raises(TypeError, match="candidate_ids must be a torch.Tensor of integer ids"):
        mmfast.masked_candidate_counts(3, [1, 2, 3])
    with pytest.raises(ValueError, match=r"query_ids must have shape \[3\]"):
        mmfast.masked_candidate_counts(3, torch.arange(5), torch.arange(4))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        mmfast.masked_candidate_counts(0, torch.arange(5))


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_learnable_temperature_with_ids(backend, options):
    """A tensor τ with grad and duplicate ids together: τ's gradient only sees the unmasked logits."""
    q, t, n = make_inputs(9, 16, 2, seed=16)
    ids = with_ids(OPTION_SETS[options], *make_ids(9, 18, seed=17))
    results = []
    for be in (backend, "reference"):
        tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
        leaves = [x.clone().requires_grad_() for x in (q, t, n)]
        loss = mmfast.contrastive_loss(*leaves, backend=be, **dict(ids, temperature=tau))
        results.append((loss, *torch.autograd.grad(loss, [*leaves, tau])))
    for a, r in zip(*results, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)

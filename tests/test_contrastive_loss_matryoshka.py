"""contrastive_loss with matryoshka_dims: every prefix L2-normalised on its own, against the float64
reference that computes the m losses separately, on every backend and with every option; and against
sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss) where the two compute the same."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.backends.contrastive_kernels import contrastive_kernels
from tests.helpers import BACKENDS
from tests.test_contrastive_loss import OPTION_SETS, check_against_reference, make_inputs
from tests.test_contrastive_loss_ids import make_ids, with_ids

# The Matryoshka loop always runs the chunked GEMMs (the triton backend's other paths do not apply).
DIMS = {
    "three": {"matryoshka_dims": (5, 16, 37)},
    "weighted": {"matryoshka_dims": (2, 9, 37), "matryoshka_weights": (0.5, 2.0, 1.0)},
    "short_of_D": {"matryoshka_dims": (7, 20)},  # the largest prefix need not be D
    "one": {"matryoshka_dims": (37,)},  # one prefix, D: the plain loss of the normalised embeddings
}


def raw(x: torch.Tensor | None, seed: int) -> torch.Tensor | None:
    """Unnormalised embeddings (rows of different lengths): the prefix normalisation is exercised."""
    if x is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return x * (0.5 + 2 * torch.rand(*x.shape[:-1], 1, generator=g, dtype=x.dtype))


def matryoshka_inputs(b, d, k, seed, **kwargs):
    q, t, n = make_inputs(b, d, k, seed, **kwargs)
    return raw(q, seed + 1), raw(t, seed + 2), raw(n, seed + 3)


# Every option set with the first two Matryoshka cases; the plain and the "everything" sets with the others.
DIM_CASES = [(dims, options) for dims in DIMS for options in OPTION_SETS if dims in ("three", "weighted")] + [
    (dims, options) for dims in ("short_of_D", "one") for options in ("plain", "everything")
]


@pytest.mark.parametrize(("dims", "options"), DIM_CASES, ids=[f"{d}-{o}" for d, o in DIM_CASES])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_option_float64(backend, dims, options):
    """Every reduction, with and without per-sample weights: loss and every gradient."""
    q, t, n = matryoshka_inputs(7, 37, 3, seed=1)
    for reduction in ("mean", "sum", "none"):
        for weight in (None, torch.rand(7, dtype=torch.float64) + 0.5):
            check_against_reference(backend, q, t, n, torch.float64, weight=weight, reduction=reduction,
                                    **OPTION_SETS[options], **DIMS[dims])  # fmt: skip


@pytest.mark.parametrize("kind", ["mixed", "same"])
@pytest.mark.parametrize("options", ["plain", "everything", "unime"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_duplicate_ids_and_learned_temperature(backend, options, kind):
    q, t, n = matryoshka_inputs(9, 37, 2, seed=3, peaky=True)
    candidate_ids, query_ids = make_ids(9, 18, seed=4, kind=kind)
    opts = with_ids(OPTION_SETS[options], candidate_ids, query_ids) | DIMS["weighted"]
    # With every negative left out ("same") the τ gradient is 0, which the oracle's autograd misses by
    # rounding (lse(s/τ) - s/τ): a learned τ only where negatives remain.
    learned = {"learned_temperature": 0.07} if kind == "mixed" else {}
    if learned:
        opts.pop("temperature", None)
    for reduction in ("mean", "none"):
        check_against_reference(backend, q, t, n, torch.float64, reduction=reduction, **learned, **opts)


@pytest.mark.parametrize("k", [0, 1, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("bd", [(1, 3), (7, 100), (129, 257)], ids=lambda bd: f"B{bd[0]}-D{bd[1]}")
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_odd_sizes_float32(backend, bd, k):
    b, d = bd
    q, t, n = matryoshka_inputs(b, d, k, seed=b * 1000 + d * 10 + k)
    # No 1-dim prefix: its normalised embeddings are ±1 and its true gradient 0, which the folded radial
    # term reaches only up to float32 cancellation (about 8x PyTorch's own error there).
    dims = {"matryoshka_dims": tuple(sorted({2, max(2, d // 3), d}))}
    check_against_reference(backend, q, t, n, torch.float32, **OPTION_SETS["everything"], **dims)
    check_against_reference(backend, q, t, n, torch.float32, reduction="none", **dims)


@pytest.mark.parametrize("options", ["plain", "llave", "unime"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dtypes(backend, dtype, options):
    """16-bit inputs: loss and every gradient within 2× PyTorch's own error (check_against_reference)."""
    q, t, n = matryoshka_inputs(33, 64, 1, seed=7)
    dims = {"matryoshka_dims": (16, 32, 64), "matryoshka_weights": (1.0, 0.5, 0.25)}
    check_against_reference(backend, q, t, n, dtype, **OPTION_SETS[options], **dims)
    check_against_reference(backend, q, t, n, dtype, reduction="none", **OPTION_SETS[options], **dims)


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_many_chunks(backend, options, monkeypatch):
    """A tiny scratch budget: chunks of one or a few rows, each with its own prefix norms."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 4096)
    q, t, n = matryoshka_inputs(129, 16, 1, seed=9)
    check_against_reference(backend, q, t, n, torch.float64, matryoshka_dims=(3, 8, 16), **OPTION_SETS[options])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_negatives_not_per_query_and_weight_gradient(backend):
    q, t, n = matryoshka_inputs(7, 33, 0, seed=3, m=5)
    dims = DIMS["short_of_D"]
    check_against_reference(backend, q, t, n, torch.float64, **OPTION_SETS["everything"], **dims)
    for reduction in ("mean", "sum", "none"):
        grads = []
        for be in (backend, "reference"):
            weight = torch.linspace(0.5, 1.5, 7, dtype=torch.float64).requires_grad_()
            loss = mmfast.contrastive_loss(q, t, n, weight=weight, reduction=reduction, backend=be, hardness=2.0,
                                           matryoshka_dims=(4, 33), matryoshka_weights=(2.0, 0.5))  # fmt: skip
            loss.backward(torch.linspace(1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape))
            grads.append(weight.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_reduction_none_logs_each_dimension(backend):
    """ "none" is [m, B]: row k is the loss at d_k, and the weighted sum of the row means is "mean"."""
    q, t, n = matryoshka_inputs(11, 37, 2, seed=5)
    opts = dict(DIMS["weighted"], hardness=3.0, backend=backend)
    rows = mmfast.contrastive_loss(q, t, n, reduction="none", **opts)
    assert rows.shape == (3, 11)
    for k, d in enumerate(opts["matryoshka_dims"]):
        alone = mmfast.contrastive_loss(*(torch.nn.functional.normalize(x[..., :d], dim=-1) for x in (q, t, n)),
                                        reduction="none", hardness=3.0, backend=backend)  # fmt: skip
        torch.testing.assert_close(rows[k], alone, rtol=1e-12, atol=1e-12)
    mean = mmfast.contrastive_loss(q, t, n, **opts)
    torch.testing.assert_close(mean, (rows.mean(1) * torch.tensor(opts["matryoshka_weights"]).double()).sum())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_no_grad_does_no_gradient_work(backend, monkeypatch):
    q, t, n = (x.requires_grad_() for x in matryoshka_inputs(9, 20, 2, seed=4))
    expected = mmfast.contrastive_loss(q, t, n, matryoshka_dims=(4, 20), backend="reference")
    kernels = contrastive_kernels(backend)

    def forbidden(*args, **kwargs):
        raise AssertionError("gradient kernels ran under torch.no_grad")

    monkeypatch.setattr(type(kernels), "dense_grads", forbidden)
    with torch.no_grad():
        loss = mmfast.contrastive_loss(q, t, n, matryoshka_dims=(4, 20), backend=backend)
    torch.testing.assert_close(loss, expected)


def test_module_and_second_backward():
    q, t, n = (x.requires_grad_() for x in matryoshka_inputs(7, 10, 1, seed=12))
    module = mmfast.ContrastiveLoss(matryoshka_dims=[3, 10], matryoshka_weights=[1, 2], backend="cpu")
    assert module.options.matryoshka_dims == (3, 10) and "matryoshka_dims=(3, 10)" in repr(module)
    loss = module(q, t, n)
    first = torch.autograd.grad(loss, (q, t, n), retain_graph=True)
    second = torch.autograd.grad(loss, (q, t, n))  # recomputes: the fused gradients were taken
    expected = mmfast.contrastive_loss(q, t, n, matryoshka_dims=(3, 10), matryoshka_weights=(1, 2), backend="reference")
    truth = torch.autograd.grad(expected, (q, t, n))
    for a, b, r in zip(first, second, truth, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"matryoshka_dims": (8, 4)}, "strictly increasing"),
        ({"matryoshka_dims": (4, 4)}, "strictly increasing"),
        ({"matryoshka_dims": ()}, "at least one"),
        ({"matryoshka_dims": (0, 4)}, "matryoshka_dims must be >= 1"),
        ({"matryoshka_dims": (4, 11)}, "exceeds the embedding dimension D = 10"),
        ({"matryoshka_dims": (4, 8), "matryoshka_weights": (1.0,)}, "1 entries but matryoshka_dims has 2"),
        ({"matryoshka_dims": (4, 8), "matryoshka_weights": (1.0, float("nan"))}, "matryoshka_weights must be"),
        ({"matryoshka_weights": (1.0,)}, "needs matryoshka_dims"),
    ],
)
def test_bad_options_name_the_argument(options, message):
    q, t, _ = make_inputs(3, 10, 0, seed=0)
    with pytest.raises(ValueError, match=message):
        mmfast.contrastive_loss(q, t, **options)


@pytest.mark.parametrize("bad", ["64", 64, torch.tensor([4, 8]), (4.5, 8)])
def test_bad_dims_type(bad):
    with pytest.raises(TypeError, match="matryoshka_dims"):
        mmfast.ContrastiveLossOptions(matryoshka_dims=bad)


class _KernelLaunches:
    """Stands in for kernels/contrastive_loss_matryoshka.py's kernel: records each launch's variant
    (its constexprs), then launches the real one."""

    FLAGS = ("M_PAD", "BLOCK_N", "HAS_MARGIN", "HAS_GRAD", "HAS_IDS")

    def __init__(self, kernel):
        self.kernel, self.variants = kernel, set()

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.variants.add(tuple(kwargs[flag] for flag in self.FLAGS))
            return launch(*args, **kwargs)

        return record


def record_matryoshka_launches(monkeypatch, *, generic_allowed: bool) -> _KernelLaunches:
    """Wraps the Triton Matryoshka kernel; without `generic_allowed` the torch-ops rows fail the test."""
    from mmfast.backends import contrastive_matryoshka
    from mmfast.kernels import contrastive_loss_matryoshka

    launches = _KernelLaunches(contrastive_loss_matryoshka.matryoshka_rows_kernel)
    monkeypatch.setattr(contrastive_loss_matryoshka, "matryoshka_rows_kernel", launches)
    if not generic_allowed:

        def bypassed(*args, **kwargs):
            raise AssertionError("the dense Matryoshka rows took the generic torch-ops path, not the Triton kernel")

        monkeypatch.setattr(contrastive_matryoshka, "generic_matryoshka_rows", bypassed)
    return launches


# Every option of the dense rows at once (no top-k: that selection stays generic).
DENSE_EVERYTHING = {"hardness": 4.0, "false_negative_margin": 0.05, "symmetric": True}
PREFIX_CASES = {
    "m3": ((5, 16, 37), (0.5, 2.0, 1.0)),  # M_PAD 8
    "m12": (tuple(range(3, 37, 3)), tuple(0.25 * k for k in range(1, 13))),  # M_PAD 16
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("prefixes", PREFIX_CASES)
def test_triton_dense_rows_run_the_matryoshka_kernel(prefixes, dtype, monkeypatch):
    """The triton backend's dense rows go through kernels/contrastive_loss_matryoshka.py (never the
    generic torch ops), at both prefix widths, with margin, hardness, both directions' ids, a learned
    temperature, per-sample weights and every reduction; its candidates span several column tiles."""
    launches = record_matryoshka_launches(monkeypatch, generic_allowed=False)
    dims, weights = PREFIX_CASES[prefixes]
    q, t, n = matryoshka_inputs(13, 37, 9, seed=31, peaky=True)  # 130 candidates
    candidate_ids, query_ids = make_ids(13, 117, seed=32)
    opts = with_ids(DENSE_EVERYTHING, candidate_ids, query_ids)
    weight = torch.rand(13, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        check_against_reference("triton", q, t, n, dtype, weight=weight, reduction=reduction, learned_temperature=0.07,
                                matryoshka_dims=dims, matryoshka_weights=weights, **opts)  # fmt: skip
    with torch.no_grad():
        mmfast.contrastive_loss(q.to(dtype), t.to(dtype), n.to(dtype), matryoshka_dims=dims, backend="triton",
                                temperature=0.05, **opts)  # fmt: skip
    width = 8 if len(dims) <= 8 else 16
    assert {(m_pad, margin, ids) for m_pad, _, margin, _, ids in launches.variants} == {(width, True, True)}
    assert {grad for *_, grad, _ in launches.variants} == {False, True}
    assert max(block_n for _, block_n, *_ in launches.variants) < 130  # several column tiles per row


def test_triton_topk_and_many_prefixes_take_the_generic_rows(monkeypatch):
    """Top-k rows and more than 16 prefixes are not the kernel's: it does not launch, the loss is right."""
    launches = record_matryoshka_launches(monkeypatch, generic_allowed=True)
    q, t, n = matryoshka_inputs(7, 37, 2, seed=33)
    check_against_reference("triton", q, t, n, torch.float64, matryoshka_dims=tuple(range(2, 37, 2)), hardness=2.0)
    check_against_reference("triton", q, t, n, torch.float64, matryoshka_dims=(5, 37), topk=3)
    assert not launches.variants


class _GivenEmbeddings(torch.nn.Module):
    """A stand-in for a SentenceTransformer whose "forward" returns the embeddings its features carry:
    sentence-transformers' losses then run on exactly the tensors mmfast gets."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, features):
        return {"sentence_embedding": features["embeddings"]}

    def _get_untruncated_embedding_dimension(self) -> int:
        return self.dim

    def get_embedding_dimension(self) -> int:
        return self.dim


# (mmfast options, MultipleNegativesRankingLoss options) that compute the same loss.
PEER_CASES = {
    "plain": ({}, {}),
    "hardness": ({"hardness": 3.0}, {"hardness_mode": "all_negatives", "hardness_strength": 3.0}),
    "symmetric": (
        {"symmetric": True},
        {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    ),
}


# sentence-transformers' doc_to_query half takes no hard negatives, so the symmetric case is compared at K = 0.
PEER_PAIRS = [(case, k) for case in PEER_CASES for k in (0, 2) if not (case == "symmetric" and k)]


@pytest.mark.parametrize(("case", "k"), PEER_PAIRS, ids=[f"{case}-K{k}" for case, k in PEER_PAIRS])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_agrees_with_sentence_transformers_matryoshka_loss(backend, case, k):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from sentence_transformers.base.losses import column_merging_disabled

    ours_options, theirs_options = PEER_CASES[case]
    q, t, n = matryoshka_inputs(13, 48, k, seed=21)
    dims, weights = (8, 24, 48), (1.0, 0.5, 2.0)
    temperature = 0.05
    model = _GivenEmbeddings(48)
    mnrl = st_losses.MultipleNegativesRankingLoss(model, scale=1 / temperature, **theirs_options)
    matryoshka = st_losses.MatryoshkaLoss(model, mnrl, list(dims), list(weights))
    leaves = [x.clone().requires_grad_() for x in (q, t, n) if x is not None]
    columns = leaves[:2] + ([] if n is None else [c for c in leaves[2].unbind(1)])  # ST: one column per negative
    with column_merging_disabled():
        theirs = matryoshka([{"embeddings": c} for c in columns], None)
    their_grads = torch.autograd.grad(theirs, leaves)
    # ST lays the candidates out column by column: all first negatives, then all second ones.
    negatives = None if n is None else leaves[2].detach().transpose(0, 1).reshape(-1, 48)
    ours_leaves = [x.detach().clone().requires_grad_() for x in (q, t)] + (
        [] if negatives is None else [negatives.clone().requires_grad_()]
    )
    ours = mmfast.contrastive_loss(*ours_leaves, temperature=temperature, matryoshka_dims=dims,
                                   matryoshka_weights=weights, backend=backend, **ours_options)  # fmt: skip
    our_grads = torch.autograd.grad(ours, ours_leaves)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(our_grads[0], their_grads[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(our_grads[1], their_grads[1], rtol=1e-9, atol=1e-11)
    if n is not None:
        theirs_negatives = their_grads[2].transpose(0, 1).reshape(-1, 48)
        torch.testing.assert_close(our_grads[2], theirs_negatives, rtol=1e-9, atol=1e-11)

"""mmfast.late_interaction_loss against the float64 reference, on every backend.

Two regimes, as for similarity_topk:
- exact: small-integer token vectors, whose token scores every dtype and summation order computes
  exactly and which tie a lot: the scores, the arg-max (ties to the lower document token) and the
  gradients must equal the reference's bit for bit;
- rounding: random unit token vectors against the float64 reference on the same rounded inputs, within
  tests/helpers.assert_within_torch_error. Their maxima are far apart, so no arg-max flips.
"""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.reference import late_interaction_loss_reference
from tests.helpers import BACKENDS, assert_within_torch_error, unit_rows

LOSSES = ["infonce", "pairwise"]
# The Triton forward's numerics run under the interpreter in fp32 and fp16 (its bf16 tl.dot is wrong
# there); float64 takes the torch loop on every backend that lacks it.
DTYPES = {"torch": [torch.float32, torch.bfloat16, torch.float16, torch.float64]}
DTYPES["cpu"] = DTYPES["torch"]
DTYPES["triton"] = [torch.float32, torch.float16, torch.float64]
CASES = [(b, d) for b in BACKENDS for d in DTYPES[b]]
CASE_IDS = [f"{b}-{str(d)[6:]}" for b, d in CASES]


def masks(rows: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Random masks whose row 0 keeps one token (the last) and row 1 every token."""
    mask = torch.rand(rows, tokens, generator=generator) > 0.4
    mask[:, tokens // 2] = True
    mask[0] = False
    mask[0, -1] = True
    if rows > 1:
        mask[1] = True
    return mask


def make_inputs(b, lq, ld, d, m, ln, seed, *, integer=False):
    g = torch.Generator().manual_seed(seed)

    def tokens(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=g).double()
        return unit_rows(*shape, generator=g)

    inputs = {"query": tokens(b, lq, d), "document": tokens(b, ld, d), "negatives": tokens(m, ln, d) if m else None}
    inputs["query_mask"] = masks(b, lq, g).int()  # an integer mask: nonzero = real
    inputs["document_mask"] = masks(b, ld, g)
    inputs["negative_mask"] = masks(m, ln, g) if m else None
    return inputs


def run(backend, inputs, dtype, seed=0, **options):
    """Loss and gradients of the token tensors (query, document[, negatives]) in `dtype`."""
    leaves = {k: inputs[k].detach().to(dtype).requires_grad_() for k in ("query", "document", "negatives")
              if inputs[k] is not None}  # fmt: skip
    masks_ = {k: inputs[k] for k in ("query_mask", "document_mask", "negative_mask")}
    loss = mmfast.late_interaction_loss(leaves["query"], leaves["document"], leaves.get("negatives"), **masks_,
                                        backend=backend, **options)  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) + 0.5
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_out)
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def check_against_reference(backend, inputs, dtype, **options):
    ours = run(backend, inputs, dtype, **options)
    rounded = {k: v.to(dtype).double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    truth = run("reference", rounded, torch.float64, **options)
    own = run("reference", rounded, dtype, **options)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_torch_error("loss", ours[0], truth[0], own[0])
    for name in truth[1]:
        assert ours[1][name].dtype == dtype and ours[1][name].shape == truth[1][name].shape
        assert_within_torch_error(f"grad {name}", ours[1][name], truth[1][name], own[1][name])


@pytest.mark.parametrize("negatives", [0, 6], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=CASE_IDS)
def test_matches_reference_odd_sizes(backend, dtype, loss, normalize, negatives):
    inputs = make_inputs(5, 7, 11, 9, negatives, 13, seed=negatives + 3 * normalize)
    check_against_reference(backend, inputs, dtype, loss=loss, normalize_scores=normalize, temperature=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_duplicate_ids(backend, reduction):
    inputs = make_inputs(6, 5, 9, 8, 4, 9, seed=11)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 7, 3, 9])  # candidate 6 duplicates row 0's positive, 8 row 3's
    for loss in LOSSES:
        check_against_reference(backend, inputs, torch.float32, loss=loss, reduction=reduction, candidate_ids=ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_tiles_match_one_tile(backend, monkeypatch):
    """A score budget of a few pairs forces many (query, document) tiles per piece."""
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 4 * 7 * 11 * 3)
    inputs = make_inputs(9, 7, 11, 6, 5, 11, seed=5)
    check_against_reference(backend, inputs, torch.float32, loss="infonce", temperature=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_go_to_the_lower_token(backend):
    """Integer tokens with every document token duplicated: the scores, the stored arg-max and the
    gradients are exact, and each arg-max is the first maximal real token."""
    inputs = make_inputs(4, 5, 6, 3, 3, 6, seed=2, integer=True)
    inputs["document"] = torch.cat([inputs["document"], inputs["document"]], dim=1)  # token s == token s + 6
    inputs["document_mask"] = torch.cat([inputs["document_mask"]] * 2, dim=1)
    q, dm = inputs["query"].float(), inputs["document_mask"]
    scores, argmax = torch.ops.mmfast.late_interaction_scores(
        q, inputs["query_mask"] != 0, inputs["document"].float(), dm, None, None, backend
    )
    tokens = torch.einsum("bqd,nsd->bqns", inputs["query"], inputs["document"]).masked_fill(~dm[None, None], -1e9)
    best, first = tokens.max(dim=3)
    real = inputs["query_mask"][:, :, None] != 0
    assert torch.equal(argmax.long(), first.masked_fill(~real, 0))
    assert torch.equal(scores.double(), (best * real).sum(dim=1))
    assert (argmax < 6).all()  # never the later copy
    ours, truth = run(backend, inputs, torch.float32), run("reference", inputs, torch.float64)
    for name in truth[1]:
        torch.testing.assert_close(ours[1][name].double(), truth[1][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("dtype", "loss"), [(torch.float32, "infonce"), (torch.float16, "pairwise")],
                         ids=["float32-infonce", "float16-pairwise-normalized"])  # fmt: skip
def test_triton_backward_runs_its_kernels(dtype, loss, monkeypatch):
    """The Triton backward's own kernels (the torch fallback would raise), in blocks of 8 rows and 8
    dims (D = 11: a partial second block): dD segments longer than a step of winners (document 0 keeps
    one token, which every real query token picks; padding query tokens leave theirs out), hard
    negatives, and the pairs' sort in chunks of two documents (a small score budget)."""
    from mmfast.backends.late_interaction_loss import SORT_BYTES_PER_PAIR, TorchLateInteractionKernels
    from mmfast.kernels import late_interaction_loss_grads as grads

    def no_fallback(*args):
        raise AssertionError("the Triton backward fell back to the torch kernels")

    monkeypatch.setattr(TorchLateInteractionKernels, "grads", no_fallback)
    monkeypatch.setattr(grads, "GRAD_QUERY_CONFIG", grads.GradConfig(8, 8, 4, 2))
    monkeypatch.setattr(grads, "GRAD_DOCUMENTS_CONFIG", grads.GradConfig(8, 8, 4, 2))
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 2 * 5 * 7 * SORT_BYTES_PER_PAIR)
    inputs = make_inputs(5, 7, 9, 11, 3, 5, seed=13)
    assert (inputs["query_mask"] != 0).sum() > 2 * 8  # three steps on document 0's token
    inputs["document_mask"][0] = False
    inputs["document_mask"][0, 4] = True
    check_against_reference("triton", inputs, dtype, loss=loss, normalize_scores=loss == "pairwise")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend):
    inputs = make_inputs(3, 4, 5, 3, 2, 3, seed=4)
    leaves = [inputs[k].clone().requires_grad_() for k in ("query", "document", "negatives")]

    def f(q, d, n):
        return mmfast.late_interaction_loss(q, d, n, query_mask=inputs["query_mask"], document_mask=inputs[
            "document_mask"], negative_mask=inputs["negative_mask"], backend=backend, temperature=0.5,
            normalize_scores=True)  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_temperature_gets_its_gradient(backend):
    inputs = make_inputs(4, 3, 5, 4, 0, 0, seed=8)
    grads = []
    for be in (backend, "reference"):
        tau = torch.tensor(0.3, requires_grad=True)
        loss = mmfast.late_interaction_loss(inputs["query"].float(), inputs["document"].float(), temperature=tau,
                                            backend=be)  # fmt: skip
        grads.append(torch.autograd.grad(loss, tau)[0])
    torch.testing.assert_close(grads[0], grads[1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("loss", LOSSES)
def test_negatives_without_rows_are_no_negatives(backend, loss):
    """[0, L, D] negatives (a rank with none while others have some: every rank then gathers them) give the
    loss and gradients of no negatives, bit for bit, and an empty gradient of their own."""
    inputs = make_inputs(3, 4, 5, 6, 0, 0, seed=11)
    empty = torch.zeros(0, 7, 6, dtype=torch.float64, requires_grad=True)
    leaves = [inputs[k].clone().requires_grad_() for k in ("query", "document")]
    options = dict(query_mask=inputs["query_mask"], document_mask=inputs["document_mask"], loss=loss,
                   temperature=0.5, backend=backend)  # fmt: skip
    without = mmfast.late_interaction_loss(*leaves, **options)
    grads = torch.autograd.grad(without, leaves)
    with_empty = mmfast.late_interaction_loss(*leaves, empty, negative_mask=torch.ones(0, 7, dtype=torch.bool),
                                              **options)  # fmt: skip
    empty_grads = torch.autograd.grad(with_empty, [*leaves, empty], allow_unused=True)
    assert torch.equal(with_empty, without)
    assert all(torch.equal(a, b) for a, b in zip(empty_grads[:2], grads, strict=True))
    assert empty_grads[2] is None or empty_grads[2].shape == (0, 7, 6)
    with pytest.raises(ValueError, match="negatives has an empty dimension.*tokens and D must be >= 1"):
        mmfast.late_interaction_loss(*leaves, torch.zeros(0, 0, 6, dtype=torch.float64), **options)


def test_module_and_no_grad():
    inputs = make_inputs(3, 4, 5, 6, 0, 0, seed=9)
    criterion = mmfast.LateInteractionLoss(loss="pairwise", temperature=1.0, normalize_scores=True)
    with torch.no_grad():
        value = criterion(inputs["query"], inputs["document"], query_mask=inputs["query_mask"])
    expected = late_interaction_loss_reference(inputs["query"], inputs["document"], query_mask=inputs["query_mask"],
                                               loss="pairwise", temperature=1.0, normalize_scores=True)  # fmt: skip
    torch.testing.assert_close(value, expected)
    assert "pairwise" in repr(criterion)


def test_custom_ops_pass_opcheck():
    inputs = make_inputs(3, 4, 5, 6, 2, 3, seed=1)
    q, d, n = (inputs[k].float() for k in ("query", "document", "negatives"))
    qm, dm, nm = inputs["query_mask"] != 0, inputs["document_mask"], inputs["negative_mask"]
    torch.library.opcheck(torch.ops.mmfast.late_interaction_scores.default, (q, qm, d, dm, n, nm, "cpu"))
    scores, argmax = torch.ops.mmfast.late_interaction_scores(q, qm, d, dm, n, nm, "cpu")
    grad = torch.rand_like(scores)
    args = (grad, q, qm, d, dm, n, nm, argmax, "cpu", [True, True, True])
    torch.library.opcheck(torch.ops.mmfast.late_interaction_grads.default, args)


def test_torch_compile_traces_without_graph_breaks():
    inputs = make_inputs(3, 4, 5, 6, 0, 0, seed=6)
    q = inputs["query"].float().requires_grad_()

    def step(q):
        return mmfast.late_interaction_loss(q, inputs["document"].float(), backend="cpu", temperature=0.2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(compiled, step(q))
    torch.testing.assert_close(torch.autograd.grad(compiled, q)[0], torch.autograd.grad(step(q), q)[0])


def _error_cases():
    q, d = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    empty_row = torch.ones(2, 5, dtype=torch.bool)
    empty_row[1] = False
    return [
        ("query not a tensor", dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
        ("query 2-D", dict(query=torch.randn(2, 4)), ValueError, "query must be 3-D"),
        ("document D", dict(document=torch.randn(2, 5, 3)), ValueError, "document must have query's D = 4"),
        ("document B", dict(document=torch.randn(3, 5, 4)), ValueError, "document must have one row per query"),
        ("document dtype", dict(document=d.double()), TypeError, "document has dtype torch.float64"),
        ("int query", dict(query=q.int(), document=d.int()), TypeError, "query must be float32"),
        ("negatives D", dict(negatives=torch.randn(3, 5, 2)), ValueError, "negatives must have query's D = 4"),
        ("empty tokens", dict(query=torch.randn(2, 0, 4)), ValueError, "query has an empty dimension"),
        ("mask shape", dict(document_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "document_mask must have"),
        ("float mask", dict(query_mask=torch.ones(2, 3)), TypeError, "query_mask must be a bool or integer"),
        ("empty row", dict(document_mask=empty_row), ValueError, "document_mask row 1 has no real token"),
        ("lonely mask", dict(negative_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "negative_mask was given"),
        ("loss", dict(loss="triplet"), ValueError, "loss must be one of"),
        ("temperature", dict(temperature=0.0), ValueError, "temperature must be a positive"),
        ("normalize", dict(normalize_scores=1), TypeError, "normalize_scores must be a bool"),
        ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
        ("backend", dict(backend="gpu"), ValueError, "backend must be one of"),
        ("ids", dict(candidate_ids=torch.arange(3)), ValueError, r"candidate_ids must have shape \[2\]"),
    ]


@pytest.mark.parametrize(("case", "override", "error", "message"), _error_cases(), ids=[c[0] for c in _error_cases()])
def test_bad_input_names_the_argument(case, override, error, message):
    args = dict(query=torch.randn(2, 3, 4), document=torch.randn(2, 5, 4), negatives=None)
    args.update(override)
    with pytest.raises(error, match=message):
        mmfast.late_interaction_loss(args.pop("query"), args.pop("document"), args.pop("negatives"), **args)


def test_cpu_kernel_refuses_bad_tensors():
    ext = mmfast.backends.late_interaction_loss.load_extension()
    tile, bias, mask = torch.zeros(6, 10), torch.zeros(10), torch.ones(6)
    with pytest.raises(RuntimeError, match="tile .* must hold whole queries"):
        ext.late_interaction_maxsim(tile, bias, mask, torch.zeros(4, 2), torch.zeros(6, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="argmax must be"):
        ext.late_interaction_maxsim(tile, bias, mask, torch.zeros(2, 2), torch.zeros(6, 2, dtype=torch.int64))
    argmax = torch.full((6, 2), 7, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="argmax entries must be document token indices"):
        ext.late_interaction_grads(torch.zeros(2, 2), torch.zeros(6, 3), mask, torch.zeros(10, 3), argmax, 5,
                                   torch.zeros(6, 3), None)  # fmt: skip


# cross_device: two gloo processes with batches of 3 and 2 (and 2 and 1 negatives) against one process
# over the global batch: each rank's loss, and each rank's slice of the gradient of the sum of the losses.
RANK_SIZES, RANK_NEGATIVES = (3, 2), (2, 1)


def _global_inputs() -> dict:
    return make_inputs(sum(RANK_SIZES), 4, 6, 5, sum(RANK_NEGATIVES), 6, seed=21)


def _rank_slices(rank: int) -> tuple[slice, slice]:
    first, first_negative = sum(RANK_SIZES[:rank]), sum(RANK_NEGATIVES[:rank])
    return slice(first, first + RANK_SIZES[rank]), slice(first_negative, first_negative + RANK_NEGATIVES[rank])


def _cross_device_worker(rank: int, init_file: str, out_file: str, backend: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        inputs, (rows, negatives) = _global_inputs(), _rank_slices(rank)
        local = {k: inputs[k][negatives if k.startswith("negative") else rows] for k in inputs}
        leaves = [local[k].float().requires_grad_() for k in ("query", "document", "negatives")]
        loss = mmfast.late_interaction_loss(*leaves, query_mask=local["query_mask"], document_mask=local[
            "document_mask"], negative_mask=local["negative_mask"], backend=backend, temperature=0.1,
            cross_device=True, candidate_ids=torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])[
                [*range(5)][rows] + [5 + i for i in range(3)][negatives]])  # fmt: skip
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [leaf.grad for leaf in leaves]}, f"{out_file}{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cross_device_matches_one_process(backend, tmp_path):
    torch.multiprocessing.spawn(_cross_device_worker, args=(str(tmp_path / "init"), str(tmp_path / "rank"), backend),
                                nprocs=2)  # fmt: skip
    inputs = _global_inputs()
    leaves = {k: inputs[k].float().requires_grad_() for k in ("query", "document", "negatives")}
    ids = torch.tensor([0, 1, 2, 3, 4, 1, 5, 6])
    total = 0
    for rank in range(2):
        rows = _rank_slices(rank)[0]
        expected = late_interaction_loss_reference(
            leaves["query"][rows], leaves["document"], leaves["negatives"], query_mask=inputs["query_mask"][rows],
            document_mask=inputs["document_mask"], negative_mask=inputs["negative_mask"], temperature=0.1,
            candidate_ids=ids, positive_offset=rows.start,
        )  # fmt: skip
        got = torch.load(tmp_path / f"rank{rank}")
        torch.testing.assert_close(got["loss"], expected.detach())
        total = total + expected
    grads = torch.autograd.grad(total, list(leaves.values()))
    for rank in range(2):
        rows, negatives = _rank_slices(rank)
        got = torch.load(tmp_path / f"rank{rank}")["grads"]
        for name, mine, whole in zip(leaves, got, grads, strict=True):
            torch.testing.assert_close(mine, whole[negatives if name == "negatives" else rows], msg=name)

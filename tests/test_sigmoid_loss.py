"""mmfast.sigmoid_loss against the float64 reference on every backend, and against open_clip's SigLipLoss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.reference import sigmoid_loss_reference
from tests.helpers import BACKENDS, assert_within_torch_error, unit_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_losses  # noqa: E402

GRAD_NAMES = ("query", "target", "negatives", "logit_scale", "logit_bias")


def make_inputs(b, d, k, seed, *, m=None, correlated=True):
    """query, target [B, D] and negatives ([B, K, D], or [M, D] when m is given; None for K = 0)."""
    g = torch.Generator().manual_seed(seed)
    q, t = unit_rows(b, d, generator=g), unit_rows(b, d, generator=g)
    if correlated:  # positives that stand out, as a trained model's do
        t = torch.nn.functional.normalize(t + 1.5 * q, dim=1)
    if m is not None:
        return q, t, unit_rows(m, d, generator=g)
    return q, t, (unit_rows(b, k, d, generator=g) if k else None)


def duplicate_ids(b, n_candidates, seed):
    """Ids with copies: some targets share an id, and some negatives copy a target's id."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(2, (b + n_candidates) // 3), (n_candidates,), generator=g)


def run(backend, inputs, dtype, *, scale=10.0, bias=-10.0, tensor_parameters=False, grad_seed=3, **options):
    """The loss and the gradients of (query, target, negatives, logit_scale, logit_bias); None for
    an input that is absent or a parameter given as a number."""
    q, t, n = (None if x is None else x.to(dtype).requires_grad_() for x in inputs)
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if tensor_parameters:
        scale = torch.tensor(scale, dtype=parameter_dtype, requires_grad=True)
        bias = torch.tensor(bias, dtype=parameter_dtype, requires_grad=True)
    fn = sigmoid_loss_reference if backend == "reference" else mmfast.sigmoid_loss
    extra = {} if backend == "reference" else {"backend": backend}
    loss = fn(q, t, n, logit_scale=scale, logit_bias=bias, **extra, **options)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64) + 0.5
    leaves = [x for x in (q, t, n, scale, bias) if isinstance(x, torch.Tensor)]
    grads = iter(torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype)))
    return loss.detach(), [next(grads) if isinstance(x, torch.Tensor) else None for x in (q, t, n, scale, bias)]


def check(backend, inputs, dtype, **options):
    ours = run(backend, inputs, dtype, **options)
    rounded = [None if x is None else x.to(dtype).double() for x in inputs]
    truth = run("reference", rounded, torch.float64, **options)
    own = run("reference", inputs, dtype, **options)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_torch_error("loss", ours[0], truth[0], own[0])
    for name, a, r, o in zip(GRAD_NAMES, ours[1], truth[1], own[1], strict=True):
        assert (a is None) == (r is None), name
        if a is not None:
            assert a.dtype == o.dtype, name
            assert_within_torch_error(f"grad {name}", a, r, o)


PARAMETERS = {"siglip-init": {}, "trained": {"scale": 30.0, "bias": -3.0}, "unit": {"scale": 1.0, "bias": 0.5}}


@pytest.mark.parametrize("tensor_parameters", [False, True], ids=["numbers", "tensors"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "ids"])
@pytest.mark.parametrize("negatives", ["none", "per-query", "shared"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_float64(backend, reduction, negatives, with_ids, tensor_parameters):
    inputs = make_inputs(7, 12, 2, seed=1, m=5 if negatives == "shared" else None)
    if negatives == "none":
        inputs = (*inputs[:2], None)
    n_candidates = 7 + (0 if inputs[2] is None else inputs[2].reshape(-1, 12).shape[0])
    ids = duplicate_ids(7, n_candidates, seed=2) if with_ids else None
    weight = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    for parameters in PARAMETERS.values():
        check(backend, inputs, torch.float64, reduction=reduction, candidate_ids=ids, weight=weight,
              tensor_parameters=tensor_parameters, **parameters)  # fmt: skip


@pytest.mark.parametrize("d", [3, 100, 257], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("b", [1, 7, 129], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_float32(backend, b, d):
    """N = 4B candidates: rows whose length is no multiple of 16, with the positive in every lane."""
    inputs = make_inputs(b, d, 3, seed=b * 1000 + d)
    ids = duplicate_ids(b, 4 * b, seed=b + d)
    check(backend, inputs, torch.float32, tensor_parameters=True, candidate_ids=ids)
    check(backend, inputs, torch.float32, reduction="none", **PARAMETERS["trained"])


# Every backend in every 16/32-bit dtype, except Triton in bf16: the interpreter's bf16 dot is wrong
# (Triton's bf16 variants are compiled by tests/test_compile.py).
DTYPE_CASES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16)
               if not (b == "triton" and d == torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize(("backend", "dtype"), DTYPE_CASES, ids=[f"{b}-{d}" for b, d in DTYPE_CASES])
def test_dtypes(backend, dtype):
    inputs = make_inputs(33, 64, 1, seed=7)
    check(backend, inputs, dtype, tensor_parameters=True, candidate_ids=duplicate_ids(33, 66, seed=8))
    check(backend, inputs, dtype, reduction="none", **PARAMETERS["trained"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks(backend, monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 2048)  # a few rows per chunk
    inputs = make_inputs(37, 9, 0, seed=9, m=40)  # N = 77
    check(backend, inputs, torch.float64, tensor_parameters=True, candidate_ids=duplicate_ids(37, 77, seed=10))
    check(backend, inputs, torch.float32, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """|logit| up to 1000: softplus and σ must neither overflow nor lose the linear part."""
    q, t, n = make_inputs(9, 16, 2, seed=11)
    for dtype in (torch.float32, torch.float64):
        check(backend, (q, t, n), dtype, scale=1000.0, bias=3.0, tensor_parameters=True)


def test_a_duplicate_positive_is_a_positive():
    """A negative that copies row 0's target (same id) is labelled +1 for row 0, and for row 0 only."""
    q, t, n = make_inputs(3, 8, 1, seed=12)
    n = n.clone()
    n[1, 0] = t[0]
    ids = torch.tensor([0, 1, 2, 3, 0, 5])  # candidate 4 (row 1's negative) is a copy of target 0
    rows = mmfast.sigmoid_loss(q, t, n, candidate_ids=ids, reduction="none", backend="cpu")
    logits = 10.0 * q @ torch.cat([t, n.reshape(-1, 8)]).T - 10.0
    labels = -torch.ones_like(logits)
    labels[[0, 1, 2], [0, 1, 2]] = 1
    labels[0, 4] = 1  # the copy is a positive of row 0 (whose positive's id is 0), of no other row
    torch.testing.assert_close(rows, -torch.nn.functional.logsigmoid(labels * logits).sum(1), rtol=1e-12, atol=0)
    plain = mmfast.sigmoid_loss(q, t, n, reduction="none", backend="cpu")
    # Relabelling one pair from -1 to +1 changes its term by softplus(-l) - softplus(l) = -l, nothing else.
    torch.testing.assert_close(rows[0] - plain[0], -logits[0, 4], rtol=1e-12, atol=1e-12)
    assert torch.equal(rows[1:], plain[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, reduction):
    q, t, n = (x.clone().requires_grad_() for x in make_inputs(4, 5, 2, seed=13))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    weight = torch.linspace(0.5, 1.5, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 3, 1, 5, 6, 7, 0, 9, 10, 11])

    def loss(q, t, n, scale, bias, weight):
        return mmfast.sigmoid_loss(q, t, n, logit_scale=scale, logit_bias=bias, weight=weight, reduction=reduction,
                                   candidate_ids=ids, backend=backend)  # fmt: skip

    assert torch.autograd.gradcheck(loss, (q, t, n, scale, bias, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_recomputes_the_same_gradients(backend):
    q, t, n = (x.clone().requires_grad_() for x in make_inputs(6, 8, 1, seed=14))
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = mmfast.sigmoid_loss(q, t, n, logit_scale=scale, backend=backend)
    first = torch.autograd.grad(loss, (q, t, n, scale), retain_graph=True)
    second = torch.autograd.grad(loss, (q, t, n, scale))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_subsets_of_gradients(backend):
    q, t, n = make_inputs(6, 8, 2, seed=15)
    with torch.no_grad():
        loss = mmfast.sigmoid_loss(q.requires_grad_(), t, n, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, sigmoid_loss_reference(q.detach(), t, n), rtol=1e-12, atol=0)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    t2 = t.clone().requires_grad_()
    mmfast.sigmoid_loss(q.detach(), t2, n, logit_bias=bias, backend=backend).backward()
    t3, bias3 = t.clone().requires_grad_(), bias.detach().clone().requires_grad_()
    sigmoid_loss_reference(q.detach(), t3, n, logit_bias=bias3).backward()
    torch.testing.assert_close(t2.grad, t3.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(bias.grad, bias3.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_subset_of_inputs_wanting_a_gradient(backend):
    """Each of the 31 non-empty subsets of (query, target, negatives, logit_scale, logit_bias) that
    require grad gets exactly the reference's gradients, and the others none."""
    q, t, n = make_inputs(5, 6, 2, seed=23)
    values = (q, t, n, torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64))
    for mask in range(1, 32):
        wanted = [bool(mask >> i & 1) for i in range(5)]
        ours = [v.clone().requires_grad_(w) for v, w in zip(values, wanted, strict=True)]
        ref = [v.clone().requires_grad_(w) for v, w in zip(values, wanted, strict=True)]
        mmfast.sigmoid_loss(*ours[:3], logit_scale=ours[3], logit_bias=ours[4], backend=backend).backward()
        sigmoid_loss_reference(*ref[:3], logit_scale=ref[3], logit_bias=ref[4]).backward()
        for name, a, r in zip(GRAD_NAMES, ours, ref, strict=True):
            assert (a.grad is None) == (r.grad is None), (name, wanted)
            if r.grad is not None:
                torch.testing.assert_close(a.grad, r.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_empty_negatives_get_an_empty_gradient(backend):
    """[B, 0, D] negatives: the loss of the targets alone, and a gradient of the negatives' shape."""
    q, t, _ = make_inputs(5, 6, 0, seed=24)
    empty = torch.zeros(5, 0, 6, dtype=torch.float64, requires_grad=True)
    loss = mmfast.sigmoid_loss(q, t, empty, backend=backend)
    torch.testing.assert_close(loss, sigmoid_loss_reference(q, t), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss, empty)
    assert grad.shape == (5, 0, 6)


def test_reference_backend_is_the_oracle():
    q, t, n = make_inputs(6, 7, 2, seed=25)
    ids = duplicate_ids(6, 18, seed=26)
    ours = run("reference", (q, t, n), torch.float64, tensor_parameters=True, candidate_ids=ids, reduction="none")
    scale, bias = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (10.0, -10.0))
    leaves = [x.clone().requires_grad_() for x in (q, t, n)]
    rows = mmfast.sigmoid_loss(*leaves, logit_scale=scale, logit_bias=bias, candidate_ids=ids, reduction="none",
                               backend="reference")  # fmt: skip
    grad_out = torch.rand(rows.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    torch.testing.assert_close(rows.detach(), ours[0], rtol=0, atol=0)
    for a, r in zip(torch.autograd.grad(rows, [*leaves, scale, bias], grad_out), ours[1], strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_module_registers_learnable_parameters():
    scale = torch.nn.Parameter(torch.tensor(10.0, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64))
    module = mmfast.SigmoidLoss(logit_scale=scale, logit_bias=bias, reduction="sum")
    assert {name for name, _ in module.named_parameters()} == {"logit_scale", "logit_bias"}
    assert "reduction='sum'" in repr(module)
    q, t, n = make_inputs(5, 8, 1, seed=16)
    module(q, t, n).backward()
    expected_scale = scale.detach().clone().requires_grad_()
    expected_bias = bias.detach().clone().requires_grad_()
    sigmoid_loss_reference(q, t, n, logit_scale=expected_scale, logit_bias=expected_bias, reduction="sum").backward()
    torch.testing.assert_close(scale.grad, expected_scale.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bias.grad, expected_bias.grad, rtol=1e-12, atol=1e-14)


def test_bad_input_names_the_argument():
    q, t, n = make_inputs(4, 8, 2, seed=17)
    cases = [
        (ValueError, "target must have query's shape", dict(target=t[:3])),
        (ValueError, r"negatives \[B, K, D\] must have B = 4", dict(negatives=n[:3])),
        (ValueError, "query must be 2-D", dict(query=q[None])),
        (TypeError, "negatives has dtype torch.float32 but query has torch.float64", dict(negatives=n.float())),
        (ValueError, "logit_scale must be a positive finite number", dict(logit_scale=0.0)),
        (ValueError, "logit_scale must be a positive finite number", dict(logit_scale=torch.tensor(-1.0))),
        (ValueError, "logit_bias must be a finite number", dict(logit_bias=float("inf"))),
        (ValueError, "logit_bias must be a finite number", dict(logit_bias=torch.tensor(float("nan")))),
        (ValueError, "logit_bias must be a number or a 0-d tensor", dict(logit_bias=torch.zeros(2))),
        (TypeError, "logit_bias must be a floating-point tensor", dict(logit_bias=torch.tensor(1))),
        (ValueError, "logit_scale is on meta", dict(logit_scale=torch.tensor(1.0, device="meta"))),
        (ValueError, r"candidate_ids must have shape \[12\]", dict(candidate_ids=torch.arange(4))),
        (TypeError, "candidate_ids must be an integer tensor", dict(candidate_ids=torch.zeros(12))),
        (ValueError, r"weight must have shape \[B\] = \[4\]", dict(weight=torch.ones(3, dtype=torch.float64))),
        (ValueError, "reduction must be one of", dict(reduction="avg")),
        (ValueError, "backend must be one of", dict(backend="gpu")),
        (TypeError, "cross_device must be a bool", dict(cross_device=1)),
        (ValueError, "B >= 1", dict(query=q[:0], target=t[:0], negatives=None)),
    ]
    for error, message, change in cases:
        arguments = dict(query=q, target=t, negatives=n) | change
        with pytest.raises(error, match=message):
            mmfast.sigmoid_loss(arguments.pop("query"), arguments.pop("target"), arguments.pop("negatives"),
                                **arguments)  # fmt: skip
    with pytest.raises(ValueError, match="logit_bias must be a finite number"):
        mmfast.SigmoidLoss(logit_bias=float("nan"))


def test_cpu_kernel_rejects_bad_buffers():
    """The C++ kernel checks what the chunk loop hands it and raises, naming the argument."""
    from mmfast._extension import load_extension

    ext = load_extension()
    scores, loss = torch.zeros(3, 5), torch.zeros(3)
    with pytest.raises(RuntimeError, match="mmfast cpu sigmoid_loss: row_offset 3 \\+ rows 3 exceeds"):
        ext.sigmoid_pair_rows(scores, 3, 1.0, 0.0, None, loss, None, None, None)
    with pytest.raises(RuntimeError, match="mmfast cpu sigmoid_loss: loss must be a contiguous CPU"):
        ext.sigmoid_pair_rows(scores, 0, 1.0, 0.0, None, torch.zeros(2), None, None, None)
    with pytest.raises(RuntimeError, match="mmfast cpu sigmoid_loss: scale_grad needs row_scale"):
        ext.sigmoid_pair_rows(scores, 0, 1.0, 0.0, None, loss, torch.zeros(3), None, None)
    with pytest.raises(RuntimeError, match="mmfast cpu sigmoid_loss: ids must be a contiguous CPU Int"):
        ext.sigmoid_pair_rows(scores, 0, 1.0, 0.0, None, loss, None, None, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="mmfast cpu sigmoid_loss: scores must be float32 or float64"):
        ext.sigmoid_pair_rows(scores.half(), 0, 1.0, 0.0, None, loss, None, None, None)


def test_cross_device_without_a_process_group_warns_once_and_computes_locally():
    import mmfast.distributed as distributed

    distributed._warned.discard("sigmoid_loss")
    q, t, n = make_inputs(5, 8, 1, seed=18)
    with pytest.warns(UserWarning, match="without an initialised torch.distributed process group"):
        loss = mmfast.sigmoid_loss(q, t, n, cross_device=True)
    torch.testing.assert_close(loss, mmfast.sigmoid_loss(q, t, n))


@pytest.mark.no_poison
@pytest.mark.parametrize("with_grads", [True, False], ids=["grads", "loss-only"])
def test_custom_op_passes_opcheck(with_grads):
    q, t, n = make_inputs(7, 5, 1, seed=19)
    query = q.T.contiguous().T  # transposed strides
    row_scale = torch.full((7,), 1 / 7, dtype=torch.float64) if with_grads else None
    ids = duplicate_ids(7, 14, seed=20)
    for scale, bias in ((None, None), (torch.tensor(3.0), torch.tensor(-2.0, dtype=torch.float64))):
        args = (query, t, n.reshape(-1, 5), row_scale, None, scale, bias, 0, 10.0, -10.0, "cpu", [with_grads] * 6, ids)
        torch.library.opcheck(torch.ops.mmfast.sigmoid_loss_rows.default, args)


@pytest.mark.no_poison
def test_torch_compile_without_graph_breaks():
    q, t, n = (x.float() for x in make_inputs(8, 16, 1, seed=21))
    scale = torch.tensor(10.0, requires_grad=True)
    leaves = [q.clone().requires_grad_(), t.clone().requires_grad_()]

    def step(query, target, scale):
        return mmfast.sigmoid_loss(query * 2.0, target, n, logit_scale=scale, backend="cpu") * 3.0

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves, scale)
    eager = [x.clone().detach().requires_grad_() for x in (*leaves, scale)]
    expected = step(*eager)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for a, r in zip((*leaves, scale), eager, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


# open_clip's SigLipLoss, the peer. open_clip_torch requires torchvision, which must never be installed
# here (its compiled ops do not load with this torch and break transformers' imports), so the test
# installs the pinned release without dependencies into a folder of its own (inside the venv, kept
# between runs) and loads only its loss.py, which imports nothing but torch.
OPEN_CLIP = "open_clip_torch==3.3.0"
OPEN_CLIP_DIR = Path(sys.prefix) / "peers" / "open_clip_torch-3.3.0"


@pytest.fixture(scope="session")
def open_clip_loss():
    loss_file = peer_losses.install(OPEN_CLIP_DIR, (OPEN_CLIP,)) / "open_clip" / "loss.py"
    spec = importlib.util.spec_from_file_location("open_clip_loss", loss_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.no_poison
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_open_clip_siglip_loss(open_clip_loss, backend, dtype):
    """The cases both have: B image/text pairs, a learnable scale and bias; and other ranks' B text
    features, which open_clip's cross-device code adds as negative-only B × B blocks and mmfast takes
    as negatives (here two blocks)."""
    q, t, n = (x.to(dtype) for x in make_inputs(13, 24, 0, seed=22, m=26))
    peer = open_clip_loss.SigLipLoss()
    for negatives in (None, n):
        parameters = (torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype))  # float32 for float32 inputs
        inputs = [x.clone().requires_grad_() for x in (q, t, *parameters)]
        expected = peer(*inputs)
        for block in () if negatives is None else negatives.split(13):
            expected = expected + peer._loss(inputs[0], block, inputs[2], inputs[3], negative_only=True)
        ours_inputs = [x.detach().clone().requires_grad_() for x in inputs]
        ours = mmfast.sigmoid_loss(ours_inputs[0], ours_inputs[1], negatives, logit_scale=ours_inputs[2],
                                   logit_bias=ours_inputs[3], backend=backend)  # fmt: skip
        tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
        torch.testing.assert_close(ours, expected.to(ours.dtype), **tolerance)
        expected_grads = torch.autograd.grad(expected, inputs)
        for a, r in zip(torch.autograd.grad(ours, ours_inputs), expected_grads, strict=True):
            torch.testing.assert_close(a, r, **tolerance)

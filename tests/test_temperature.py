"""A learnable temperature: a 0-d tensor τ (contrastive_loss's `temperature`, distillation_loss's
`student_temperature`) gets its gradient on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.reference import distillation_loss_reference
from tests.helpers import CONTRASTIVE_BACKENDS, assert_within_torch_error
from tests.test_contrastive_loss import OPTION_SETS, check_against_reference, make_inputs, temperature_dtype
from tests.test_distillation_loss import make_inputs as distillation_inputs


def temperature_leaf(tau: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(tau, dtype=temperature_dtype(dtype), requires_grad=True)


def check_contrastive(backend, q, t, n, dtype, tau=0.05, **kwargs):
    check_against_reference(backend, q, t, n, dtype, learned_temperature=tau, **kwargs)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_contrastive_temperature_gradient_float64(backend, options, reduction, weighted):
    q, t, n = make_inputs(7, 12, 2, seed=21)
    weight = torch.linspace(0.5, 1.5, 7, dtype=torch.float64) if weighted else None
    options = {k: v for k, v in options.items() if k != "temperature"}
    check_contrastive(backend, q, t, n, torch.float64, 0.07, weight=weight, reduction=reduction, **options)


# Every backend in every 16/32-bit dtype, except Triton in bf16: the interpreter's bf16 dot is wrong
# (Triton's bf16 numerics are proven in fp32/fp16 under the interpreter and compiled by the AOT tests).
DTYPE_CASES = [(b, d) for b in CONTRASTIVE_BACKENDS for d in (torch.float32, torch.float16, torch.bfloat16)
               if not (b == "triton" and d == torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("options", ["plain", "llave", "unime", "everything"])
@pytest.mark.parametrize(
    ("backend", "dtype"), DTYPE_CASES, ids=[f"{b}-{d}" for b, d in DTYPE_CASES], indirect=["backend"]
)
def test_contrastive_temperature_gradient_dtypes(backend, dtype, options):
    q, t, n = make_inputs(33, 40, 1, seed=22, peaky=True)
    options = {k: v for k, v in OPTION_SETS[options].items() if k != "temperature"}
    check_contrastive(backend, q, t, n, dtype, **options)
    check_contrastive(backend, q, t, n, dtype, reduction="none", **options)


@pytest.mark.parametrize("options", ["plain", "everything"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_contrastive_temperature_gradient_across_chunks_and_shared_negatives(backend, options, monkeypatch):
    from mmfast.backends import chunked

    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 2048)  # a few rows per chunk
    q, t, n = make_inputs(37, 9, 0, seed=23, m=40)  # N = 77 candidates: the positive's block of 16 varies
    options = {k: v for k, v in OPTION_SETS[options].items() if k != "temperature"}
    check_contrastive(backend, q, t, n, torch.float64, 0.3, **options)
    check_contrastive(backend, q, t, n, torch.float32, 0.03, **options)


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_contrastive_temperature_finite_difference(backend):
    """dLoss/dτ against a central difference of the loss itself (no reference involved)."""
    q, t, n = make_inputs(9, 10, 2, seed=24)
    options = {"hardness": 4.0, "false_negative_margin": 0.05, "symmetric": True}
    tau = torch.tensor(0.08, dtype=torch.float64, requires_grad=True)
    loss = mmfast.contrastive_loss(q, t, n, temperature=tau, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, tau)
    h = 1e-6
    up, down = (mmfast.contrastive_loss(q, t, n, temperature=0.08 + s, backend=backend, **options) for s in (h, -h))
    torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["reference", *CONTRASTIVE_BACKENDS], indirect=True)
def test_tensor_temperature_without_grad_equals_the_number(backend):
    q, t, n = make_inputs(7, 8, 1, seed=25)
    leaves = [x.clone().requires_grad_() for x in (q, t, n)]
    number = mmfast.contrastive_loss(*leaves, temperature=0.05, topk=2, backend=backend)
    tensor = mmfast.contrastive_loss(*leaves, temperature=torch.tensor(0.05, dtype=torch.float64), topk=2,
                                     backend=backend)  # fmt: skip
    torch.testing.assert_close(tensor, number, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(number, leaves), torch.autograd.grad(tensor, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(mmfast.contrastive_loss(q, t, n, temperature=tau, backend=backend),
                                   mmfast.contrastive_loss(q, t, n, temperature=0.05, backend=backend))  # fmt: skip


@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_only_the_temperature_wants_a_gradient(backend):
    q, t, n = make_inputs(7, 8, 1, seed=26)
    results = []
    for be in (backend, "reference"):
        tau = torch.tensor(0.05, dtype=torch.float32, requires_grad=True)
        loss = mmfast.contrastive_loss(q.float(), t.float(), n.float(), temperature=tau, hardness=2.0, backend=be)
        loss.backward()
        results.append(tau.grad)
    assert results[0].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_clip_style_logit_scale_recipe_learns():
    """The README recipe: τ = 1 / exp(logit_scale) clamped, as open_clip learns it."""
    q, t, n = (x.float() for x in make_inputs(16, 8, 1, seed=27))
    logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    temperature = 1.0 / logit_scale.exp().clamp(max=100.0)
    loss = mmfast.contrastive_loss(q, t, n, temperature=temperature)
    loss.backward()
    expected_scale = torch.tensor(2.0, requires_grad=True)
    mmfast.contrastive_loss(q, t, n, temperature=1.0 / expected_scale.exp(), backend="reference").backward()
    torch.testing.assert_close(logit_scale.grad, expected_scale.grad, rtol=1e-4, atol=1e-6)


def test_module_registers_a_parameter_temperature():
    tau = torch.nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    module = mmfast.ContrastiveLoss(temperature=tau, hardness=2.0)
    assert list(module.parameters()) == [tau] and "temperature" in module.state_dict()
    q, t, n = make_inputs(5, 6, 1, seed=28)
    module(q, t, n).backward()
    expected = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    mmfast.contrastive_loss(q, t, n, temperature=expected, hardness=2.0, backend="reference").backward()
    torch.testing.assert_close(tau.grad, expected.grad)
    student = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    assert list(mmfast.DistillationLoss(student_temperature=student).parameters()) == [student]


@pytest.mark.no_poison  # dynamo would trace the test's patched torch.empty
@pytest.mark.parametrize("options", [{}, {"hardness": 9.0, "symmetric": True, "topk": 3, "reduction": "none"}])
def test_torch_compile_with_a_learnable_temperature(options):
    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)

    def step(q, t, logit_scale):
        return mmfast.contrastive_loss(q, t, temperature=1.0 / logit_scale.exp(), backend="cpu", **options).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [q.clone().requires_grad_(), t.clone().requires_grad_(), torch.tensor(3.0, requires_grad=True)]
        fn(*leaves).backward()
        results.append([x.grad for x in leaves])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def distillation(backend, inputs, dtype, tau, reduction="mean"):
    sq, st, tq, tt = inputs
    temperature = temperature_leaf(tau, dtype)
    leaves = [sq.to(dtype).requires_grad_(), st.to(dtype).requires_grad_()]
    options = dict(student_temperature=temperature, teacher_temperature=0.03, reduction=reduction)
    if backend == "reference":
        loss = distillation_loss_reference(*leaves, tq.to(dtype), tt.to(dtype), **options)
    else:
        loss = mmfast.distillation_loss(*leaves, tq.to(dtype), tt.to(dtype), backend=backend, **options)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad(loss, [temperature, *leaves], grad_out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", CONTRASTIVE_BACKENDS, indirect=True)
def test_distillation_student_temperature_gradient(backend, reduction, dtype):
    inputs = distillation_inputs(19, 12, 7, seed=29)
    ours = distillation(backend, inputs, dtype, 0.06, reduction)
    truth = distillation("reference", [x.to(dtype).double() for x in inputs], torch.float64, 0.06, reduction)
    own = distillation("reference", inputs, dtype, 0.06, reduction)
    assert_within_torch_error("loss", ours[0], truth[0], own[0])
    for name, a, r, o in zip(("student_temperature", "query", "target"), ours[1], truth[1], own[1], strict=True):
        assert_within_torch_error(f"grad {name}", a, r, o)


def good():
    return [torch.randn(4, 8) for _ in range(3)]


@pytest.mark.parametrize(
    "temperature, error, match",
    [
        (torch.tensor([0.05]), ValueError, r"temperature must be a number or a 0-d tensor, got .* shape \(1,\)"),
        (torch.tensor(1), TypeError, "temperature must be a floating-point tensor, got torch.int64"),
        (torch.tensor(0.05, device="meta"), ValueError, "temperature is on meta but the embeddings are on cpu"),
        (torch.tensor(0.0), ValueError, r"temperature must be a positive finite number, got tensor\(0.0\)"),
        (torch.tensor(-0.1), ValueError, "temperature must be a positive finite number"),
        (torch.tensor(float("nan")), ValueError, "temperature must be a positive finite number"),
        (-0.5, ValueError, "temperature must be a positive finite number, got -0.5"),
        ("0.05", TypeError, "temperature must be a real number"),
    ],
)
def test_bad_temperatures_name_the_argument(temperature, error, match):
    with pytest.raises(error, match=match):
        mmfast.contrastive_loss(*good(), temperature=temperature)
    with pytest.raises(error, match="student_" + match):
        q, t, _ = good()
        mmfast.distillation_loss(q, t, q, t, student_temperature=temperature)


def test_a_bad_tensor_temperature_is_caught_under_torch_compile():
    """Compiled code skips the Python-side value check; the CPU op checks the value itself."""
    step = torch.compile(lambda q, t, tau: mmfast.contrastive_loss(q, t, temperature=tau), backend="aot_eager")
    q, t, _ = good()
    torch._dynamo.reset()
    step(q, t, torch.tensor(0.1))
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        step(q, t, torch.tensor(-0.1))

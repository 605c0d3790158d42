"""mmfast.distillation_loss against the float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfast
from mmfast.backends import chunked
from mmfast.reference import distillation_loss_reference
from tests.helpers import BACKENDS, assert_within_torch_error, unit_rows


def make_inputs(b, d_student, d_teacher, seed, *, correlated=True):
    g = torch.Generator().manual_seed(seed)
    sq, st_ = unit_rows(b, d_student, generator=g), unit_rows(b, d_student, generator=g)
    tq, tt = unit_rows(b, d_teacher, generator=g), unit_rows(b, d_teacher, generator=g)
    if correlated:  # a teacher whose positives stand out, as a real one's do
        tt = torch.nn.functional.normalize(tt + 2.0 * torch.cat([tq, tq], dim=1)[:, :d_teacher], dim=1)
    return sq, st_, tq, tt


def run(backend, inputs, dtype, teacher_dtype=None, **options):
    sq, st_, tq, tt = inputs
    teacher_dtype = teacher_dtype or dtype
    leaves = [sq.to(dtype).requires_grad_(), st_.to(dtype).requires_grad_()]
    teacher = [tq.to(teacher_dtype), tt.to(teacher_dtype)]
    if backend == "reference":
        loss = distillation_loss_reference(*leaves, *teacher, **options)
    else:
        loss = mmfast.distillation_loss(*leaves, *teacher, backend=backend, **options)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    return loss.detach(), torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype))


def check(backend, inputs, dtype, teacher_dtype=None, **options):
    teacher_dtype = teacher_dtype or dtype
    ours = run(backend, inputs, dtype, teacher_dtype, **options)
    rounded = [x.to(d).double() for x, d in zip(inputs, (dtype, dtype, teacher_dtype, teacher_dtype), strict=True)]
    truth = run("reference", rounded, torch.float64, **options)
    own = run("reference", inputs, dtype, teacher_dtype, **options)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within_torch_error("loss", ours[0], truth[0], own[0])
    for name, a, r, o in zip(("student_query", "student_target"), ours[1], truth[1], own[1], strict=True):
        assert a.dtype == dtype
        assert_within_torch_error(f"grad {name}", a, r, o)


TEMPERATURES = [
    {},
    {"student_temperature": 0.05, "teacher_temperature": 0.01},
    {"student_temperature": 1.0, "teacher_temperature": 0.1},
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperatures", TEMPERATURES, ids=["default", "sharp-teacher", "soft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_options_float64(backend, temperatures, reduction):
    check(backend, make_inputs(7, 100, 64, seed=1), torch.float64, reduction=reduction, **temperatures)


@pytest.mark.parametrize("d", [3, 100, 257], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("b", [1, 7, 129], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_float32(backend, b, d):
    """The teacher's dimension differs from the student's (d + 13)."""
    check(backend, make_inputs(b, d, d + 13, seed=b + d), torch.float32, student_temperature=0.05)
    check(backend, make_inputs(b, d, d + 13, seed=b + d), torch.float32, reduction="none")


@pytest.mark.parametrize(
    "dtype, teacher_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "fp16", "bf16-student-fp32-teacher"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype, teacher_dtype):
    check(backend, make_inputs(33, 64, 96, seed=2), dtype, teacher_dtype, student_temperature=0.05)
    check(backend, make_inputs(33, 64, 96, seed=2), dtype, teacher_dtype, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks(backend, monkeypatch):
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 2048)
    check(backend, make_inputs(129, 16, 24, seed=4), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient_and_subsets_work(backend):
    sq, st_, tq, tt = (x.clone().requires_grad_() for x in make_inputs(6, 8, 12, seed=5))
    mmfast.distillation_loss(sq, st_, tq, tt, backend=backend).backward()
    assert tq.grad is None and tt.grad is None and sq.grad is not None and st_.grad is not None
    sq2, st2, tq2, tt2 = make_inputs(6, 8, 12, seed=5)
    st2.requires_grad_()
    mmfast.distillation_loss(sq2, st2, tq2, tt2, backend=backend).backward()
    expected = st_.grad
    torch.testing.assert_close(st2.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad(backend):
    inputs = [x.requires_grad_() for x in make_inputs(6, 8, 12, seed=6)]
    with torch.no_grad():
        loss = mmfast.distillation_loss(*inputs, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, distillation_loss_reference(*(x.detach() for x in inputs)))


def test_identical_distributions_give_zero_loss():
    sq, st_, _, _ = make_inputs(9, 16, 16, seed=7)
    loss = mmfast.distillation_loss(sq, st_, sq, st_, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)


def test_module_and_errors():
    sq, st_, tq, tt = make_inputs(4, 8, 12, seed=8)
    module = mmfast.DistillationLoss(student_temperature=0.05, reduction="sum")
    torch.testing.assert_close(module(sq, st_, tq, tt), mmfast.distillation_loss(sq, st_, tq, tt,
                               student_temperature=0.05, reduction="sum"))  # fmt: skip
    assert "student_temperature=0.05" in repr(module)
    with pytest.raises(ValueError, match=r"student_target must have student_query's shape"):
        mmfast.distillation_loss(sq, st_[:3], tq, tt)
    with pytest.raises(ValueError, match=r"teacher_query must be \[B, D_t\] with B = 4"):
        mmfast.distillation_loss(sq, st_, tq[:3], tt[:3])
    with pytest.raises(ValueError, match=r"teacher_target must have teacher_query's shape"):
        mmfast.distillation_loss(sq, st_, tq, tt[:, :5])
    with pytest.raises(ValueError, match=r"student_query must be 2-D"):
        mmfast.distillation_loss(sq[None], st_, tq, tt)
    with pytest.raises(TypeError, match="teacher_query must be float32"):
        mmfast.distillation_loss(sq, st_, tq.long(), tt)
    with pytest.raises(TypeError, match="student_target has dtype torch.float32 but student_query has torch.float64"):
        mmfast.distillation_loss(sq, st_.float(), tq, tt)
    with pytest.raises(ValueError, match="teacher_target is on meta"):
        mmfast.distillation_loss(sq, st_, tq, tt.to("meta"))
    with pytest.raises(ValueError, match="student_temperature must be a positive finite number"):
        mmfast.distillation_loss(sq, st_, tq, tt, student_temperature=0.0)
    with pytest.raises(ValueError, match="teacher_temperature must be a positive finite number"):
        mmfast.distillation_loss(sq, st_, tq, tt, teacher_temperature=float("nan"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mmfast.distillation_loss(sq, st_, tq, tt, reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        mmfast.distillation_loss(sq, st_, tq, tt, backend="gpu")
    with pytest.raises(ValueError, match="B >= 1"):
        mmfast.distillation_loss(sq[:0], st_[:0], tq[:0], tt[:0])
    with pytest.raises(TypeError, match="cross_device must be a bool"):
        mmfast.DistillationLoss(cross_device="yes")


def test_cross_device_without_a_process_group_warns_once_and_computes_locally():
    import mmfast.distributed as distributed

    distributed._warned.discard("distillation_loss")
    inputs = make_inputs(5, 8, 12, seed=9)
    with pytest.warns(UserWarning, match="without an initialised torch.distributed process group"):
        loss = mmfast.distillation_loss(*inputs, cross_device=True)
    torch.testing.assert_close(loss, mmfast.distillation_loss(*inputs))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 40), ds=st.integers(1, 50), dt=st.integers(1, 50), seed=st.integers(0, 2**31 - 1),
       backend=st.sampled_from(BACKENDS), reduction=st.sampled_from(["mean", "sum", "none"]),
       ts=st.sampled_from([0.02, 0.1, 1.0]), tt=st.sampled_from([0.02, 0.1, 1.0]))  # fmt: skip
def test_property_any_shape(b, ds, dt, seed, backend, reduction, ts, tt):
    inputs = make_inputs(b, ds, dt, seed, correlated=False)
    ours = run(backend, inputs, torch.float64, reduction=reduction, student_temperature=ts, teacher_temperature=tt)
    ref = run("reference", inputs, torch.float64, reduction=reduction, student_temperature=ts, teacher_temperature=tt)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-9, atol=1e-10)
    for a, r in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.no_poison
def test_torch_compile_without_graph_breaks():
    inputs = [x.float() for x in make_inputs(8, 16, 24, seed=10)]
    leaves = [inputs[0].clone().requires_grad_(), inputs[1].clone().requires_grad_()]

    def step(sq, st_):
        return mmfast.distillation_loss(sq * 2.0, st_, inputs[2], inputs[3], backend="cpu") * 3.0

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    eager = [x.clone().detach().requires_grad_() for x in leaves]
    expected = step(*eager)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for a, r in zip(leaves, eager, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.no_poison
@pytest.mark.parametrize("with_grads", [True, False], ids=["grads", "loss-only"])
def test_custom_op_passes_opcheck(with_grads):
    """The fake implementation must describe the real outputs (shapes, dtypes, contiguous gradients)
    whatever the inputs' strides and the teacher's dimension and dtype, as for the other custom ops."""
    sq, st_, tq, tt = make_inputs(7, 5, 9, seed=12)
    student_query = sq.T.contiguous().T  # [7, 5] with transposed strides
    scale = torch.full((7,), 1 / 7, dtype=torch.float64) if with_grads else None
    for tau in (None, torch.tensor(0.05, dtype=torch.float32)):  # a learnable τ_s: its gradient in its dtype
        args = (student_query, st_, tq.float(), tt.float(), scale, tau, 0.05, 0.1, "cpu", [with_grads] * 3)
        torch.library.opcheck(torch.ops.mmfast.distillation_loss_rows.default, args)


def test_copies_of_a_candidate_only_merge_their_shares():
    """Why distillation_loss takes no duplicate ids (its module docstring): a copy of a candidate, in
    the teacher's and the student's embeddings alike, gives exactly the KL over the distinct
    candidates with the copy's probability merged into the original's."""
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    student[1][3], teacher[1][3] = student[1][1], teacher[1][1]  # candidate 3 is a copy of candidate 1
    rows = mmfast.distillation_loss(*student, *teacher, student_temperature=0.1, teacher_temperature=0.2,
                                    reduction="none", backend="cpu")  # fmt: skip
    p_student = torch.softmax(student[0] @ student[1].T / 0.1, dim=1)
    p_teacher = torch.softmax(teacher[0] @ teacher[1].T / 0.2, dim=1)
    keep = [0, 1, 2, 4]
    merged_student, merged_teacher = p_student[:, keep].clone(), p_teacher[:, keep].clone()
    merged_student[:, 1] += p_student[:, 3]
    merged_teacher[:, 1] += p_teacher[:, 3]
    expected = (merged_teacher * (merged_teacher.log() - merged_student.log())).sum(1)
    torch.testing.assert_close(rows, expected, rtol=1e-10, atol=1e-12)

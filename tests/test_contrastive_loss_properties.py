"""Property tests (hypothesis) and torch.compile for mmfast.contrastive_loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfast
from mmfast.reference import contrastive_loss_reference
from tests.helpers import unit_rows

options_strategy = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.02, 0.05, 0.5]),
        "symmetric": st.booleans(),
        "hardness": st.sampled_from([0.0, 0.5, 9.0, -5.0]),
        "false_negative_margin": st.one_of(st.none(), st.floats(-0.2, 0.3)),
        "topk": st.one_of(st.none(), st.integers(1, 12)),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 40),
    d=st.integers(1, 70),
    k=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
    options=options_strategy,
    backend=st.sampled_from(["torch", "cpu", "triton"]),
)
def test_any_shape_and_options_match_reference(b, d, k, seed, options, backend):
    g = torch.Generator().manual_seed(seed)
    q, t = unit_rows(b, d, generator=g), unit_rows(b, d, generator=g)
    n = unit_rows(b, k, d, generator=g) if k else None
    leaves = [x.clone().requires_grad_() for x in (q, t, n) if x is not None]
    reference = [x.clone().requires_grad_() for x in leaves]
    ours = mmfast.contrastive_loss(*leaves, backend=backend, **options)
    expected = contrastive_loss_reference(*reference, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)
    grad_out = torch.rand(ours.shape, generator=g, dtype=torch.float64)
    for a, r in zip(
        torch.autograd.grad(ours, leaves, grad_out), torch.autograd.grad(expected, reference, grad_out), strict=True
    ):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.no_poison  # dynamo would trace the test's patched torch.empty
@pytest.mark.parametrize(
    "compiler, options",
    [
        ("aot_eager", {}),
        ("aot_eager", {"hardness": 9.0, "symmetric": True}),
        ("aot_eager", {"false_negative_margin": 0.1, "topk": 4, "reduction": "none"}),
        ("inductor", {"hardness": 9.0}),
    ],
)
def test_torch_compile_traces_the_loss_without_graph_breaks(compiler, options):
    g = torch.Generator().manual_seed(0)
    q, t, n = unit_rows(16, 32, generator=g), unit_rows(16, 32, generator=g), unit_rows(16, 2, 32, generator=g)

    def step(q, t, n):
        return (mmfast.contrastive_loss(q * 2.0, t, n, backend="cpu", **options) * 3.0).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    leaves = [x.float().requires_grad_() for x in (q, t, n)]
    eager_leaves = [x.float().requires_grad_() for x in (q, t, n)]
    loss = compiled(*leaves)
    expected = step(*eager_leaves)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for a, r in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.no_poison
def test_custom_op_passes_opcheck_with_non_contiguous_inputs():
    """The fake implementation must describe the real outputs (contiguous gradients) whatever the
    inputs' strides, or torch.compile fails on transposed embeddings."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(8, 16, generator=g, dtype=torch.float64).T  # [16, 8], not contiguous
    t = torch.randn(16, 8, generator=g, dtype=torch.float64)
    n = torch.randn(16, 8, generator=g, dtype=torch.float64)
    scale = torch.full((16,), 1 / 16, dtype=torch.float64)
    for tau in (None, torch.tensor(0.05, dtype=torch.float32)):  # a learnable τ: its gradient in its dtype
        needs = [True, True, True, False, False, tau is not None]
        args = (q, t, n, scale, None, None, tau, 0, 0.05, True, 1.0, 0.1, 3, "cpu", needs)
        torch.library.opcheck(torch.ops.mmfast.contrastive_loss_rows.default, args)


@pytest.mark.no_poison
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_transposed_inputs_and_dynamic_shapes(dynamic):
    def step(q, t):
        return mmfast.contrastive_loss(q, t, hardness=2.0, topk=3, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for b in (16, 24):
        g = torch.Generator().manual_seed(b)
        q = torch.randn(8, b, generator=g).T.requires_grad_()
        t = torch.randn(b, 8, generator=g, requires_grad=True)
        loss = compiled(q, t)
        loss.backward()
        q2, t2 = q.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        expected = step(q2, t2)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(q.grad, q2.grad)
        torch.testing.assert_close(t.grad, t2.grad)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_autocast_does_not_change_the_kernels_precision(backend):
    g = torch.Generator().manual_seed(3)
    q, t = torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)
    results = []
    for enabled in (False, True):
        leaves = [q.clone().requires_grad_(), t.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = mmfast.contrastive_loss(*leaves, topk=4, backend=backend)
        loss.backward()
        results.append((loss, leaves[0].grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_topk_larger_than_the_candidates_keeps_every_negative(backend):
    """k beyond N - 1 behaves as k = N - 1, with buffers sized by N (not by k)."""
    g = torch.Generator().manual_seed(4)
    q, t, n = unit_rows(9, 16, generator=g), unit_rows(9, 16, generator=g), unit_rows(9, 2, 16, generator=g)
    huge = mmfast.contrastive_loss(q, t, n, topk=10**9, symmetric=True, backend=backend, reduction="none")
    exact = mmfast.contrastive_loss(q, t, n, topk=26, symmetric=True, backend="reference", reduction="none")
    torch.testing.assert_close(huge, exact)


def test_tf32_setting_through_the_new_api_is_read_without_error():
    pytest.importorskip("triton")
    from mmfast.kernels.matmul import fp32_matmul_allows_tf32, input_precision_for

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flag")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fp32_matmul_allows_tf32()
        import triton.language as tl

        assert input_precision_for(tl.float32) == "tf32" and input_precision_for(tl.bfloat16) == "ieee"
        matmul.fp32_precision = "ieee"
        assert not fp32_matmul_allows_tf32()
    finally:
        matmul.fp32_precision = before

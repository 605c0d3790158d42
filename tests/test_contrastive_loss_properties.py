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

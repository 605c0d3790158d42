"""mmfast.last_token_pool / mean_pool against the float64 reference, on every backend."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.reference import pool_reference
from tests.helpers import BACKENDS, assert_within_torch_error

PADDINGS = ["left", "right", "none", "mixed"]


def make_mask(b: int, t: int, padding: str, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    positions = torch.arange(t)
    right = positions[None, :] < lengths[:, None]  # real tokens first
    left = positions[None, :] >= (t - lengths)[:, None]  # real tokens last
    if padding == "none":
        return torch.ones(b, t, dtype=torch.long)
    if padding == "left":
        return left.long()
    if padding == "right":
        return right.long()
    pick_left = torch.rand(b, generator=g) < 0.5
    return torch.where(pick_left[:, None], left, right).long()


def make_hidden(b, t, d, g, *, contiguous=True):
    if contiguous:
        return torch.randn(b, t, d, generator=g, dtype=torch.float64)
    # A slice of a wider [B, T+2, D+5] model output: strides that are not [T·D, D, 1].
    return torch.randn(b, t + 2, d + 5, generator=g, dtype=torch.float64)[:, 1 : t + 1, 2 : d + 2]


def run(backend, hidden, mask, dtype, mode, normalize, seed=0):
    x = hidden.detach().to(dtype).requires_grad_() if hidden.is_contiguous() else _strided_like(hidden, dtype)
    fn = mmfast.last_token_pool if mode == "last" else mmfast.mean_pool
    if backend == "reference":
        out = pool_reference(x, mask, mode=mode, normalize=normalize)
    else:
        out = fn(x, mask, normalize=normalize, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return out.detach(), grad


def _strided_like(hidden, dtype):
    """The same non-contiguous layout in `dtype`: a leaf whose values are `hidden`'s."""
    b, t, d = hidden.shape
    base = torch.zeros(b, t + 2, d + 5, dtype=dtype)
    view = base[:, 1 : t + 1, 2 : d + 2]
    view.copy_(hidden)
    assert not view.is_contiguous()
    return view.detach().requires_grad_()


def check(backend, hidden, mask, dtype, mode, normalize):
    ours = run(backend, hidden, mask, dtype, mode, normalize)
    rounded = hidden.to(dtype).double()  # float64 arithmetic on the values the kernel sees
    truth = run("reference", rounded, mask, torch.float64, mode, normalize)
    own = run("reference", hidden, mask, dtype, mode, normalize)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[1].shape == hidden.shape
    assert_within_torch_error("output", ours[0], truth[0], own[0])
    assert_within_torch_error("grad hidden_states", ours[1], truth[1], own[1])


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paddings_float64(backend, mode, padding, normalize):
    g = torch.Generator().manual_seed(1)
    check(backend, make_hidden(7, 9, 100, g), make_mask(7, 9, padding, g), torch.float64, mode, normalize)


@pytest.mark.parametrize("d", [3, 100, 257], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("b", [1, 7, 129], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes_float32(backend, mode, b, d):
    g = torch.Generator().manual_seed(b * 1000 + d)
    check(backend, make_hidden(b, 13, d, g), make_mask(b, 13, "mixed", g), torch.float32, mode, True)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["last", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_strides(backend, mode, dtype, contiguous):
    g = torch.Generator().manual_seed(3)
    hidden = make_hidden(6, 40, 64, g, contiguous=contiguous)
    check(backend, hidden, make_mask(6, 40, "mixed", g), dtype, mode, True)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_dtypes_and_holes(backend, mask_dtype):
    """Any bool/integer mask; nonzero is a real token; zeros inside a row are skipped by the mean and
    the last token is the last nonzero position."""
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 7], [1, 1, 1, 1, 1, 1]])
    hidden = make_hidden(4, 6, 10, g)
    for mode in ("last", "mean"):
        check(backend, hidden, mask.to(mask_dtype), torch.float64, mode, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vector_follows_f_normalize(backend):
    """A pooled vector of norm 0 (below eps) behaves as F.normalize: output 0, gradient dy/eps."""
    hidden = torch.zeros(2, 3, 4, dtype=torch.float64)
    hidden[1] = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.long)
    check(backend, hidden, mask, torch.float64, "last", True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_at_pooled_positions(backend):
    g = torch.Generator().manual_seed(5)
    mask = make_mask(5, 8, "mixed", g)
    hidden = make_hidden(5, 8, 6, g).requires_grad_()
    mmfast.last_token_pool(hidden, mask, backend=backend).sum().backward()
    used = hidden.grad.abs().sum(dim=2) != 0
    last = torch.where(mask != 0, torch.arange(8), -1).amax(dim=1)
    assert torch.equal(used, torch.nn.functional.one_hot(last, 8).bool())


def test_pooler_module_matches_functions():
    g = torch.Generator().manual_seed(6)
    hidden, mask = make_hidden(3, 5, 8, g), make_mask(3, 5, "mixed", g)
    torch.testing.assert_close(mmfast.Pooler("mean")(hidden, mask), mmfast.mean_pool(hidden, mask))
    torch.testing.assert_close(
        mmfast.Pooler("last", normalize=False)(hidden, mask), mmfast.last_token_pool(hidden, mask, normalize=False)
    )
    assert "mode='mean'" in repr(mmfast.Pooler("mean"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad(backend):
    g = torch.Generator().manual_seed(7)
    hidden, mask = make_hidden(3, 5, 8, g).requires_grad_(), make_mask(3, 5, "left", g)
    with torch.no_grad():
        out = mmfast.mean_pool(hidden, mask, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, pool_reference(hidden.detach(), mask, mode="mean"))


# Bad input: a clear error naming the argument.
def pool(*args, **kwargs):
    return mmfast.last_token_pool(*args, **kwargs)


def test_errors_shapes_and_ranks():
    h, m = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden_states must be 3-D \[B, T, D\]"):
        pool(h[0], m)
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \[B, T\]"):
        pool(h, m[0])
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \[2, 3\]"):
        pool(h, torch.ones(2, 4, dtype=torch.long))


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_errors_row_without_real_token(mode):
    h, m = torch.randn(3, 4, 5), torch.ones(3, 4, dtype=torch.long)
    m[1] = 0
    fn = mmfast.last_token_pool if mode == "last" else mmfast.mean_pool
    with pytest.raises(ValueError, match=r"rows with no real token \(all zeros\): rows \[1\]"):
        fn(h, m)


def test_errors_dtypes_devices_backend():
    h, m = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="hidden_states must be float32, bfloat16, float16 or float64"):
        pool(h.long(), m)
    with pytest.raises(TypeError, match="attention_mask must be bool or an integer dtype"):
        pool(h, m.float())
    with pytest.raises(ValueError, match="attention_mask is on meta but hidden_states is on cpu"):
        pool(h, m.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        pool(h, m, backend="gpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        mmfast.Pooler("max")
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        pool(h.tolist(), m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_pooling(backend):
    g = torch.Generator().manual_seed(9)
    hidden, mask = make_hidden(4, 16, 32, g).float(), make_mask(4, 16, "mixed", g)
    plain = mmfast.mean_pool(hidden, mask, normalize=False, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = mmfast.mean_pool(hidden, mask, normalize=False, backend=backend)
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


@pytest.mark.no_poison  # dynamo would trace the test's patched torch.empty
@pytest.mark.parametrize("mode", ["last", "mean"])
def test_torch_compile_traces_pooling_without_graph_breaks(mode):
    g = torch.Generator().manual_seed(10)
    hidden, mask = make_hidden(3, 7, 16, g).float(), make_mask(3, 7, "mixed", g)
    pool = mmfast.last_token_pool if mode == "last" else mmfast.mean_pool

    def step(h):
        return pool(h * 2.0, mask, backend="cpu").sum(dim=1)

    torch._dynamo.reset()
    leaf, eager_leaf = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(leaf)
    expected = step(eager_leaf)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(leaf.grad, eager_leaf.grad)


@pytest.mark.no_poison
def test_pooling_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(11)
    hidden = make_hidden(3, 7, 16, g).float().transpose(0, 1).contiguous().transpose(0, 1)  # strided
    mask = make_mask(3, 7, "mixed", g).int()
    torch.library.opcheck(torch.ops.mmfast.pool_forward.default, (hidden, mask, "mean", True, "cpu"))
    out = torch.ops.mmfast.pool_forward(hidden, mask, "last", True, "cpu")
    args = (torch.randn(3, 16), *out[1:], mask, "last", True, "cpu", [3, 7, 16], torch.float32)
    torch.library.opcheck(torch.ops.mmfast.pool_backward.default, args)

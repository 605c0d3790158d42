"""Bad input to mmfast.contrastive_loss: a clear ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast._extension import load_extension


def good(b=4, d=8, k=2, dtype=torch.float32):
    return torch.randn(b, d, dtype=dtype), torch.randn(b, d, dtype=dtype), torch.randn(b, k, d, dtype=dtype)


def raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        mmfast.contrastive_loss(*args, **kwargs)


def test_mismatched_batch():
    q, t, n = good()
    raises(ValueError, "target must have query's shape", q, t[:3], n)


def test_mismatched_dim():
    q, t, n = good()
    raises(ValueError, "target must have query's shape", q, t[:, :5], n)
    raises(ValueError, r"negatives \[B, K, D\] must have B = 4 and D = 8", q, t, n[:, :, :5])
    raises(ValueError, r"negatives \[M, D\] must have D = 8", q, t, torch.randn(6, 5))


def test_negatives_batch_mismatch():
    q, t, n = good()
    raises(ValueError, r"negatives \[B, K, D\] must have B = 4", q, t, n[:3])


def test_wrong_ranks():
    q, t, n = good()
    raises(ValueError, r"query must be 2-D \[B, D\]", q[None], t, n)
    raises(ValueError, r"target must be 2-D \[B, D\]", q, t[0], n)
    raises(ValueError, r"negatives must be \[B, K, D\] or \[M, D\]", q, t, n[None])


def test_not_a_tensor():
    q, t, _ = good()
    raises(TypeError, "query must be a torch.Tensor", q.tolist(), t)
    raises(TypeError, "negatives must be a torch.Tensor or None", q, t, [1.0])


def test_integer_dtype():
    q, t, n = good()
    raises(TypeError, "query must be float32, bfloat16, float16 or float64", q.long(), t.long())
    raises(TypeError, "negatives must be float32, bfloat16, float16 or float64", q, t, n.int())


def test_mixed_dtypes():
    q, t, n = good()
    raises(TypeError, "target has dtype torch.float64 but query has torch.float32", q, t.double(), n)
    raises(TypeError, "negatives has dtype torch.bfloat16", q, t, n.bfloat16())


def test_mixed_devices():
    q, t, n = good()
    raises(ValueError, "target is on meta but query is on cpu", q, t.to("meta"), n)
    raises(ValueError, "weight is on meta", q, t, n, weight=torch.ones(4, device="meta"))


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    raises(ValueError, "temperature must be a positive finite number", *good(), temperature=temperature)


def test_temperature_type():
    raises(TypeError, "temperature must be a real number", *good(), temperature="0.05")
    raises(ValueError, "temperature must be a number or a 0-d tensor", *good(), temperature=torch.tensor([0.05]))


@pytest.mark.parametrize("topk", [0, -3])
def test_topk_below_one(topk):
    raises(ValueError, "topk must be >= 1", *good(), topk=topk)


@pytest.mark.parametrize("topk", [2.0, True, "8"])
def test_topk_not_an_integer(topk):
    raises(TypeError, "topk must be an int or None", *good(), topk=topk)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_margin_and_hardness(value):
    raises(ValueError, "false_negative_margin must be a finite number", *good(), false_negative_margin=value)
    raises(ValueError, "hardness must be a finite number", *good(), hardness=value)


def test_weight_shape_and_dtype():
    raises(ValueError, r"weight must have shape \[B\] = \[4\]", *good(), weight=torch.ones(3))
    raises(ValueError, r"weight must have shape \[B\] = \[4\]", *good(), weight=torch.ones(4, 1))
    raises(TypeError, "weight must be a floating-point tensor", *good(), weight=torch.ones(4, dtype=torch.long))


def test_unknown_reduction():
    raises(ValueError, "reduction must be one of", *good(), reduction="avg")


def test_unknown_backend():
    raises(ValueError, "backend must be one of 'auto', 'triton', 'cpu', 'torch', 'reference'", *good(), backend="cuda")


def test_unavailable_backends(monkeypatch):
    raises(ValueError, "backend='cpu' is unavailable: it needs CPU tensors, got meta",
           *(x.to("meta") for x in good()), backend="cpu")  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    raises(ValueError, "backend='triton' is unavailable: it needs CUDA tensors, or TRITON_INTERPRET=1", *good(),
           backend="triton")  # fmt: skip


def test_empty_batch():
    raises(ValueError, r"query is empty: the batch needs at least one row", torch.empty(0, 8), torch.empty(0, 8))
    raises(ValueError, "embedding dimension must be >= 1", torch.empty(4, 0), torch.empty(4, 0))


def test_options_dataclass_validates():
    with pytest.raises(ValueError, match="temperature"):
        mmfast.ContrastiveLossOptions(temperature=0)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        mmfast.ContrastiveLoss(symmetric="yes")


def test_cpp_checks_raise_instead_of_crashing():
    """The C++ entry points validate their arguments with TORCH_CHECK (a RuntimeError in Python)."""
    ext = load_extension()
    scores = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="row_offset 5 \\+ rows 4 exceeds"):
        ext.contrastive_softmax_rows(scores, 5, 1.0, 0.0, None, None, torch.empty(4), None, None)
    with pytest.raises(RuntimeError, match="scores must be float32 or float64"):
        ext.contrastive_softmax_rows(scores.half(), 0, 1.0, 0.0, None, None, torch.empty(4), None, None)
    with pytest.raises(RuntimeError, match="loss must be a contiguous CPU"):
        ext.contrastive_softmax_rows(scores, 0, 1.0, 0.0, None, None, torch.empty(3), None, None)
    with pytest.raises(RuntimeError, match="row_scale must have shape"):
        ext.contrastive_softmax_rows(scores, 0, 1.0, 0.0, None, torch.ones(2), torch.empty(4), None, None)
    with pytest.raises(RuntimeError, match="topk must be >= 1"):
        ext.contrastive_topk_rows(scores, 0, 1.0, 0.0, None, 0, None, torch.empty(4), torch.empty(4, 1).long(), None,
                                  None, None)  # fmt: skip
    with pytest.raises(RuntimeError, match="temperature_grad needs row_scale"):
        ext.contrastive_softmax_rows(scores, 0, 1.0, 0.0, None, None, torch.empty(4), torch.empty(4), None)
    with pytest.raises(RuntimeError, match="temperature_grad must be a contiguous CPU"):
        ext.contrastive_softmax_rows(scores, 0, 1.0, 0.0, None, torch.ones(4), torch.empty(4), torch.empty(3), None)
    x, y = torch.randn(4, 3), torch.randn(6, 3)
    index = torch.full((4, 2), 7)
    with pytest.raises(RuntimeError, match="index entries must lie in"):
        ext.contrastive_sparse_grads(x, y, None, index, torch.ones(4, 2), torch.zeros(4, 3), None, None)


def test_cross_device_without_a_process_group_warns_once_and_computes_locally():
    import mmfast.distributed as distributed

    distributed._warned.discard("contrastive_loss")
    q, t, n = good()
    with pytest.warns(UserWarning, match="without an initialised torch.distributed process group"):
        loss = mmfast.contrastive_loss(q, t, n, cross_device=True)
    torch.testing.assert_close(loss, mmfast.contrastive_loss(q, t, n))
    with pytest.raises(TypeError, match="cross_device must be a bool"):
        mmfast.ContrastiveLoss(cross_device=1)


def test_float8_and_other_dtypes_are_refused():
    q, t, _ = good()
    for dtype in (torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(TypeError, match="query must be float32, bfloat16, float16 or float64"):
            mmfast.contrastive_loss(q.to(dtype), t.to(dtype))


def test_numpy_scalars_are_accepted():
    import numpy as np

    q, t, n = good()
    expected = mmfast.contrastive_loss(q, t, n, temperature=0.05, topk=2, hardness=1.0)
    got = mmfast.contrastive_loss(q, t, n, temperature=np.float32(0.05), topk=np.int64(2), hardness=np.float64(1.0))
    torch.testing.assert_close(got, expected)


def test_module_checks_the_backend_name_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        mmfast.ContrastiveLoss(backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mmfast.Pooler(backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mmfast.DistillationLoss(backend="cuda")


def test_meta_tensors_get_a_clear_error():
    with pytest.raises(ValueError, match="meta tensors hold no data"):
        mmfast.contrastive_loss(*(x.to("meta") for x in good()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_backend_returns_the_documented_loss_dtype(dtype):
    q, t, n = (x.to(dtype) for x in good())
    assert mmfast.contrastive_loss(q, t, n, backend="reference").dtype == torch.float32


def test_bad_chunk_size_variable_warns_instead_of_breaking_import():
    import os
    import subprocess
    import sys

    env = {**os.environ, "MMFAST_SCORE_CHUNK_BYTES": "lots"}
    env.pop("TRITON_INTERPRET", None)
    code = "import mmfast.backends.chunked as c; print(c.SCORE_CHUNK_BYTES)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "None" and "ignoring MMFAST_SCORE_CHUNK_BYTES" in run.stderr
    env["MMFAST_SCORE_CHUNK_BYTES"] = "16M"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == str(16 << 20)


def test_under_compile_the_error_keeps_mmfast_message():
    """As the README says: fullgraph=True reports any exception raised while tracing as dynamo's
    Unsupported, with mmfast's message in it; without fullgraph the ValueError itself is raised."""
    q, t, _ = good()
    loss = lambda q, t: mmfast.contrastive_loss(q, t, backend="torch")
    message = r"raised exception ValueError\(\"target must have query's shape \(4, 8\) \[B, D\], got \(3, 8\)\"\)"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=message):
        torch.compile(loss, fullgraph=True, backend="eager")(q, t[:3])
    with pytest.raises(ValueError, match="target must have query's shape"):
        torch.compile(loss, backend="eager")(q, t[:3])

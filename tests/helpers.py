"""Shared test helpers: random inputs and the error criterion against a float64 reference."""

from __future__ import annotations

import torch

from mmfast.backends import cpu_unavailable_reason

BACKENDS = ["torch", "cpu", "triton"]
# The contrastive loss's backends and the triton backend's other paths, "triton+<path>" (tests/conftest.py
# `backend` fixture: parametrise with indirect=True). Plain "triton" is "auto": under the interpreter,
# the chunked Triton GEMMs. "triton+fused" runs the fused path where it applies (D a multiple of 16,
# no top-k, no float64) and the chunked one elsewhere.
CONTRASTIVE_BACKENDS = [*BACKENDS, "triton+cublas", "triton+fused"]
if cpu_unavailable_reason(torch.device("cpu")) is not None:
    raise RuntimeError("the C++ CPU kernels must build for the tests: " + cpu_unavailable_reason(torch.device("cpu")))


def unit_rows(*shape: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Random L2-normalised rows (what the embedders feed the loss), drawn in float64."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if reference.numel() else 0.0


# The floor of the criterion, in units of the output dtype's eps at the output's scale:
# - bf16/fp16: one unit, the final rounding of an output (our internals are float32, far more
#   accurate than PyTorch's own 16-bit computation, which sets the 2× bound);
# - float32: a few units. Both sides round the same float32 scores and their errors are at that
#   floor; on tiny problems (B = 1) PyTorch's own max error can be a lucky fraction of a unit.
# - float64 is the reference itself (its own error is 0): allow a reordered summation.
SLACK_ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 8, torch.float64: 1000}


def assert_within_torch_error(name, actual, reference64, torch_own, *, factor=2.0):
    """The kernel's error against float64 must be at most `factor`× PyTorch's own error (the naive
    computation in the input dtype), plus SLACK_ULPS units of rounding at the reference's scale."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the output"
    err = max_error(actual, reference64)
    own = max_error(torch_own, reference64)
    scale = reference64.abs().max().item() if reference64.numel() else 0.0
    slack = SLACK_ULPS[torch_own.dtype] * torch.finfo(torch_own.dtype).eps * max(scale, 1e-3)
    assert err <= factor * own + slack, f"{name}: error {err:.3e} > {factor}× torch's {own:.3e} + {slack:.1e}"

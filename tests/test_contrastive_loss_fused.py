"""The Triton backend's two paths for the contrastive loss, each forced, against the float64 reference:
"fused" (kernels/contrastive_loss_fused.py: the row work inside the score and dX GEMMs) and "chunked"
(GEMM, row kernel, GEMMs). TritonContrastiveKernels.path picks one per direction; `force_path`
monkeypatches it, and counts the fused chunks so a test knows which path really ran."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.backends import chunked
from mmfast.backends.contrastive_kernels import contrastive_kernels
from mmfast.backends.contrastive_loss import GradientNeeds, contrastive_loss_rows
from mmfast.distributed import Gathered
from mmfast.duplicate_ids import DuplicateIds
from mmfast.kernel_contract import DirectionOptions
from mmfast.kernels import contrastive_loss_fused
from mmfast.kernels.contrastive_loss import TritonContrastiveKernels
from tests.helpers import unit_rows
from tests.test_contrastive_loss import OPTION_SETS, check_against_reference, make_inputs
from tests.test_contrastive_loss_ids import make_ids, with_ids

# Every option the fused path supports, alone and together (top-k stays on the chunked path).
FUSED_OPTIONS = {name: opts for name, opts in OPTION_SETS.items() if "topk" not in opts}
FUSED_OPTIONS["all"] = {"temperature": 0.05, "hardness": 4.0, "false_negative_margin": 0.05, "symmetric": True}


@pytest.fixture
def force_path(monkeypatch):
    """force_path("fused" | "chunked", dx="prologue" | "gemm") -> a list that grows by one per fused
    chunk run. dx: where the fused path computes dX = G·Y (PROLOGUE_MAX_DIM picks it by D)."""
    chunks = []
    run_chunk = contrastive_loss_fused.fused_direction_chunk

    def counted(*args, **kwargs):
        chunks.append(kwargs)
        return run_chunk(*args, **kwargs)

    monkeypatch.setattr("mmfast.kernels.contrastive_loss.fused_direction_chunk", counted)

    def force(path: str, dx: str = "prologue") -> list:
        # "fused" through the variable would keep odd D on the chunked path: force it everywhere.
        monkeypatch.setattr(TritonContrastiveKernels, "path", lambda self, *args, **kwargs: path)
        monkeypatch.setattr(contrastive_loss_fused, "PROLOGUE_MAX_DIM", 1 << 30 if dx == "prologue" else 0)
        return chunks

    return force


def check(q, t, n, dtype, **kwargs):
    check_against_reference("triton", q, t, n, dtype, **kwargs)


@pytest.mark.parametrize("path", ["fused", "chunked"])
@pytest.mark.parametrize("options", FUSED_OPTIONS.keys())
def test_every_option_and_reduction(force_path, path, options):
    chunks = force_path(path)
    q, t, n = make_inputs(19, 40, 2, seed=31, peaky=True)
    weight = torch.rand(19, generator=torch.Generator().manual_seed(19), dtype=torch.float64) + 0.5
    check(q, t, n, torch.float32, weight=weight, **FUSED_OPTIONS[options])
    check(q, t, n, torch.float32, reduction="none", **FUSED_OPTIONS[options])
    assert bool(chunks) == (path == "fused")


PATHS = [("fused", "prologue"), ("fused", "gemm"), ("chunked", "-")]
DX = ["prologue", "gemm"]


@pytest.mark.parametrize(("path", "dx"), PATHS, ids=["fused-prologue", "fused-gemm", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes_with_ids_and_a_learned_temperature(force_path, path, dx, dtype):
    force_path(path, dx)
    q, t, n = make_inputs(21, 32, 1, seed=32, peaky=True)
    ids = make_ids(21, 21, seed=33)
    options = with_ids(FUSED_OPTIONS["all"], *ids)
    del options["temperature"]
    check(
        q,
        t,
        n,
        dtype,
        learned_temperature=0.07,
        weight=torch.rand(21, generator=torch.Generator().manual_seed(21), dtype=torch.float64) + 0.5,
        **options,
    )
    check(q, t, n, dtype, reduction="sum", **with_ids(FUSED_OPTIONS["margin"], *ids))


@pytest.mark.parametrize(("b", "d", "k"), [(1, 3, 0), (7, 100, 1), (37, 16, 0), (33, 17, 3), (18, 48, 2)])
@pytest.mark.parametrize("dx", DX)
def test_odd_sizes(force_path, dx, b, d, k):
    """Rows, candidates and D that fill no tile (the interpreter's tiles are 16 × 16 × 32)."""
    force_path("fused", dx)
    q, t, n = make_inputs(b, d, k, seed=b + d + k)
    check(q, t, n, torch.float32, learned_temperature=0.05, hardness=2.0, false_negative_margin=0.1)
    check(q, t, n, torch.float16, reduction="none")


@pytest.mark.parametrize("dx", DX)
def test_shared_negatives_across_many_chunks(force_path, monkeypatch, dx):
    chunks = force_path("fused", dx)
    monkeypatch.setattr(chunked, "SCORE_CHUNK_BYTES", 4096)  # a few rows per chunk
    q, t, n = make_inputs(37, 32, 0, seed=34, m=29)
    ids = make_ids(37, 29, seed=35)
    check(q, t, n, torch.float32, learned_temperature=0.05, **with_ids(FUSED_OPTIONS["all"], *ids))
    assert len(chunks) > 8


@pytest.mark.parametrize(
    "which", [(True, False, False), (False, True, False), (False, False, True), (False, False, False)],
    ids=["query", "target", "negatives", "temperature_only"],
)  # fmt: skip
@pytest.mark.parametrize("dx", DX)
def test_gradient_of_any_subset_of_inputs(force_path, dx, which):
    """dX, G and dY are each written only when wanted (and G still formed for τ alone)."""
    force_path("fused", dx)
    q, t, n = make_inputs(9, 70, 2, seed=36)  # D spans three of the interpreter's D blocks
    results = []
    for backend in ("triton", "reference"):
        inputs = [x.clone().float().requires_grad_(flag) for x, flag in zip((q, t, n), which, strict=True)]
        tau = torch.tensor(0.1, requires_grad=True)
        loss = mmfast.contrastive_loss(*inputs, temperature=tau, hardness=2.0, backend=backend)
        loss.backward()
        results.append([x.grad for x in inputs] + [tau.grad])
    for ours, ref in zip(*results, strict=True):
        assert (ours is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_no_grad_keeps_only_tile_statistics(force_path):
    """Without a gradient no S or G buffer exists: the kernels write [rows, tiles] statistics only."""
    chunks = force_path("fused")
    q, t, n = make_inputs(23, 32, 1, seed=37)
    inputs = [x.float() for x in (q, t, n)]
    with torch.no_grad():
        loss = mmfast.contrastive_loss(*inputs, hardness=3.0, reduction="none", backend="triton")
    expected = mmfast.contrastive_loss(q, t, n, hardness=3.0, reduction="none", backend="reference")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(chunks) == 1 and set(chunks[0]) == {"gemms"}  # no scores, grads or row_scale


@pytest.mark.parametrize("dx", DX)
@pytest.mark.parametrize("symmetric", [False, True])
def test_positive_offset_across_devices(force_path, symmetric, dx):
    """This rank's rows see every rank's gathered candidates; its positives start at offset 4."""
    force_path("fused", dx)
    g = torch.Generator().manual_seed(38)
    targets, negatives, queries = (unit_rows(r, 32, generator=g) for r in (12, 7, 12))
    offset, rows = 4, 5
    q, t = queries[offset : offset + rows], targets[offset : offset + rows]
    ids = DuplicateIds(make_ids(12, 7, seed=39)[0], make_ids(12, 0, seed=40)[1] if symmetric else None)
    needs = GradientNeeds(query=True, target=True, negatives=True, gathered_targets=True,
                          gathered_queries=symmetric, temperature=True)  # fmt: skip
    scale = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        tau = torch.tensor(0.05, dtype=dtype)
        out = contrastive_loss_rows(
            backend, q.to(dtype), t.to(dtype), negatives.to(dtype),
            direction=DirectionOptions.of(tau, 2.0, 0.05, None), symmetric=symmetric, row_scale=scale.to(dtype),
            needs=needs, gathered=Gathered(targets.to(dtype), negatives.to(dtype),
                                           queries.to(dtype) if symmetric else None, offset),
            temperature=tau, ids=ids,
        )  # fmt: skip
        results.append(out)
    for ours, ref in zip(*results, strict=True):
        assert (ours is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)


def test_the_path_rule(monkeypatch):
    """MMFAST_CONTRASTIVE_PATH=fused sends what the fused path supports there, the rest to the chunked
    path; "auto" does not pick it (unproven on hardware)."""
    kernels = contrastive_kernels("triton")
    plain = DirectionOptions.of(0.05, 0.0, None, None)

    def path(dim, dtype, opts=plain):
        return kernels.path(64, 128, dim, dtype, opts, chunk=64, device=torch.device("cpu"))

    monkeypatch.setenv("MMFAST_CONTRASTIVE_PATH", "fused")
    assert path(1024, torch.bfloat16) == path(1024, torch.float32) == "fused"
    assert path(1024, torch.float64) == "chunked"  # tl.dot has no float64
    assert path(100, torch.float16) == "chunked"  # D not a multiple of 16
    assert path(1024, torch.float16, DirectionOptions.of(0.05, 0.0, None, 3)) == "chunked"  # top-k
    monkeypatch.setenv("MMFAST_CONTRASTIVE_PATH", "auto")
    assert path(1024, torch.bfloat16) == "chunked"
    with pytest.raises(NotImplementedError, match="top-k"):
        x = torch.zeros(2, 16)
        contrastive_loss_fused.fused_direction_chunk(x, [x], DirectionOptions.of(0.05, 0.0, None, 1), 0, torch.empty(2))

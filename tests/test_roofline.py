"""The H100 cost model (mmfast.kernels.roofline) and the triton backend's path choice it drives."""

from __future__ import annotations

import pytest
import torch

import mmfast
from mmfast.kernel_contract import DirectionOptions
from mmfast.kernels import roofline
from mmfast.kernels.contrastive_loss import PATH_VARIABLE


def test_every_tile_fraction_is_below_the_sustained_ceiling_and_bigger_tiles_do_better():
    for tile in roofline.MATMUL_TILES.values():
        r = roofline.tile_fraction(tile, 8192, 8192, "bf16")
        assert 0 < r["fraction"] <= roofline.TRITON_SOFTWARE * roofline.H100.sustained
    tiles = [roofline.MATMUL_TILES[name] for name in (("hopper_wide", "plain"), ("hopper", "accumulate"),
                                                      ("tensor_core", "plain"))]  # fmt: skip
    fractions = [roofline.tile_fraction(tile, 8192, 8192, "bf16")["fraction"] for tile in tiles]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[1] > fractions[2]
    # 172 registers × 256 threads: one CTA per SM; 128 × 256 threads at 128 registers: two.
    assert roofline.occupancy(roofline.MATMUL_TILES[("hopper", "accumulate")]) == 1
    assert roofline.occupancy(roofline.MATMUL_TILES[("tensor_core", "plain")]) == 2


def test_wave_quantisation_counts_the_idle_slots_of_the_last_wave():
    assert roofline.wave_efficiency(128 * 132, 128, 128, 128, 1) == 1.0
    assert roofline.wave_efficiency(128 * 133, 128, 128, 128, 1) == pytest.approx(133 / 264)


@pytest.mark.parametrize("d", [1000, 496])  # the fused path's G pass and its dX prologue
@pytest.mark.parametrize("path", roofline.PATHS)
def test_every_path_does_the_three_gemms_and_is_above_the_peak_bound(path, d):
    rows, n = 4097, 8194
    kernels = roofline.path_kernels(path, rows, n, d, "bf16", chunk=1000)
    assert sum(k.flops for k in kernels) == pytest.approx(3 * 2.0 * rows * n * d)
    seconds = roofline.path_seconds(path, rows, n, d, "bf16", chunk=1000)
    assert seconds > roofline.gemm_bound_seconds(rows, n, d, "bf16", at_peak=True)
    forward = roofline.path_kernels(path, rows, n, d, "bf16", chunk=1000, gradients=False)
    assert sum(k.flops for k in forward) == pytest.approx(2.0 * rows * n * d)
    ideal = roofline.path_seconds(path, rows, n, d, "bf16", chunk=1000, at_peak=True)
    assert roofline.gemm_bound_seconds(rows, n, d, "bf16", at_peak=True) < ideal < seconds


def test_matryoshka_does_the_three_gemms_of_one_loss_and_moves_m_times_its_row_bytes():
    rows, n, dims = 4097, 8194, (64, 128, 256, 1000)
    kernels = roofline.matryoshka_kernels(rows, n, dims, "tf32", chunk=1000)
    assert sum(k.flops for k in kernels) == pytest.approx(3 * 2.0 * rows * n * dims[-1])  # one pass over D, each
    single = roofline.path_kernels("chunked", rows, n, dims[-1], "tf32", chunk=1000)
    row_bytes = {k.name: k.bytes for k in kernels}["rows"]
    assert row_bytes > len(dims) * {k.name: k.bytes for k in single}["rows"]
    seconds = sum(k.seconds("tf32")[0] for k in kernels)
    assert seconds > roofline.path_seconds("chunked", rows, n, dims[-1], "tf32", chunk=1000)
    one_prefix = roofline.matryoshka_kernels(rows, n, dims[-1:], "tf32", chunk=1000)
    assert sum(k.seconds("tf32")[0] for k in one_prefix) < seconds


def test_the_fused_models_tiles_and_mode_switch_are_the_built_paths():
    """Its tiles are kernels/contrastive_loss_fused.FUSED_CONFIGS (grad_x's D block as the tile's N, its
    candidates per step as K; registers and shared memory: tests/test_compile.py), and it forms G where
    the chunk loop does: in the dX prologue up to PROLOGUE_MAX_DIM, in a G pass beyond it."""
    from mmfast.kernels.contrastive_loss_fused import FUSED_CONFIGS, PROLOGUE_MAX_DIM

    assert roofline.PROLOGUE_MAX_DIM == PROLOGUE_MAX_DIM
    for (kind, role), tile in roofline.FUSED_TILES.items():
        cfg = FUSED_CONFIGS[kind][role == "grad_x"]
        k, n = (cfg.block_n, cfg.block_k) if role == "grad_x" else (cfg.block_k, cfg.block_n)
        assert (tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages) == (
            cfg.block_m, n, k, cfg.num_warps, cfg.num_stages
        ), (kind, role)  # fmt: skip
    rows, n = 1000, 4000
    names = {d: [k.name for k in roofline.path_kernels("fused", rows, n, d, "bf16", 300)] for d in (512, 528)}
    assert names[512] == ["scores", "lse_merge", "grad_x_prologue", "grad_y"]
    assert names[528] == ["scores", "lse_merge", "grads", "grad_x", "grad_y"]
    # A margin needs s_pos before the tiles: the float64 positive pass comes first.
    with_margin = roofline.path_kernels("fused", rows, n, 528, "bf16", 300, margin=True)
    assert [k.name for k in with_margin] == ["positive", *names[528]]
    switched = roofline.path_kernels("fused", rows, n, 512, "bf16", 300, prologue_max_dim=0)
    assert [k.name for k in switched] == names[528]
    # The prologue forms G once per 256-column D block: 2 blocks' exps and 32 instructions per score each,
    # and it is issue-bound at ~1.85× its GEMM at peak (the 3.3e13 lane-instructions/s of the docstring).
    prologue = next(k for k in roofline.path_kernels("fused", rows, n, 512, "bf16", 300, at_peak=True)
                    if k.name == "grad_x_prologue")  # fmt: skip
    assert prologue.exps == 2 * rows * n and prologue.instructions == 32 * 2 * rows * n
    assert roofline.H100.issue_per_s == pytest.approx(3.345e13, rel=1e-3)
    assert prologue.issue_seconds == pytest.approx(1.85 * prologue.compute_seconds, rel=0.01)
    with_ids = roofline.path_kernels("fused", rows, n, 512, "bf16", 300, ids=True)
    assert next(k for k in with_ids if k.name == "grad_x_prologue").instructions == 44 * 2 * rows * n


def test_the_fused_score_epilogue_at_one_cta_per_sm_adds_to_its_gemm():
    tile = roofline.FUSED_TILES[("tensor_core", "scores")]
    assert roofline.occupancy(tile) == 1
    scores = roofline.path_kernels("fused", 4096, 8192, 1024, "bf16", 4096)[0]
    assert scores.name == "scores" and scores.serial_epilogue
    assert scores.seconds("bf16") == (pytest.approx(scores.compute_seconds + scores.issue_seconds), "compute+epilogue")


def test_choose_path_picks_the_cheapest_candidate():
    args = (32768, 4 * 32768, 1024, "bf16", 1365)
    best = roofline.choose_path(*args, candidates=roofline.PATHS)
    assert roofline.path_seconds(best, *args) == min(roofline.path_seconds(p, *args) for p in roofline.PATHS)


def test_auto_keeps_the_chunked_path_off_sm90_and_a_forced_path_is_checked(monkeypatch):
    kernels = mmfast.backends.contrastive_loss.contrastive_kernels("triton")
    opts = DirectionOptions.of(0.05, 0.0, None, None)
    args = (64, 128, 32, torch.float32, opts)
    assert kernels.path(*args, chunk=64, device=torch.device("cpu")) == "chunked"
    monkeypatch.setenv(PATH_VARIABLE, "cublas")
    assert kernels.path(*args, chunk=64, device=torch.device("cpu")) == "cublas"
    monkeypatch.setenv(PATH_VARIABLE, "fastest")
    q = torch.randn(3, 8)
    with pytest.raises(ValueError, match=PATH_VARIABLE):
        mmfast.contrastive_loss(q, q.clone(), backend="triton")

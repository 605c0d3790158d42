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
    big = roofline.tile_fraction(roofline.MATMUL_TILES[("hopper", "plain")], 8192, 8192, "bf16")
    small = roofline.tile_fraction(roofline.MATMUL_TILES[("tensor_core", "plain")], 8192, 8192, "bf16")
    assert big["fraction"] > small["fraction"]
    # 172 registers × 256 threads: one CTA per SM; 128 × 256 threads at 128 registers: two.
    assert roofline.occupancy(roofline.MATMUL_TILES[("hopper", "accumulate")]) == 1
    assert roofline.occupancy(roofline.MATMUL_TILES[("tensor_core", "plain")]) == 2


def test_wave_quantisation_counts_the_idle_slots_of_the_last_wave():
    assert roofline.wave_efficiency(128 * 132, 128, 128, 128, 1) == 1.0
    assert roofline.wave_efficiency(128 * 133, 128, 128, 128, 1) == pytest.approx(133 / 264)


@pytest.mark.parametrize("path", roofline.PATHS)
def test_every_path_does_the_three_gemms_and_is_above_the_peak_bound(path):
    rows, n, d = 4097, 8194, 1000
    kernels = roofline.path_kernels(path, rows, n, d, "bf16", chunk=1000)
    assert sum(k.flops for k in kernels) == pytest.approx(3 * 2.0 * rows * n * d)
    seconds = roofline.path_seconds(path, rows, n, d, "bf16", chunk=1000)
    assert seconds > roofline.gemm_bound_seconds(rows, n, d, "bf16", at_peak=True)
    forward = roofline.path_kernels(path, rows, n, d, "bf16", chunk=1000, gradients=False)
    assert sum(k.flops for k in forward) == pytest.approx(2.0 * rows * n * d)


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

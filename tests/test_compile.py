"""Every Triton kernel variant compiles ahead of time for sm_80 and sm_90, without a GPU.

Runs `python -m mmfast.kernels.aot` in a subprocess: the tests' own process has TRITON_INTERPRET=1,
which replaces @triton.jit functions with interpreted ones that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-m", "mmfast.kernels.aot", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.exists(), f"the AOT compile did not run:\n{run.stderr[-3000:]}"
    results = json.loads(out.read_text())
    print("\nkernel | arch | registers | spill stores | shared | wgmma")
    for r in results:
        print(r["kernel"], r["arch"], r.get("registers"), r.get("spill_store_bytes"), r.get("shared_bytes"),
              r.get("wgmma"), r.get("error", ""), sep=" | ")  # fmt: skip
    return results


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    errors = [f"{r['kernel']} {r['arch']}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)
    # Every variant is compiled for sm_90; the Hopper-only tiles (kernels/matmul.py CONFIG_MIN_ARCH) are
    # not compiled for sm_80, where they never launch.
    assert {r["kernel"] for r in compiled if r["arch"] == "sm_90"} == {r["kernel"] for r in compiled}
    sm80_only_missing = {r["kernel"] for r in compiled} - {r["kernel"] for r in compiled if r["arch"] == "sm_80"}
    assert sm80_only_missing and all(",hopper" in name for name in sm80_only_missing), sorted(sm80_only_missing)
    names = {r["kernel"] for r in compiled}
    for kernel in ("matmul[", "contrastive_softmax_rows[", "contrastive_fused_scores[", "contrastive_fused_grad_x[",
                   "contrastive_fused_grads[", "contrastive_matryoshka_rows[", "similarity_topk[", "sigmoid_pair_rows[",
                   "late_interaction_maxsim[", "late_interaction_grad_query[", "late_interaction_grad_documents[",
                   "late_interaction_topk_maxsim["):  # fmt: skip
        assert any(n.startswith(kernel) for n in names), kernel


def test_no_variant_spills_registers(compiled):
    spilled = [f"{r['kernel']} {r['arch']}: {r['spill_store_bytes']} B" for r in compiled if r.get("spilled")]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_tensor_core_gemms_use_wgmma_on_sm90_and_mma_on_sm80(compiled):
    for r in compiled:
        gemm = r["kernel"].startswith(("matmul[", "contrastive_fused_scores[", "contrastive_fused_grad_x["))
        tensor_core = gemm and ("bf16," in r["kernel"] or "fp16," in r["kernel"])
        if tensor_core:
            assert r["wgmma"] if r["arch"] == "sm_90" else r["mma_sync"], r


def test_cost_model_tiles_match_the_compiled_resources(compiled):
    """mmfast.kernels.roofline prices each GEMM config by its sm_90 registers and shared memory (its
    occupancy): they must be the compiled ones, the worst over roles and 16-bit dtypes (TF32 for the
    *_tf32 entry, full fp32 for "fp32")."""
    from mmfast.kernels.matmul import MATMUL_CONFIGS
    from mmfast.kernels.roofline import MATMUL_TILES

    for (name, role), tile in MATMUL_TILES.items():
        config, dtypes = name.removesuffix("_tf32"), ("fp32",) if name.startswith("tensor_core_tf32") else None
        dtypes = dtypes or (("fp32",) if config == "fp32" else ("bf16", "fp16"))
        variants = [(r, r["kernel"].removeprefix("matmul[").rstrip("]").split(",")) for r in compiled]
        matches = [
            r for r, fields in variants
            if r["arch"] == "sm_90" and r["kernel"].startswith("matmul[") and fields[2] == config
            and fields[1] in dtypes and fields[3] == ("acc=1" if role == "accumulate" else "acc=0")
        ]  # fmt: skip
        assert matches, (name, role)
        cfg = MATMUL_CONFIGS[config]
        assert (tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages) == (
            cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages
        ), name  # fmt: skip
        assert tile.registers == max(r["registers"] for r in matches), (name, role)
        assert tile.shared_bytes == max(r["shared_bytes"] for r in matches), (name, role)


def test_fused_cost_model_tiles_match_the_compiled_resources(compiled):
    """The fused path's tiles in mmfast.kernels.roofline (their shapes: tests/test_roofline.py) carry the
    sm_90 registers and shared memory of kernels/contrastive_loss_fused.py's variants, the worst over
    ids / τ and the dtypes of the config (bf16/fp16; TF32; full fp32)."""
    from mmfast.kernels.roofline import FUSED_TILES

    dtypes = {"tensor_core": ("bf16,ieee", "fp16,ieee"), "tf32": ("fp32,tf32",), "fp32": ("fp32,ieee",)}
    for (kind, role), tile in FUSED_TILES.items():
        matches = [r for r in compiled if r["arch"] == "sm_90" and r["kernel"].startswith(f"contrastive_fused_{role}[")
                   and r["kernel"].split("[")[1].startswith(dtypes[kind])]  # fmt: skip
        assert matches, (kind, role)
        assert tile.registers == max(r["registers"] for r in matches), (kind, role)
        assert tile.shared_bytes == max(r["shared_bytes"] for r in matches), (kind, role)


def test_late_interaction_cost_model_tiles_match_the_compiled_resources(compiled):
    """mmfast.kernels.roofline_late_interaction prices the MaxSim kernel by its configs' sm_90 registers
    and shared memory: the compiled ones (the worst over bf16/fp16 for the 16-bit tile)."""
    from mmfast.kernels.late_interaction_loss import MAXSIM_CONFIGS
    from mmfast.kernels.roofline_late_interaction import MAXSIM_TILES

    for (kind, tile), low_precision in zip(MAXSIM_TILES.items(), (True, False), strict=True):
        names = ("bf16", "fp16") if low_precision else ("fp32",)
        matches = [r for r in compiled if r["arch"] == "sm_90" and r["kernel"] in
                   [f"late_interaction_maxsim[{name}]" for name in names]]  # fmt: skip
        cfg = MAXSIM_CONFIGS[low_precision]
        assert (tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages) == (
            cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages), kind  # fmt: skip
        assert tile.registers == max(r["registers"] for r in matches), kind
        assert tile.shared_bytes == max(r["shared_bytes"] for r in matches), kind

"""GPU report without a GPU: compile every Triton kernel variant for sm_80 and sm_90 and estimate
H100 times from a roofline.

    python benchmarks/gpu_report.py [--json benchmarks/results/gpu_report.json]
                                    [--text benchmarks/results/gpu_report.txt]

--text writes the printed report and nothing else: warnings (Triton's, say) go to stderr, never
into a results file.

Part 1, per kernel variant and target: registers, spilled bytes (ptxas -v), shared memory, and
whether the tensor-core path is wgmma (sm_90) or mma.sync (sm_80). See kernels/aot.py (installed as
mmfast.kernels.aot, run as `python -m mmfast.kernels.aot`).

Part 3: the pooling ops are memory-bound; their bytes against naive PyTorch's.

Part 4: similarity_topk, its GEMM at peak plus its merge's CUDA-core operations.

Part 5: late_interaction_loss's Triton backend, fwd+bwd (mmfast.kernels.roofline_late_interaction):
the fused MaxSim GEMM, the backward's sort, gather and segmented sum, against the bare token-score
GEMM and colpali-engine's einsum path.

Part 2, the cost model (mmfast.kernels.roofline, which also drives the triton backend's "auto"
path): each GEMM config's fraction of H100 peak (shared-memory feed, L2, latency at its compiled
occupancy, waves, sustained clocks; its docstring gives the sources and assumptions), then per loss
evaluation (forward + backward, reduction "mean") every kernel of each path (chunked Triton GEMMs,
cuBLAS GEMMs, the fused path as built) with its FLOPs, bytes, exps, instructions and predicted time
max(FLOPs / (peak × fraction), bytes / bandwidth, exps / MUFU rate, instructions / issue rate), the
same with every GEMM at peak, against the three GEMMs at cuBLAS's rate and at peak; then the fused
path's two ways of forming G (the dX prologue, the G pass) against D. Estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mmfast.backends.chunked import chunk_rows
from mmfast.kernels import roofline, roofline_late_interaction

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
H100 = {name: roofline.H100.peak(name) for name in ("bf16", "tf32", "fp32")} | {
    "bandwidth": roofline.H100.hbm_bytes_per_s
}


def contrastive_roofline(b: int, k: int, d: int, dtype: str) -> dict:
    """One plain fwd+bwd (mean) of the loss on each path of the Triton backend, from the cost model
    (mmfast.kernels.roofline), with the chunk rows each path's chunk loop would use on CUDA."""
    from mmfast.kernels.contrastive_loss import TritonContrastiveKernels  # imports triton: after main()'s setup

    n = b * (1 + k)
    dense, fused = TritonContrastiveKernels.dense_bytes_per_score, TritonContrastiveKernels.fused_bytes_per_score
    per_score = {"chunked": dense, "cublas": dense, "fused": fused[TORCH_DTYPES[dtype]]}
    cuda = torch.device("cuda")
    out = {"B": b, "K": k, "D": d, "dtype": dtype, "paths": {}}
    for path in roofline.PATHS:
        rows = chunk_rows(b, n, per_score[path], torch.float32, cuda)
        kernels = {}
        for kernel in roofline.path_kernels(path, b, n, d, dtype, rows):
            seconds, bound = kernel.seconds(dtype)
            kernels[kernel.name] = {"gflop": kernel.flops / 1e9, "gbyte": kernel.bytes / 1e9,
                                    "gexp": kernel.exps / 1e9, "ginstr": kernel.instructions / 1e9,
                                    "fraction_of_peak": kernel.fraction(dtype), "ms": 1e3 * seconds,
                                    "gemm_ms": 1e3 * kernel.compute_seconds, "bound": bound}  # fmt: skip
        at_peak = 1e3 * roofline.path_seconds(path, b, n, d, dtype, rows, at_peak=True)
        out["paths"][path] = {"chunk_rows": rows, "kernels": kernels, "gemms_at_peak_ms": at_peak,
                              "predicted_ms": sum(k["ms"] for k in kernels.values())}  # fmt: skip
    out["chunk_rows"] = out["paths"]["chunked"]["chunk_rows"]
    out["gemm_bound_ms"] = 1e3 * roofline.gemm_bound_seconds(b, n, d, dtype)
    out["gemm_bound_at_peak_ms"] = 1e3 * roofline.gemm_bound_seconds(b, n, d, dtype, at_peak=True)
    out["auto"] = roofline.choose_path(b, n, d, dtype, out["chunk_rows"])
    out["fastest"] = min(roofline.PATHS, key=lambda path: out["paths"][path]["predicted_ms"])
    return out


def emit_contrastive(emit, report) -> None:
    emit("\nH100 cost model, plain contrastive loss fwd+bwd, per path of the triton backend (estimates; ms)")
    emit("  chunked = Triton GEMMs + Triton row kernel, cublas = torch.mm GEMMs + Triton row kernel, fused =")
    emit("  the fused path as built (Triton score GEMM + epilogue, G pass or dX prologue, cuBLAS GEMMs on G);")
    emit('  bound = the 3 GEMMs at cuBLAS\'s 0.75 of peak / at peak; auto = what "auto" runs (chunked or')
    emit("  cublas: fused is forced only); fastest = the model's fastest of all three")
    emit("B      K  D     dtype chunk  chunked  cublas   fused    bound  @peak   chunked/bound  cublas/bound  "
         "fused/bound  auto     fastest")  # fmt: skip
    report["roofline"] = []
    for b in (4096, 32768):
        for k in (0, 1, 3):
            for d in (512, 1024, 4096):
                for dtype in ("bf16", "fp32"):
                    r = contrastive_roofline(b, k, d, dtype)
                    report["roofline"].append(r)
                    ms = [r["paths"][path]["predicted_ms"] for path in roofline.PATHS]
                    times = " ".join(f"{m:8.2f}" for m in ms)
                    bound = r["gemm_bound_ms"]
                    emit(f"{b:<6d} {k}  {d:<5d} {dtype:5s} {r['chunk_rows']:5d} {times} {bound:8.2f} "
                          f"{r['gemm_bound_at_peak_ms']:6.2f}   {ms[0] / bound:13.2f}  {ms[1] / bound:12.2f}  "
                          f"{ms[2] / bound:11.2f}  {r['auto']:8s} {r['fastest']}")  # fmt: skip
    emit("  (fp32 rows: full-precision fp32 GEMMs, torch's default; bf16 peak 989, fp32 67 TFLOP/s)")
    for b, k, d in ((4096, 1, 4096), (32768, 3, 1024)):
        r = next(x for x in report["roofline"] if (x["B"], x["K"], x["D"], x["dtype"]) == (b, k, d, "bf16"))
        emit(f"\nB = {b}, K = {k}, D = {d}, bf16, {r['chunk_rows']} rows per chunk: per kernel")
        emit("path     kernel            GFLOP     GB   Gexp  Ginstr  of peak      ms  bound")
        for path in roofline.PATHS:
            for name, kern in r["paths"][path]["kernels"].items():
                fraction = f"{kern['fraction_of_peak']:8.2f}" if kern["gflop"] else "       -"
                emit(f"{path:8s} {name:15s} {kern['gflop']:7.0f} {kern['gbyte']:6.2f} {kern['gexp']:6.2f} "
                      f"{kern['ginstr']:7.1f} {fraction} {kern['ms']:7.2f}  {kern['bound']}")  # fmt: skip
            total, peak = r["paths"][path]["predicted_ms"], r["paths"][path]["gemms_at_peak_ms"]
            emit(f"{path:8s} total {total:62.2f}  = {total / r['gemm_bound_ms']:.2f}× the GEMM bound "
                  f"({r['gemm_bound_ms']:.2f} ms), {total / r['gemm_bound_at_peak_ms']:.2f}× at peak")  # fmt: skip
            emit(f"{path:8s} every GEMM at peak {peak:49.2f}  = {peak / r['gemm_bound_at_peak_ms']:.2f}× the "
                  f"GEMMs at peak ({r['gemm_bound_at_peak_ms']:.2f} ms)")  # fmt: skip
        added = sum(max(0.0, k["ms"] - k["gemm_ms"]) for k in r["paths"]["fused"]["kernels"].values())
        floor = r["gemm_bound_ms"] + added
        r["paths"]["fused"]["floor_ms"] = floor
        emit(f"fused    floor: the bound + its work beyond its GEMMs ({added:.2f} ms) {floor:19.2f}  = "
             f"{floor / r['gemm_bound_ms']:.2f}× the GEMM bound (every GEMM at cuBLAS's rate)")  # fmt: skip
        emit(f"auto runs: {r['auto']}; the model's fastest: {r['fastest']}")
    emit_fused_modes(emit, report)


def emit_fused_modes(emit, report) -> None:
    """The fused path's two ways of forming G against D: the chunk loop takes the prologue up to
    PROLOGUE_MAX_DIM."""
    emit(f"\nFused path, bf16: dX in the prologue vs the G pass + a dX GEMM (ms; the chunk loop takes the prologue "
         f"for D <= {roofline.PROLOGUE_MAX_DIM})")  # fmt: skip
    emit("B      K  D     prologue  G pass   | every GEMM at peak: prologue  G pass")
    report["fused_modes"] = []
    for b, k in ((4096, 1), (32768, 3)):
        n = b * (1 + k)
        rows = chunk_rows(b, n, 6, torch.float32, torch.device("cuda"))
        for d in (256, 512, 768, 1024, 2048):
            ms = {f"{mode}{'_at_peak' if peak else ''}_ms": 1e3 * roofline.path_seconds(
                "fused", b, n, d, "bf16", rows, at_peak=peak, prologue_max_dim=limit)
                for peak in (False, True) for mode, limit in (("prologue", d), ("grads", 0))}  # fmt: skip
            report["fused_modes"].append({"B": b, "K": k, "D": d, "chunk_rows": rows, **ms})
            emit(f"{b:<6d} {k}  {d:<5d} {ms['prologue_ms']:8.2f}  {ms['grads_ms']:7.2f}  |"
                 f" {ms['prologue_at_peak_ms']:28.2f}  {ms['grads_at_peak_ms']:6.2f}")  # fmt: skip


def emit_tiles(emit, report) -> None:
    emit("\nGEMM tiles on H100 (cost model): fraction of bf16 peak on an 8192 × 8192 output, and its limits")
    emit("config             role       tile            regs  smem KiB  CTAs/SM  sustained  smem   L2  latency  waves"
         "  fraction")  # fmt: skip
    report["tiles"] = []
    tiles = [(name, role, tile, {}) for (name, role), tile in roofline.MATMUL_TILES.items()]
    tiles += [(f"fused:{kind}", role, tile, {"a_bytes": 4, "a_in_registers": True} if role == "grad_x" else {})
              for (kind, role), tile in roofline.FUSED_TILES.items()]  # fmt: skip
    for name, role, tile, operands in tiles:
        kind = name.removeprefix("fused:")
        precision = "fp32" if kind == "fp32" else "tf32" if kind.endswith("tf32") else "bf16"
        r = roofline.tile_fraction(tile, 8192, 8192, precision, **operands)
        report["tiles"].append({"config": name, "role": role, **r})
        shape = f"{tile.block_m}×{tile.block_n}×{tile.block_k}/{tile.num_stages}st"
        smem = f"{r['shared_memory']:5.2f}" if "shared_memory" in r else "    -"
        resources = f"{tile.registers:4d} {tile.shared_bytes / 1024:9.0f} {r['occupancy']:8d}"
        limits = f"{r['sustained']:10.2f} {smem} {r['l2']:4.2f} {r['latency']:8.2f} {r['waves']:6.2f}"
        emit(f"{name:18s} {role:10s} {shape:14s} {resources} {limits} {r['fraction']:9.2f}")
    emit("  (fused grad_x: M = rows, N = its D block, K = candidates per step; its A operand is the float32 S,")
    emit("  turned into G in registers)")
    emit(f"  (fp32 and tf32 rows against their own peaks; cuBLAS is priced at {roofline.CUBLAS_FRACTION} of peak)")


def pooling_roofline(b: int, t: int, d: int, dtype: str, mode: str, real: float = 0.75) -> dict:
    """Bytes of the fused pooling (fwd, bwd) and of the naive PyTorch version; all memory-bound.
    `real` is the share of real tokens."""
    e = 2 if dtype in ("bf16", "fp16") else 4
    mask = 4.0 * b * t
    if mode == "last":
        fused_fwd = mask + b * d * (e + 4 + e)  # one row read; float32 unit + output written
        naive_fwd = 8.0 * b * t + 4.0 * b * d * e  # index math over the mask, gather, normalize passes
    else:
        fused_fwd = mask + real * b * t * d * e + b * d * (4 + e)  # padding rows are never loaded
        naive_fwd = 3.0 * b * t * d * e  # hidden·mask written, then read back by the sum
    fused_bwd = b * t * d * e + b * d * (e + 8)  # the dense gradient, written once
    naive_bwd = (b * t * d * e) * (1 if mode == "last" else 3)  # zeros + index_put | mul, expand, write
    us = 1e6 / H100["bandwidth"]
    return {"B": b, "T": t, "D": d, "dtype": dtype, "mode": mode,
            "fused_us": us * (fused_fwd + fused_bwd), "naive_us": us * (naive_fwd + naive_bwd)}  # fmt: skip


# CUDA-core operations per score of kernels/similarity_topk.py, from counting its operations (int64
# as two int32) and simulating its merge on random unit vectors (D = 512, 64-row blocks, 16 slots):
# every tile pays ~8 (rank count, row max); a tile holding a new top-16 entry adds ~18 (keys) and 8
# per merge step. A split of 2 500 items merges every tile, 5.2 steps each: ~67 per score; a split
# of 250 000 items merges 49% of its tiles, 2.1 steps each: ~25.
H100_INT32_OPS = 132 * 64 * 1.98e9  # 64 INT32 lanes per SM per clock at the boost clock


def similarity_topk_roofline(q: int, g: int, d: int, dtype: str, ops_per_score: float) -> dict:
    """The fused search: one GEMM whose tiles stay in registers, then the merge on CUDA cores (not
    overlapped, so an upper bound). Bytes: query and gallery read once (L2 reuse across a split's
    query blocks) and ~4 splits × 16 int64 keys written per query."""
    e = 2 if dtype in ("bf16", "fp16") else 4
    gemm_ms = 1e3 * 2.0 * q * g * d / (H100["bf16"] if e == 2 else H100["fp32"])  # fp32 runs ieee, on FMA
    merge_ms = 1e3 * q * g * ops_per_score / H100_INT32_OPS
    memory_ms = 1e3 * ((q + g) * d * e + q * 4 * 16 * 8) / H100["bandwidth"]
    predicted_ms = max(gemm_ms + merge_ms, memory_ms)
    return {"Q": q, "G": g, "D": d, "dtype": dtype, "ops_per_score": ops_per_score, "gemm_ms": gemm_ms,
            "merge_ms": merge_ms, "memory_ms": memory_ms, "predicted_ms": predicted_ms}  # fmt: skip


def emit_late_interaction(emit, report) -> None:
    model = roofline_late_interaction
    emit("\nH100 roofline, late_interaction_loss fwd+bwd, triton backend (estimates; ms; L_q 32, L_d 1,030, D 128,")
    emit("  N = B documents): maxsim = the fused GEMM + max/arg-max epilogue, then the backward's sort,")
    emit("  grad_query gather and grad_documents segmented sum; gemm = the bare token-score GEMM at cuBLAS's")
    emit("  0.75 of peak; einsum = colpali-engine's path (3 GEMMs or its token scores' traffic)")
    emit("B      dtype  maxsim    sort  grad_q  grad_d   total    gemm  total/gemm  einsum")
    report["late_interaction_roofline"] = []
    for b in (64, 256, 1024):
        for dtype in ("bf16", "fp32"):
            shape = (b, b, 32, 1030, 128, dtype)
            times = {k.name: k.seconds(dtype)[0] * 1e3 for k in model.late_interaction_kernels(*shape)}
            total, gemm = sum(times.values()), model.bare_gemm_seconds(*shape) * 1e3
            einsum = model.einsum_seconds(*shape) * 1e3
            report["late_interaction_roofline"].append({"B": b, "dtype": dtype, **times, "total_ms": total,
                                                        "gemm_ms": gemm, "einsum_ms": einsum})  # fmt: skip
            parts = " ".join(f"{times[name]:7.2f}" for name in ("maxsim", "sort", "grad_query", "grad_documents"))
            emit(f"{b:<6d} {dtype:5s} {parts} {total:7.2f} {gemm:7.2f} {total / gemm:11.2f} {einsum:7.2f}")


def emit_matryoshka(emit, report) -> None:
    """Matryoshka at dims 64…D on the Triton backend (segment GEMMs + kernels/contrastive_loss_matryoshka.py's
    row kernel, float32 blocks: tf32 GEMMs) against one loss at D on its chunked path, same precision."""
    from mmfast.kernels.contrastive_loss import TritonContrastiveKernels  # imports triton: after main()'s setup

    emit(
        "\nH100 roofline, Matryoshka contrastive loss fwd+bwd, one direction, tf32 (estimates; "
        "kernels/roofline.matryoshka_kernels)"
    )
    emit("B      K  D     dims                     one loss ms  Matryoshka ms  ratio  bound of the row kernel")
    report["matryoshka_roofline"] = []
    for b, k, d in ((4096, 1, 1024), (32768, 3, 1024)):
        dims = tuple(64 << i for i in range((d // 64).bit_length()))
        n = b * (1 + k)
        # The chunk loop's rows (the Triton set's dense scratch per score in the CUDA budget), for both.
        chunk = chunk_rows(b, n, TritonContrastiveKernels.dense_bytes_per_score, torch.float32, torch.device("cuda"))
        single = roofline.path_seconds("chunked", b, n, d, "tf32", chunk)
        kernels = roofline.matryoshka_kernels(b, n, dims, "tf32", chunk)
        fused = sum(kernel.seconds("tf32")[0] for kernel in kernels)
        row_bound = next(kernel.seconds("tf32")[1] for kernel in kernels if kernel.name == "rows")
        report["matryoshka_roofline"].append({"B": b, "K": k, "D": d, "dims": list(dims), "single_ms": 1e3 * single,
                                              "matryoshka_ms": 1e3 * fused, "ratio": fused / single})  # fmt: skip
        emit(
            f"{b:<6d} {k}  {d:<5d} {str(dims):24s} {1e3 * single:11.2f}  {1e3 * fused:13.2f}  "
            f"{fused / single:5.2f}  {row_bound}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--text", type=Path, help="also write the printed report here")
    parser.add_argument("--skip-compile", action="store_true", help="only the roofline part")
    args = parser.parse_args(argv)
    report = {"compiled": [], "roofline": []}
    lines = []

    def emit(line: str = "") -> None:  # a line of the report: to stdout, and kept for --text
        lines.append(line)
        print(line, flush=True)

    if not args.skip_compile:
        os.environ.pop("TRITON_INTERPRET", None)
        from mmfast.kernels.aot import ARCHS, all_specs, compile_spec

        emit("kernel variant                                              arch   regs spill  smem KiB  tensor cores")
        for spec in all_specs():
            for arch in (a for a in ARCHS if a in spec.archs):
                r = compile_spec(spec, arch)
                report["compiled"].append(r)
                cores = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "-"
                emit(f"{r['kernel']:59s} {r['arch']}  {r['registers']:4d} {r['spill_store_bytes']:5d} "
                      f"{r['shared_bytes'] / 1024:8.0f}  {cores}")  # fmt: skip
    emit_tiles(emit, report)
    emit_contrastive(emit, report)
    emit("\nH100 roofline, distillation fwd+bwd, bf16 (estimates): teacher GEMM + student's three + row kernel")
    report["distillation_roofline"] = []
    for b, d, d_teacher in ((4096, 1536, 4096), (32768, 1536, 4096)):
        gemm = 2.0 * b * b * (d_teacher + 3 * d)
        row_bytes = b * b * (4 + 4) * 2 + 2 * b * b  # two float32 blocks read twice, G written once
        ms = 1e3 * (gemm / H100["bf16"] + row_bytes / H100["bandwidth"])
        report["distillation_roofline"].append({"B": b, "D": d, "D_teacher": d_teacher, "predicted_ms": ms})
        emit(f"B={b} D_s={d} D_t={d_teacher}: {ms:.2f} ms (GEMMs alone at peak: {1e3 * gemm / H100['bf16']:.2f} ms)")
    emit_matryoshka(emit, report)
    emit("\nH100 roofline, sigmoid (SigLIP) loss fwd+bwd, bf16 (estimates): three GEMMs + row kernel")
    report["sigmoid_roofline"] = []
    for b, d in ((4096, 1024), (16384, 1024), (32768, 1152)):
        gemm = 3 * 2.0 * b * b * d
        # The float32 scores read once, a bf16 G written once; its exp, log and reciprocal per score take
        # the SFUs (16/SM/clock) under half that memory time.
        row_bytes = b * b * (4 + 2)
        ms = 1e3 * (gemm / H100["bf16"] + row_bytes / H100["bandwidth"])
        report["sigmoid_roofline"].append({"B": b, "D": d, "predicted_ms": ms})
        emit(f"B={b} D={d}: {ms:.2f} ms (GEMMs alone at peak: {1e3 * gemm / H100['bf16']:.2f} ms)")
    emit("\nH100 roofline, pooling fwd+bwd (memory-bound; 75% real tokens; estimates)")
    emit("mode  dtype  B     T     D      fused us  naive us")
    report["pooling_roofline"] = []
    for mode in ("last", "mean"):
        for dtype in ("bf16", "fp32"):
            for b, t, d in ((64, 1024, 1536), (256, 2048, 4096)):
                r = pooling_roofline(b, t, d, dtype, mode)
                report["pooling_roofline"].append(r)
                emit(f"{mode:5s} {dtype:5s}  {b:<5d} {t:<5d} {d:<5d}  {r['fused_us']:8.1f}  {r['naive_us']:8.1f}")
    emit("\nH100 roofline, similarity_topk, k <= 16 (estimates; the GEMM and the merge not overlapped)")
    emit("Q      G        D    dtype  GEMM ms  merge ms  memory ms  predicted ms")
    report["similarity_topk_roofline"] = []
    for q, g, ops in ((25000, 5000, 67), (10000, 1000000, 25)):
        for dtype in ("bf16", "fp32"):
            r = similarity_topk_roofline(q, g, 512, dtype, ops)
            report["similarity_topk_roofline"].append(r)
            emit(f"{q:<6d} {g:<8d} 512  {dtype:5s}  {r['gemm_ms']:7.2f}  {r['merge_ms']:8.2f}  {r['memory_ms']:9.2f}  "
                  f"{r['predicted_ms']:12.2f}")  # fmt: skip
    emit_late_interaction(emit, report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.text:
        args.text.parent.mkdir(parents=True, exist_ok=True)
        args.text.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

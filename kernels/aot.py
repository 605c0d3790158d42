"""Ahead-of-time compilation of every Triton kernel variant, without a GPU.

    python -m mmfast.kernels.aot [--arch 80 90] [--json out.json]

Each kernel module lists the variants it can launch (`compile_specs()`). For each variant and each
target (sm_80, sm_90) this compiles a cubin with triton.compile(ASTSource(...), GPUTarget(...)) and
reads its resources with Triton's bundled ptxas (-v): registers, spill stores/loads, stack frame;
plus the shared memory Triton allocates and whether the PTX uses wgmma (sm_90) or mma.sync.
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmfast.kernels import (
    contrastive_loss,
    contrastive_loss_fused,
    contrastive_loss_matryoshka,
    distillation_loss,
    late_interaction_loss,
    late_interaction_loss_grads,
    late_interaction_topk,
    matmul,
    pooling,
    sigmoid_loss,
    similarity_topk,
)
from mmfast.kernels.compile_spec import CompileSpec

ARCHS = (80, 90)


def all_specs() -> list[CompileSpec]:
    """Every kernel module's variants: a new kernel module is listed here."""
    return [*matmul.compile_specs(), *contrastive_loss.compile_specs(), *contrastive_loss_fused.compile_specs(),
            *contrastive_loss_matryoshka.compile_specs(),
            *distillation_loss.compile_specs(), *pooling.compile_specs(), *similarity_topk.compile_specs(),
            *sigmoid_loss.compile_specs(), *late_interaction_loss.compile_specs(),
            *late_interaction_loss_grads.compile_specs(), *late_interaction_topk.compile_specs()]  # fmt: skip


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(ptx: str, arch: int) -> dict:
    """Registers, spills and stack from ptxas -v on the kernel's PTX (Triton's bundled ptxas)."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run(
            [_tool("ptxas-blackwell"), "-v", f"--gpu-name={gpu}", "-O3", f.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip

    def number(pattern: str) -> int:
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
    }


def compile_spec(spec: CompileSpec, arch: int) -> dict:
    start = time.perf_counter()
    divisible = {(spec.kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.divisible_by_16}
    source = ASTSource(spec.kernel, spec.signature, spec.constexprs, divisible)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = compiled.asm["ptx"]
    usage = resource_usage(ptx, arch)
    return {
        "kernel": spec.name,
        "arch": f"sm_{arch}",
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "aligned": bool(spec.divisible_by_16),
        **usage,
        "spilled": usage["spill_store_bytes"] > 0 or usage["spill_load_bytes"] > 0,
        "shared_bytes": compiled.metadata.shared,
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "compile_seconds": round(time.perf_counter() - start, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--json", type=Path, help="write the results here (default: stdout)")
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: AOT compilation needs the real @triton.jit functions")
    results, failures = [], 0
    for spec in all_specs():
        if args.filter not in spec.name:
            continue
        for arch in (a for a in args.arch if a in spec.archs):
            try:
                results.append(compile_spec(spec, arch))
            except Exception as error:  # report every failure, not just the first
                failures += 1
                results.append({"kernel": spec.name, "arch": f"sm_{arch}", "error": f"{type(error).__name__}: {error}"})
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    print(f"compiled {len(results) - failures} / {len(results)} kernel variants", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

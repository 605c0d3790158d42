"""Timing and peak-memory helpers shared by the benchmark CLIs (benchmarks/<op>.py)."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmfast.backends.chunked import release_scratch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    # The 1-minute load average when the run starts: on a shared machine, other jobs skew the times.
    load = os.getloadavg()[0]
    cores = f"{os.cpu_count()} cores, {threads} threads, load {load:.1f}"
    return f"{datetime.date.today()} | {cpu}, {cores} | torch {torch.__version__}"


def write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def bench_step(benchmark, forward, backward, rounds: int) -> None:
    """One pytest-benchmark case: forward + backward, after a warm-up round."""
    benchmark.pedantic(lambda: (forward(), backward()), rounds=rounds, warmup_rounds=1)


def median_times(forward, backward, repeats: int) -> dict:
    """Median forward, backward and forward+backward milliseconds after one warm-up run."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        forward()
        mid = time.perf_counter()
        backward()
        end = time.perf_counter()
        if i:
            fwd.append(mid - start)
            bwd.append(end - mid)
        gc.collect()
    both = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {"fwd_ms": 1e3 * statistics.median(fwd), "bwd_ms": 1e3 * statistics.median(bwd),
            "fwd_bwd_ms": 1e3 * statistics.median(both)}  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def resident_peak_mib() -> float:
    """This process's resident high-water mark (VmHWM: interpreter, libraries, inputs and all)."""
    return _status_kib("VmHWM") / 1024


def peak_extra_mib(forward, backward, outputs) -> float:
    """Resident-memory high-water mark of forward+backward over what was resident before, minus the
    bytes of `outputs()` (the gradients the step must produce). Linux only (VmHWM, clear_refs).
    The chunk loops' kept CPU scratch is freed first, so the step's own scratch is counted."""
    release_scratch()
    gc.collect()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    forward()
    backward()
    peak = _status_kib("VmHWM")
    kept = sum(t.numel() * t.element_size() for t in outputs())
    return ((peak - baseline) * 1024 - kept) / 2**20


def timed_runs(run, outputs, repeats: int) -> dict:
    """`repeats` calls of run(): median wall and CPU milliseconds (the process's CPU time, the steadier
    on a shared machine), and the first call's extra peak memory (peak_extra_mib, `outputs()` being
    what it returns)."""
    times, cpu_times = [], []

    def timed():
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    extra = peak_extra_mib(timed, lambda: None, outputs)
    for _ in range(repeats - 1):
        timed()
    return {"ms": 1e3 * statistics.median(times), "cpu_ms": 1e3 * statistics.median(cpu_times), "runs": len(times),
            "extra_peak_mib": extra}  # fmt: skip


def peak_after_warmup(make_step, small_inputs: tuple, inputs: tuple, *, compiled: bool = False) -> dict:
    """{"extra_peak_mib": ...} of one fwd+bwd of `make_step(*inputs)` (a (forward, backward, grads)
    triple), after a warm-up that loads every kernel: on `small_inputs`, or for torch.compile'd code
    on `inputs` itself, which compiles at that very shape (dynamic=False) outside the measurement."""
    if not compiled:
        forward, backward, _ = make_step(*small_inputs)
        forward(), backward()
    forward, backward, grads = make_step(*inputs)
    if compiled:
        forward(), backward()
    return {"extra_peak_mib": peak_extra_mib(forward, backward, grads)}


def memory_in_subprocess(script: str, child_args: list[str], address_space_bytes: int | None = None) -> dict:
    """Runs `script --memory-child ...` in a fresh interpreter; returns its last JSON line. With
    `address_space_bytes`, the child runs under that RLIMIT_AS, so a step that needs more memory fails
    with an allocation error inside the child instead of pushing the shared machine into swap or the
    kernel's OOM killer."""

    def cap_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))

    run = subprocess.run([sys.executable, script, "--memory-child", *child_args], capture_output=True, text=True,
                         timeout=7200, preexec_fn=cap_address_space if address_space_bytes else None)  # fmt: skip
    if run.returncode:
        return {"extra_peak_mib": None, "memory_error": run.stderr.strip().splitlines()[-1:]}
    return json.loads(run.stdout.strip().splitlines()[-1])

"""Bytes per rank of mmfast.contrastive_loss(cross_device=True), on paper and counted on gloo, for the
backward's ways of summing the gathered gradient: the all-reduce it used before (the whole gradient,
each rank keeping its rows), the reduce-scatter (reduce_scatter_single), and all_to_all_single (what
mmfast uses on gloo).

    python benchmarks/contrastive_loss_cross_device.py --ranks 8 --batch 64 --negatives 1 --dim 256 \
        --json benchmarks/results/contrastive_loss_cross_device.json

Each rank runs one loss step per (symmetric, method) and records every collective it calls, in
forward and backward: the bytes of its input and output tensors as handed to torch.distributed, and
the bytes the process sent meanwhile, read from the kernel's count of bytes handed to write system
calls (/proc/self/io wchar: gloo's TCP transport sends with them; its receives are not counted there,
and in these symmetric collectives every rank receives what it sends). "paper" is the ring algorithm's
bytes sent per rank for a gathered gradient of n bytes over p ranks: all-reduce 2(p−1)/p·n,
reduce-scatter and all-to-all (p−1)/p·n, all-gather (p−1)/p·n of its output. Then --repeats timed
steps (forward + backward, ranks started together by a barrier; the median on rank 0). The ranks
share this machine's cores, so the times include waiting for the CPU: say the load next to them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmfast
import mmfast.distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_json  # noqa: E402
from report import cross_device_table  # noqa: E402

# reduce_scatter_single is torch 2.13's name for reduce_scatter_tensor (mmfast calls the one there is)
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "all_to_all_single")


def wire_bytes_sent() -> int:
    """Bytes this process (all its threads) has handed to write system calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class CollectiveLog:
    """Within `with`, every torch.distributed collective in COLLECTIVES is recorded, as a dict: phase
    (set by the caller), collective, input_bytes / output_bytes (the tensors as handed over), and
    sent_bytes (wire_bytes_sent during the call; the calls are synchronous)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.phase = ""
        self._originals: dict = {}

    def _wrap(self, name, original):
        def recorded(*args, **kwargs):
            before = wire_bytes_sent()
            result = original(*args, **kwargs)
            sent = wire_bytes_sent() - before
            output, given = (args[0], args[0]) if name == "all_reduce" else (args[0], args[1])
            self.calls.append({"phase": self.phase, "collective": name, "input_bytes": _nbytes(given),
                               "output_bytes": _nbytes(output), "sent_bytes": sent})  # fmt: skip
            return result

        return recorded

    def __enter__(self):
        for name in (name for name in COLLECTIVES if hasattr(dist, name)):
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._originals[name]))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def sum_to_owner_by_all_reduce(grad: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The backward before the reduce-scatter: every rank sums the whole gradient, keeps its rows."""
    grad = grad.contiguous().clone()
    dist.all_reduce(grad)
    start = sum(sizes[: dist.get_rank()])
    return grad[start : start + sizes[dist.get_rank()]]


METHODS = {
    "all_reduce (before)": sum_to_owner_by_all_reduce,
    "reduce-scatter": mmfast.distributed._sum_to_owner_by_reduce_scatter,
    "all_to_all_single (after, gloo)": mmfast.distributed._sum_to_owner_by_all_to_all,
}


def paper_bytes(world: int, batch: int, negatives: int, dim: int, itemsize: int, symmetric: bool) -> dict:
    """Ring bytes sent per rank: the gathered tensors' all-gathers, then their gradients' sums."""
    rows = world * batch * ((2 if symmetric else 1) + negatives)  # targets, queries, negatives (gathered rows)
    n = rows * dim * itemsize
    share = (world - 1) / world
    return {"forward_all_gather": share * n, "backward_all_reduce": 2 * share * n, "backward_reduce_scatter": share * n}


def one_step(local: dict, symmetric: bool) -> None:
    leaves = {k: v.clone().requires_grad_() for k, v in local.items()}
    loss = mmfast.contrastive_loss(leaves["query"], leaves["target"], leaves["negatives"], hardness=9.0,
                                   symmetric=symmetric, cross_device=True)  # fmt: skip
    loss.backward()


def rank_main(rank: int, args, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    g = torch.Generator().manual_seed(rank)
    dtype = getattr(torch, args.dtype)
    local = {name: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dtype)
             for name, shape in (("query", (args.batch, args.dim)), ("target", (args.batch, args.dim)),
                                 ("negatives", (args.batch, args.negatives, args.dim)))}  # fmt: skip
    rows = []
    for symmetric in (False, True):
        for method, sum_to_owner in METHODS.items():
            mmfast.distributed._sum_to_owner = sum_to_owner
            one_step(local, symmetric)  # warm-up
            dist.barrier()
            with CollectiveLog() as log:
                leaves = {k: v.clone().requires_grad_() for k, v in local.items()}
                log.phase = "forward"
                loss = mmfast.contrastive_loss(leaves["query"], leaves["target"], leaves["negatives"], hardness=9.0,
                                               symmetric=symmetric, cross_device=True)  # fmt: skip
                log.phase = "backward"
                loss.backward()
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                one_step(local, symmetric)
                times.append(time.perf_counter() - start)
            rows.append({"symmetric": symmetric, "method": method, "calls": log.calls,
                         "step_ms": 1e3 * statistics.median(times)})  # fmt: skip
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank leaves together, without gloo's teardown (see tests/distributed_worker.py)
    sys.stdout.flush()
    os._exit(0)


def summarise(per_rank: list[list[dict]], args) -> list[dict]:
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    out = []
    for i, row in enumerate(per_rank[0]):
        summary = {"symmetric": row["symmetric"], "method": row["method"], "step_ms_rank0": row["step_ms"]}
        for phase in ("forward", "backward"):
            sent = [sum(c["sent_bytes"] for c in rows[i]["calls"] if c["phase"] == phase) for rows in per_rank]
            received = [sum(c["output_bytes"] for c in rows[i]["calls"] if c["phase"] == phase) for rows in per_rank]
            summary[f"{phase}_sent_bytes_per_rank_max"] = max(sent)
            summary[f"{phase}_sent_bytes_per_rank_min"] = min(sent)
            summary[f"{phase}_output_bytes_per_rank_max"] = max(received)
            summary[f"{phase}_collectives"] = sorted({c["collective"] for c in row["calls"] if c["phase"] == phase})
        summary["paper"] = paper_bytes(args.ranks, args.batch, args.negatives, args.dim, itemsize, row["symmetric"])
        out.append(summary)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    parser.add_argument("--negatives", type=int, default=1, help="K hard negatives per row")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = machine()  # the load before the ranks start (they are the load afterwards)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(args, os.path.join(tmp, "rendezvous"), tmp), nprocs=args.ranks,
                           start_method="spawn")  # fmt: skip
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(args.ranks)]
    rows = summarise(per_rank, args)
    load_after = os.getloadavg()[0]
    print(f"{started}; load {load_after:.1f} after the run")
    print(f"{args.ranks} gloo ranks, B = {args.batch} per rank, K = {args.negatives}, D = {args.dim}, {args.dtype}\n")
    print(cross_device_table(rows))
    if args.json:
        write_json(
            args.json,
            [{"args": vars(args) | {"json": str(args.json)}, "started": started, "load_after": load_after}] + rows,
        )


if __name__ == "__main__":
    main()

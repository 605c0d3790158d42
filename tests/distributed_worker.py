"""The per-rank side of tests/test_distributed.py (a module of its own so `spawn` can import it).

Every rank builds the same global batch from a seed, keeps its slice (batch sizes differ per rank),
runs every case with cross_device=True, backpropagates, and saves its losses and gradients.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import mmfast
from mmfast.distributed import _sum_to_owner_by_all_to_all, _sum_to_owner_by_reduce_scatter, gather

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from contrastive_loss_cross_device import CollectiveLog  # noqa: E402

D, K, D_TEACHER = 6, 2, 5
CONTRASTIVE_OPTIONS = {
    "plain": {},
    "llave": {"hardness": 9.0, "symmetric": True},
    "unime": {"false_negative_margin": 0.1, "topk": 3},
    "everything": {"temperature": 0.05, "hardness": 2.0, "false_negative_margin": 0.05, "topk": 2, "symmetric": True},
    # every prefix normalised on its own; the loss's "none" is [m, B] (the grad_out row broadcast over m)
    "matryoshka": {"hardness": 2.0, "symmetric": True, "matryoshka_dims": (2, 5, 6), "matryoshka_weights": (0.5, 1, 2)},
}
BACKENDS = ["reference", "torch", "cpu", "triton"]
IDS_OPTIONS = ("plain", "everything")  # also run with duplicate ids (few distinct values: copies across ranks)


def global_inputs(total: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    return {"query": unit(total, D), "target": unit(total, D), "negatives": unit(total, K, D),
            "weight": torch.rand(total, generator=g, dtype=torch.float64) + 0.5,
            "grad_out": torch.rand(total, generator=g, dtype=torch.float64) + 0.5,
            "teacher_query": unit(total, D_TEACHER), "teacher_target": unit(total, D_TEACHER),
            "target_ids": torch.randint(0, 4, (total,), generator=g),
            "negative_ids": torch.randint(0, 4, (total, K), generator=g),
            "query_ids": torch.randint(0, 3, (total,), generator=g)}  # fmt: skip


def duplicate_ids(inputs: dict, case: dict) -> dict:
    """The ids keyword arguments of a case, from `inputs` (one rank's rows, or the global batch):
    candidate_ids are the targets' then the flattened negatives' ids, as the loss lays them out."""
    if not case.get("ids"):
        return {}
    parts = [inputs["target_ids"]] + ([inputs["negative_ids"].flatten()] if case["negatives"] else [])
    ids = {"candidate_ids": torch.cat(parts)}
    if case["options"].get("symmetric"):
        ids["query_ids"] = inputs["query_ids"]
    return ids


def cases():
    for backend in BACKENDS:
        for name, options in CONTRASTIVE_OPTIONS.items():
            for reduction in ("mean", "none"):
                for with_negatives in (True, False):
                    for ids in (False, True) if name in IDS_OPTIONS else (False,):
                        label = f"{name}{'-ids' if ids else ''}-{reduction}-{'K' if with_negatives else 'noK'}"
                        yield f"contrastive-{backend}-{label}", {
                            "op": "contrastive", "backend": backend, "options": options, "reduction": reduction,
                            "weighted": name == "plain", "negatives": with_negatives, "ids": ids,
                        }  # fmt: skip
        for name in ("plain", "everything"):  # a learnable τ: each rank's gradient is d(its loss)/dτ
            for reduction in ("mean", "none"):
                yield f"contrastive-{backend}-{name}-{reduction}-tau", {
                    "op": "contrastive", "backend": backend, "options": CONTRASTIVE_OPTIONS[name],
                    "reduction": reduction, "weighted": True, "negatives": True, "tensor_temperature": True,
                }  # fmt: skip
        for reduction in ("mean", "none"):
            yield (
                f"distillation-{backend}-{reduction}",
                {"op": "distillation", "backend": backend, "reduction": reduction},
            )
        for reduction in ("mean", "none"):  # a learnable scale and bias: each rank gets d(its loss)/d them
            for ids in (False, True):
                yield f"sigmoid-{backend}{'-ids' if ids else ''}-{reduction}", {
                    "op": "sigmoid", "backend": backend, "options": {}, "reduction": reduction, "negatives": True,
                    "ids": ids,
                }  # fmt: skip


def ragged_negatives(sizes: list[int]) -> tuple[list[int], torch.Tensor]:
    """Every rank's count M of [M, D] negatives (rank 0 has none, the others differ) and all of them."""
    counts = [0] + [(3 * rank) % 4 + 1 for rank in range(1, len(sizes))]
    g = torch.Generator().manual_seed(99)
    return counts, torch.nn.functional.normalize(torch.randn(sum(counts), D, generator=g, dtype=torch.float64), dim=-1)


def ragged_cases():
    """Negatives as [M, D] with a different M per rank, and none on rank 0."""
    for backend in BACKENDS:
        for name in ("plain", "everything"):
            options = CONTRASTIVE_OPTIONS[name]
            yield f"ragged-{backend}-{name}", {"op": "contrastive", "backend": backend, "options": options,
                                               "reduction": "mean", "weighted": False, "negatives": True}  # fmt: skip


SUM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def sums_to_owner(sizes: list[int]) -> dict:
    """Both ways of summing a gathered gradient to its owner, per dtype, on rows where rank 1 has none
    and on equal rows (no padding), from a non-contiguous gradient of small integers (exact in every
    dtype): (got, want) pairs."""
    out = {}
    for layout, rows in (("ragged", [0 if r == 1 else n for r, n in enumerate(sizes)]), ("equal", [2] * len(sizes))):
        out |= {f"{layout}-{label}": pair for label, pair in _sums_to_owner(rows).items()}
    return out


def _sums_to_owner(rows: list[int]) -> dict:
    rank = dist.get_rank()
    start = sum(rows[:rank])

    def gradient_of(r, dtype):  # rank r's gradient for the whole gathered [Σrows, 2, 3] tensor
        g = torch.Generator().manual_seed(r)
        return torch.randint(-4, 5, (sum(rows), 2, 6), generator=g).to(dtype)[..., ::2]

    out = {}
    for dtype in SUM_DTYPES:
        want = sum(gradient_of(r, torch.float64) for r in range(len(rows)))[start : start + rows[rank]]
        for how, sum_to_owner in (("all_to_all", _sum_to_owner_by_all_to_all),
                                  ("reduce_scatter", _sum_to_owner_by_reduce_scatter)):  # fmt: skip
            out[f"{how}-{dtype}"] = (sum_to_owner(gradient_of(rank, dtype), rows), want)
        # and through the autograd gather itself, this rank's x holding its rows only
        x = (torch.arange(rows[rank] * 3, dtype=torch.float64).view(-1, 3) + start * 3).to(dtype).requires_grad_()
        gathered, offset = gather(x, with_grad=True)
        (gathered * gradient_of(rank, dtype)[:, 0]).sum().backward()
        all_x = torch.arange(sum(rows) * 3, dtype=torch.float64).view(-1, 3)
        out[f"gather-{dtype}"] = (torch.cat([gathered.detach().double().flatten(), x.grad.double().flatten()]),
                                  torch.cat([all_x.flatten(), want[:, 0].flatten()]))  # fmt: skip
        out[f"offset-{dtype}"] = (torch.tensor(offset), torch.tensor(start))
    return out


def collectives_of_one_step(local: dict) -> list[dict]:
    """Every collective (and the bytes sent) of a symmetric loss with negatives, forward and backward."""
    leaves = {k: local[k].float().requires_grad_() for k in ("query", "target", "negatives")}
    with CollectiveLog() as log:
        log.phase = "forward"
        loss = mmfast.contrastive_loss(leaves["query"], leaves["target"], leaves["negatives"], symmetric=True,
                                       backend="torch", cross_device=True)  # fmt: skip
        log.phase = "backward"
        loss.backward()
    return log.calls


def run_case(case: dict, local: dict[str, torch.Tensor]) -> dict:
    if case["op"] == "contrastive":
        leaves = {k: local[k].clone().requires_grad_() for k in ("query", "target", "negatives")}
        options = dict(case["options"])
        if case.get("tensor_temperature"):
            leaves["temperature"] = options["temperature"] = temperature_leaf(options)
        loss = mmfast.contrastive_loss(
            leaves["query"], leaves["target"], leaves["negatives"] if case["negatives"] else None,
            weight=local["weight"] if case["weighted"] else None, reduction=case["reduction"],
            backend=case["backend"], cross_device=True, **options, **duplicate_ids(local, case),
        )  # fmt: skip
    elif case["op"] == "sigmoid":
        leaves = {k: local[k].clone().requires_grad_() for k in ("query", "target", "negatives")}
        leaves |= sigmoid_parameter_leaves()
        loss = mmfast.sigmoid_loss(
            leaves["query"], leaves["target"], leaves["negatives"], logit_scale=leaves["logit_scale"],
            logit_bias=leaves["logit_bias"], weight=local["weight"], reduction=case["reduction"],
            backend=case["backend"], cross_device=True, **duplicate_ids(local, case),
        )  # fmt: skip
    else:
        leaves = {k: local[k].clone().requires_grad_() for k in ("query", "target")}
        loss = mmfast.distillation_loss(
            leaves["query"], leaves["target"], local["teacher_query"], local["teacher_target"],
            student_temperature=0.05, teacher_temperature=0.1, reduction=case["reduction"],
            backend=case["backend"], cross_device=True,
        )  # fmt: skip
    grad_out = local["grad_out"].expand(loss.shape) if case["reduction"] == "none" else torch.tensor(1.0).double()
    loss.backward(grad_out.to(loss.dtype))
    grads = {k: (v.grad.clone() if v.grad is not None else None) for k, v in leaves.items()}
    return {"loss": loss.detach().clone(), "grads": grads}


def sigmoid_parameter_leaves() -> dict[str, torch.Tensor]:
    """The sigmoid loss's learnable scale and bias (values where every pair term matters)."""
    return {"logit_scale": torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
            "logit_bias": torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)}  # fmt: skip


def temperature_leaf(options: dict) -> torch.Tensor:
    return torch.tensor(options.get("temperature", 0.02), dtype=torch.float64, requires_grad=True)


def worker(rank: int, sizes: list[int], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(sizes),
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        everything = global_inputs(sum(sizes))
        start = sum(sizes[:rank])
        local = {k: v[start : start + sizes[rank]] for k, v in everything.items()}
        results = {name: run_case(case, local) for name, case in cases()}
        counts, negatives = ragged_negatives(sizes)
        mine = negatives[sum(counts[:rank]) : sum(counts[: rank + 1])]
        results |= {name: run_case(case, local | {"negatives": mine}) for name, case in ragged_cases()}
        results["sums_to_owner"] = sums_to_owner(sizes)
        results["collectives"] = collectives_of_one_step(local)
        for with_negatives in (False, True):
            ids = duplicate_ids(local, {"ids": True, "negatives": with_negatives, "options": {"symmetric": True}})
            counts = mmfast.masked_candidate_counts(sizes[rank], ids["candidate_ids"], ids["query_ids"],
                                                    cross_device=True)  # fmt: skip
            results[f"masked_counts-{'K' if with_negatives else 'noK'}"] = counts
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # A rank that tears gloo down while a peer is still inside its last collective can make
        # that peer's gloo thread call std::terminate (SIGABRT), and the teardown itself once hung a
        # rank under heavy load: every rank leaves together, and without the teardown.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)

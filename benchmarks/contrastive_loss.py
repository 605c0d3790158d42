"""Speed and memory of mmfast.contrastive_loss against the code people write, torch.compile of that
code, the project's own float64-oracle code, and the bare GEMMs the math needs, all in one run.

Providers:
  mmfast     mmfast.contrastive_loss (backend "auto")
  naive      what a user writes: F.cross_entropy(q @ c.T / τ, labels), the options as a logit bonus
             (hardness) and -inf masks (margin, top-k) on the materialised B×N logits
  compiled   torch.compile(naive), compile time excluded
  reference  mmfast.reference.contrastive_loss_reference (the tests' masked oracle), input dtype
  gemm       the bare GEMMs: S = Q·Cᵀ, G·C, Gᵀ·Q (and the same for the B×B block when symmetric)
  gemm1      the three bare GEMMs of the one-directional loss (S = Q·Cᵀ, G·C, Gᵀ·Q), whatever the
             options: the yardstick of the symmetric loss's cost (÷gemm1), which on one process
             fuses the B×B block's half into the row pass (at most 4 + 3K GEMMs, not 6 + 3K)

Options ending in "+ids" pass duplicate ids (candidate_ids, and query_ids when symmetric): the
targets carry one of B/8 label ids, as in a batch of MMEB classification rows, so about 7 copies of
each positive leave every row's softmax; naive and reference mask them too, gemm ignores them.

    python benchmarks/contrastive_loss.py --paired --options plain plain+ids llave llave+ids unime unime+ids \
        --batch 4096 --dim 256         # the cost of the ids over each option set, timed in alternation
    python benchmarks/contrastive_loss.py --paired --options symmetric llave --negatives 0 1 --batch 4096 \
        --dim 256 1024 --json benchmarks/results/contrastive_loss_symmetric.json
                                       # symmetric over the one-directional GEMMs (gemm1), in alternation

Effective GFLOP/s = the FLOPs of those GEMMs over a provider's fwd+bwd time; the gemm row is the
machine's own rate for the same shapes (top-k's sparse gradient can take mmfast past it).

    python benchmarks/contrastive_loss.py --batch 4096 --negatives 1 --dim 256 1024
    python benchmarks/contrastive_loss.py --matryoshka 64 128 256 512 1024 --batch 4096 --dim 1024 \
        --json benchmarks/results/contrastive_loss_matryoshka.json
                                       # Matryoshka (see `matryoshka_times`), the cpu backend
    python benchmarks/contrastive_loss.py --summary         # a few minutes, what `make bench-summary` prints
    pytest benchmarks/contrastive_loss.py --benchmark-enable  # the pytest-benchmark cases

Times are medians over --repeats runs after one warm-up, for forward (with inputs that require
grad: mmfast computes its gradients there), backward, and both. Peak memory is measured in a fresh
subprocess per case: the kernel's high-water mark of resident memory (VmHWM, reset through
/proc/self/clear_refs) minus what was resident before the step and minus the gradients themselves,
i.e. the extra memory over inputs + grads.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.reference import contrastive_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    bench_step,
    machine,
    median_times,
    memory_in_subprocess,
    peak_after_warmup,
    write_json,
)

OPTIONS = {
    "plain": {},
    "llave": {"hardness": 9.0, "symmetric": True},
    "unime": {"false_negative_margin": 0.1, "topk": 8},
    # one option at a time, for the cost of each over plain
    "hardness": {"hardness": 9.0},
    "margin": {"false_negative_margin": 0.1},
    "topk": {"topk": 8},
    "symmetric": {"symmetric": True},
    # a learnable τ (a 0-d float32 tensor that requires grad, 0.02), for its cost over a number τ
    "plain_tau": {"temperature": "learned"},
    "llave_tau": {"hardness": 9.0, "symmetric": True, "temperature": "learned"},
    "unime_tau": {"false_negative_margin": 0.1, "topk": 8, "temperature": "learned"},
    # duplicate ids (see `duplicate_ids`): the cost of masking copies of the positives
    "plain+ids": {"ids": True},
    "llave+ids": {"hardness": 9.0, "symmetric": True, "ids": True},
    "unime+ids": {"false_negative_margin": 0.1, "topk": 8, "ids": True},
}
DEFAULT_OPTIONS = ["plain", "llave", "unime"]
PROVIDERS = ("mmfast", "naive", "compiled", "reference", "gemm", "gemm1")
NAIVE_MEMORY_LIMIT = 12 << 30  # skip the materialising providers where the B×N matrices alone would exceed this


def make_inputs(b: int, k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return unit(b, d), unit(b, d), (unit(b * k, d) if k else None)


def duplicate_ids(options: dict, b: int, m: int) -> dict:
    """The ids keyword arguments for an option set with "ids": B/8 label ids over the targets (about
    8 rows share each), distinct ids for the negatives and the queries."""
    if not options.get("ids"):
        return {}
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, max(2, b // 8), (b,), generator=g)
    ids = {"candidate_ids": torch.cat([targets, b + torch.arange(m)])}
    if options.get("symmetric"):
        ids["query_ids"] = torch.arange(b)
    return ids


def naive_bytes(b: int, k: int) -> int:
    # scores, logits, exp/softmax and their gradients: ~6 float32 copies of B×N.
    return 6 * 4 * b * b * (1 + k)


def naive_contrastive_loss(query, target, negatives=None, *, temperature=0.02, symmetric=False, hardness=0.0,
                           false_negative_margin=None, topk=None, candidate_ids=None, query_ids=None):  # fmt: skip
    """The loss as a user writes it in PyTorch (the benchmark's honest baseline, not the project's
    oracle): cross-entropy over the materialised logits, the positive of row i in column i."""
    candidates = target if negatives is None else torch.cat([target, negatives])
    options = dict(temperature=temperature, hardness=hardness, margin=false_negative_margin, topk=topk)
    loss = _naive_direction(query, candidates, ids=candidate_ids, **options)
    if symmetric:
        loss = 0.5 * (loss + _naive_direction(target, query, ids=query_ids, **options))
    return loss


def _naive_direction(x, candidates, *, temperature, hardness, margin, topk, ids=None):
    scores = x @ candidates.T
    labels = torch.arange(x.shape[0], device=x.device)
    if not hardness and margin is None and topk is None and ids is None:
        return F.cross_entropy(scores / temperature, labels)
    logits = scores / temperature
    positive = torch.zeros_like(scores, dtype=torch.bool).fill_diagonal_(True)
    if hardness:  # LLaVE: negatives weighted by exp(α·s), i.e. α·stopgrad(s) added to their logits
        logits = logits + hardness * scores.detach().masked_fill(positive, 0.0)
    dropped = torch.zeros_like(positive)
    if ids is not None:  # copies of the positive are no negatives
        dropped = (ids[None, :] == ids[labels][:, None]) & ~positive
    if margin is not None:  # UniME: likely false negatives, scoring above the positive + margin
        dropped |= (scores.detach() > scores.detach().diagonal()[:, None] + margin) & ~positive
    if topk is not None:  # UniME: only the k hardest remaining negatives
        ranked = scores.detach().masked_fill(dropped | positive, float("-inf"))
        hardest = ranked.topk(min(topk, scores.shape[1]), dim=1).indices
        dropped |= ~torch.zeros_like(positive).scatter_(1, hardest, True) & ~positive
    return F.cross_entropy(logits.masked_fill(dropped, float("-inf")), labels)


_compiled_naive = None


def loss_fn(provider: str, options: dict):
    global _compiled_naive
    if provider == "mmfast":
        return lambda q, t, n: mmfast.contrastive_loss(q, t, n, **options)
    if provider == "naive":
        return lambda q, t, n: naive_contrastive_loss(q, t, n, **options)
    if provider == "compiled":
        if _compiled_naive is None:
            _compiled_naive = torch.compile(naive_contrastive_loss, dynamic=False)
        return lambda q, t, n: _compiled_naive(q, t, n, **options)
    if provider == "reference":
        return lambda q, t, n: contrastive_loss_reference(q, t, n, **options)
    raise ValueError(provider)


def gemm_shapes(options: dict, q, t, n, *, one_direction: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, candidates) of each score matrix the loss needs: [Q; C], plus [T; Q] when symmetric
    (unless `one_direction`)."""
    pairs = [(q, torch.cat([t, n]) if n is not None else t)]
    if options.get("symmetric") and not one_direction:
        pairs.append((t, q))
    return pairs


def gemm_flops(options: dict, b: int, k: int, d: int) -> int:
    """FLOPs of the dense math: per score matrix, S = X·Cᵀ, G·C and Gᵀ·X (2·rows·N·D each)."""
    return 6 * b * d * (b * (1 + k) + (b if options.get("symmetric") else 0))


def step_functions(provider: str, options: dict, q, t, n):
    """(forward, backward) closures; backward uses the loss of the last forward."""
    state = {}
    ids = duplicate_ids(options, q.shape[0], 0 if n is None else n.shape[0])
    options = {key: value for key, value in options.items() if key != "ids"} | ids
    leaves = [x.detach().requires_grad_() for x in (q, t, n) if x is not None]
    extra_leaves = []
    if options.get("temperature") == "learned":
        extra_leaves = [torch.tensor(0.02, requires_grad=True)]
        options = {**options, "temperature": extra_leaves[0]}
    if provider in ("gemm", "gemm1"):
        pairs = gemm_shapes(options, q, t, n, one_direction=provider == "gemm1")
        scores = [torch.empty(x.shape[0], c.shape[0]) for x, c in pairs]
        grads = [(torch.empty_like(x), torch.empty_like(c)) for x, c in pairs]

        def forward():
            for (x, c), s in zip(pairs, scores, strict=True):
                torch.mm(x, c.T, out=s)

        def backward():
            for (x, c), s, (grad_x, grad_c) in zip(pairs, scores, grads, strict=True):
                torch.mm(s, c, out=grad_x)
                torch.mm(s.T, x, out=grad_c)

        return forward, backward, lambda: [g for pair in grads for g in pair]
    fn = loss_fn(provider, options)

    def forward():
        state["loss"] = fn(*leaves[:2], leaves[2] if len(leaves) > 2 else None)

    def backward():
        state["grads"] = torch.autograd.grad(state.pop("loss"), leaves + extra_leaves)

    return forward, backward, lambda: state.get("grads", [])


def time_case(provider: str, options: dict, b: int, k: int, d: int, repeats: int) -> dict:
    forward, backward, _ = step_functions(provider, options, *make_inputs(b, k, d))
    return median_times(forward, backward, repeats)


GEMM1 = "gemm1"  # the paired runs' yardstick: the one-directional loss's three bare GEMMs


def paired_times(option_names: list[str], b: int, k: int, d: int, repeats: int) -> list[dict]:
    """mmfast's fwd+bwd for each option set, timed in alternation (one step of each in turn, after one
    warm-up each), so that the load of a shared machine hits all alike: min and median ms, the
    median step-by-step ratio to its base (the same name without "+ids" when given, else the first)
    and to the one-directional loss's three bare GEMMs, timed in the same alternation (gemm1)."""
    inputs = make_inputs(b, k, d)
    steps = {name: step_functions("mmfast", OPTIONS[name], *inputs)[:2] for name in option_names}
    steps[GEMM1] = step_functions(GEMM1, {}, *inputs)[:2]
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, (forward, backward) in steps.items():
            start = time.perf_counter()
            forward()
            backward()
            if i:
                times[name].append(1e3 * (time.perf_counter() - start))
            gc.collect()
    rows = []
    for name, ms in times.items():
        base = name.removesuffix("+ids") if name.removesuffix("+ids") in times else option_names[0]
        ratio = statistics.median(t / f for t, f in zip(ms, times[base], strict=True))
        over_gemm1 = statistics.median(t / f for t, f in zip(ms, times[GEMM1], strict=True))
        provider = GEMM1 if name == GEMM1 else "mmfast"
        rows.append({"provider": provider, "options": name, "B": b, "K": k, "D": d, "min_ms": min(ms),
                     "median_ms": statistics.median(ms), "base": base, "median_ratio": ratio,
                     "over_gemm1": over_gemm1})  # fmt: skip
    return rows


class _GivenEmbeddings(torch.nn.Module):
    """What sentence-transformers' losses take for a model: here it returns the embeddings it is given."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, features):
        return {"sentence_embedding": features["embeddings"]}

    def _get_untruncated_embedding_dimension(self) -> int:
        return self.dim

    get_embedding_dimension = _get_untruncated_embedding_dimension


MATRYOSHKA_TEMPERATURE = 0.05  # sentence-transformers' default MNRL scale, 20


def matryoshka_steps(dims: list[int], q, t, n) -> dict:
    """fwd+bwd closures of the Matryoshka providers on the same embeddings (cpu backend, τ = 0.05):
    single     one mmfast loss at D (no Matryoshka): the yardstick
    fused      mmfast with matryoshka_dims (one pass over D)
    separate   m mmfast calls, each on F.normalize of the prefixes, summed
    st         sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss), cos_sim, scale 1/τ"""
    from sentence_transformers.base.losses import column_merging_disabled
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    opts = dict(temperature=MATRYOSHKA_TEMPERATURE, backend="cpu")
    leaves = [x.detach().requires_grad_() for x in (q, t, n) if x is not None]
    model = _GivenEmbeddings(q.shape[1])
    mnrl = MultipleNegativesRankingLoss(model, scale=1 / MATRYOSHKA_TEMPERATURE)
    st_loss = MatryoshkaLoss(model, mnrl, dims)
    k = 0 if n is None else n.shape[0] // q.shape[0]

    def st():
        negatives = [] if n is None else list(leaves[2].view(q.shape[0], k, -1).unbind(1))
        with column_merging_disabled():
            return st_loss([{"embeddings": c} for c in leaves[:2] + negatives], None)

    def separate():
        cut = [[F.normalize(x[:, :d], dim=-1) for x in leaves] for d in dims]
        return sum(mmfast.contrastive_loss(*xs, **opts) for xs in cut)

    losses = {
        "single": lambda: mmfast.contrastive_loss(*leaves, **opts),
        "fused": lambda: mmfast.contrastive_loss(*leaves, matryoshka_dims=dims, **opts),
        "separate": separate,
        "st": st,
    }
    return {name: (lambda fn=fn: torch.autograd.grad(fn(), leaves)) for name, fn in losses.items()}


def matryoshka_times(dims: list[int], b: int, k: int, d: int, repeats: int) -> list[dict]:
    """Each provider's fwd+bwd, timed in alternation (one step of each in turn, after a warm-up), so a
    shared machine's load hits all alike; ratios are medians of the step-by-step ratios to "single"."""
    steps = matryoshka_steps(dims, *make_inputs(b, k, d))
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i:
                times[name].append(1e3 * (time.perf_counter() - start))
            gc.collect()
    return [{"provider": name, "dims": dims, "B": b, "K": k, "D": d, "min_ms": min(ms),
             "median_ms": statistics.median(ms),
             "over_single": statistics.median(x / s for x, s in zip(ms, times["single"], strict=True))}
            for name, ms in times.items()]  # fmt: skip


def measure_memory_here(provider: str, options: dict, b: int, k: int, d: int) -> dict:
    """Extra peak resident memory of one fwd+bwd over inputs + grads (run in a fresh process)."""
    make_step = lambda *inputs: step_functions(provider, options, *inputs)
    return peak_after_warmup(make_step, make_inputs(64, k, d), make_inputs(b, k, d), compiled=provider == "compiled")


def run_grid(args) -> list[dict]:
    rows = []
    for option_name in args.options:
        for d in args.dim:
            for k in args.negatives:
                for b in args.batch:
                    for provider in args.providers:
                        row = {"provider": provider, "options": option_name, "B": b, "K": k, "D": d}
                        materialises = provider in ("naive", "compiled", "reference")
                        if materialises and naive_bytes(b, k) > NAIVE_MEMORY_LIMIT:
                            row["skipped"] = f"needs ~{naive_bytes(b, k) / 2**30:.0f} GiB"
                        else:
                            row.update(time_case(provider, OPTIONS[option_name], b, k, d, args.repeats))
                            flops = gemm_flops({} if provider == "gemm1" else OPTIONS[option_name], b, k, d)
                            row["gflops"] = flops / row["fwd_bwd_ms"] / 1e6
                            if args.memory and provider not in ("gemm", "gemm1"):
                                child = [provider, option_name, str(b), str(k), str(d)]
                                row.update(memory_in_subprocess(__file__, child))
                        rows.append(row)
                        if not args.quiet:
                            done = f"{row['fwd_bwd_ms']:.0f} ms" if "fwd_bwd_ms" in row else row["skipped"]
                            print(f"# {option_name} B={b} K={k} D={d} {provider}: {done}", file=sys.stderr, flush=True)
    return rows


BASELINES = ("naive", "compiled", "reference")


def add_ratios(rows: list[dict]) -> None:
    """Each row's fwd+bwd time over the bare GEMMs, and each baseline's time over this row's."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["options"], r["B"], r["K"], r["D"]), {})[r["provider"]] = r
    for case in by_case.values():
        for r in case.values():
            if "fwd_bwd_ms" not in r:
                continue
            for gemm in ("gemm", "gemm1"):
                if "fwd_bwd_ms" in case.get(gemm, {}):
                    r[f"over_{gemm}"] = r["fwd_bwd_ms"] / case[gemm]["fwd_bwd_ms"]
            for other in BASELINES:
                if "fwd_bwd_ms" in case.get(other, {}):
                    r[f"speedup_vs_{other}"] = case[other]["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def print_table(rows: list[dict]) -> None:
    """One line per provider and case; a column that no row has a value for is left out."""
    columns = [("fwd ms", "fwd_ms", "{:.1f}"), ("bwd ms", "bwd_ms", "{:.1f}"), ("fwd+bwd", "fwd_bwd_ms", "{:.1f}"),
               ("GFLOP/s", "gflops", "{:.0f}"), ("÷gemm", "over_gemm", "{:.2f}"),
               ("÷gemm1", "over_gemm1", "{:.2f}")]  # fmt: skip
    columns += [(f"{other}÷", f"speedup_vs_{other}", "{:.2f}") for other in BASELINES]
    columns.append(("extra MiB", "extra_peak_mib", "{:.0f}"))
    columns = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
    print("options  B      K  D     provider  " + "".join(f"{title:>11s}" for title, _, _ in columns))
    for r in rows:
        case = f"{r['options']:8s} {r['B']:<6d} {r['K']}  {r['D']:<5d} {r['provider']:9s} "
        if "skipped" in r:
            print(case + f" skipped: {r['skipped']}")
            continue
        cells = ("-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in columns)
        print(case + "".join(f"{cell:>11s}" for cell in cells))
    print("GFLOP/s: the dense GEMMs' FLOPs over fwd+bwd time (the gemm row is this machine's GEMM rate); "
          "÷gemm: fwd+bwd time over the bare GEMMs'; ÷gemm1: over the one-directional loss's three GEMMs; "
          "naive÷ etc.: that provider's time over this one's")  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["options"], r["K"], r["D"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, (opt, k, d) in zip(axes[0], cases, strict=True):
        for provider in PROVIDERS:
            case = (opt, k, d, provider)
            pts = [(r["B"], r["fwd_bwd_ms"]) for r in rows if (r["options"], r["K"], r["D"], r["provider"]) == case]
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=provider)
        ax.set(title=f"{opt}, K={k}, D={d}", xlabel="B", ylabel="fwd+bwd ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)  # the machine and its load: times on a shared machine vary
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1])
    parser.add_argument("--dim", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="also measure peak extra memory (subprocesses)")
    parser.add_argument("--json", type=Path, help="write rows here")
    parser.add_argument("--plot", type=Path, help="write a PNG plot here")
    parser.add_argument("--summary", action="store_true", help="a few minutes: B = 4096, D = 256 (make bench-summary)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="time mmfast's option sets in alternation; ratios to the first (e.g. plain plain+ids)",
    )
    parser.add_argument(
        "--matryoshka",
        type=int,
        nargs="+",
        metavar="DIM",
        help="time Matryoshka at these dims (cpu backend) against one loss, m losses and sentence-transformers",
    )
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        provider, option_name, b, k, d = args.memory_child
        print(json.dumps(measure_memory_here(provider, OPTIONS[option_name], int(b), int(k), int(d))))
        return 0
    if args.summary:
        args.batch, args.negatives, args.dim, args.repeats, args.memory = [4096], [1], [256], 3, True
        args.providers = ["mmfast", "naive", "compiled", "gemm"]
    print(f"# {machine()} | float32, CPU")
    if args.matryoshka:
        rows = [row for b in args.batch for k in args.negatives for d in args.dim
                for row in matryoshka_times(args.matryoshka, b, k, d, args.repeats)]  # fmt: skip
        for r in rows:
            print(f"{r['provider']:9s} dims={r['dims']} B={r['B']} K={r['K']} D={r['D']}  min {r['min_ms']:.0f} ms  "
                  f"median {r['median_ms']:.0f} ms  ÷single {r['over_single']:.3f}")  # fmt: skip
        if args.json:
            write_json(args.json, rows)
        return 0
    if args.paired:
        rows = [row for b in args.batch for k in args.negatives for d in args.dim
                for row in paired_times(args.options, b, k, d, args.repeats)]  # fmt: skip
        for r in rows:
            print(f"{r['options']:10s} B={r['B']} K={r['K']} D={r['D']}  min {r['min_ms']:.1f} ms  median "
                  f"{r['median_ms']:.1f} ms  ÷{r['base']} {r['median_ratio']:.3f}  "
                  f"÷gemm1 {r['over_gemm1']:.3f}")  # fmt: skip
        if args.json:
            write_json(args.json, rows)
        return 0
    rows = run_grid(args)
    add_ratios(rows)
    print_table(rows)
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot([r for r in rows if "fwd_bwd_ms" in r], args.plot, machine())
    return 0


# pytest-benchmark cases: pytest benchmarks/contrastive_loss.py --benchmark-enable
@pytest.mark.parametrize("provider, option_name", [("mmfast", "plain"), ("mmfast", "llave"), ("mmfast", "unime"),
                                                   ("naive", "plain"), ("naive", "unime"), ("reference", "plain"),
                                                   ("gemm", "plain")])  # fmt: skip
def test_contrastive_loss(benchmark, provider, option_name):
    bench_step(benchmark, *step_functions(provider, OPTIONS[option_name], *make_inputs(2048, 1, 256))[:2], rounds=3)


if __name__ == "__main__":
    sys.exit(main())

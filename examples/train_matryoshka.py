"""Matryoshka embeddings on the default run: one model whose embedding can be cut to 16, 32 or 64 dimensions.

    python examples/train_matryoshka.py                         # the embedded default, dims 16 32 64, 100 steps
    python examples/train_matryoshka.py --matryoshka_dims 8 32 64 --max_steps 200   # any mmfast-train argument

The LLaVE recipe's loss, taken at every prefix of the embedding (each prefix L2-normalised, the m losses
summed, `mmfast.contrastive_loss(..., matryoshka_dims=)` in one fused pass), on the embedded default (a
tiny Qwen2-VL whose embedding has 64 dimensions). The held-out retrieval R@1 at each prefix, before and
after training, is printed and written to <output_dir>/results.json; every prefix is scored from one
embedding of each input (`mmfast.train.evaluate.prefixes`, as `mmfast-eval --dims`).
"""

import functools
import sys

from mmfast.train import build_trainer
from mmfast.train.arguments import option_value
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.synthetic import GENERATOR_VERSION, cache_home, default_data
from mmfast.train.evaluate.cache import EmbeddingCache
from mmfast.train.evaluate.default_sets import evaluate_default
from mmfast.train.evaluate.prefixes import PrefixEncoder
from mmfast.train.evaluate.report import table_lines
from mmfast.train.example import Example, run

DEFAULTS = {"matryoshka_dims": ["16", "32", "64"], "max_steps": "100", "eval_strategy": "no"}
SETS = ("flickr30k", "urban1k")


def with_defaults(argv: list[str]) -> list[str]:
    """The example's defaults, each unless the command line gives it."""
    for name, value in DEFAULTS.items():
        if option_value(argv, name) is None:
            argv += [f"--{name}", *([value] if isinstance(value, str) else value)]
    return argv


def recall_at_1(encoder, dims, data) -> dict[int, dict]:
    """{d: retrieval results at prefix d}, each input embedded once for every d."""
    full = EmbeddingCache(encoder, None, show_progress=False)
    evaluate = functools.partial(evaluate_default, tasks=("retrieval",), data=data, show_progress=False)
    return {d: evaluate(PrefixEncoder(full, d))["retrieval"] for d in dims}


def prefix_table(dims, before, after) -> str:
    """One row per prefix: each set's R@1 before and after training."""
    header = ["dim"] + [f"{s} {d} R@1 {w}" for s in SETS for d in ("t2i", "i2t") for w in ("before", "after")]
    rows = [[str(dim)] + [r[dim][s][f"{d}_R@1"] for s in SETS for d in ("t2i", "i2t") for r in (before, after)]
            for dim in dims]  # fmt: skip
    return "\n".join([f"retrieval R@1 (%) at each Matryoshka prefix {' '.join(map(str, dims))}",
                      *table_lines(header, rows)])  # fmt: skip


def main(argv=None) -> int:
    example = Example("llave", with_defaults(list(sys.argv[1:] if argv is None else argv)))
    if example.dry_run:
        return example.plan()
    run_config = example.arguments()
    dims = run_config.loss.matryoshka_dims
    trainer = build_trainer(run_config)
    # --heldout_size tiny: a few rows of each held-out set (the example's own flag; CI runs it)
    tiny = example.heldout_size == "tiny"
    data = default_data(cache_home() / f"default-data-tiny-v{GENERATOR_VERSION}", sizes=Sizes.tiny()) if tiny else None
    before = recall_at_1(trainer.model, dims, data)
    example.fit(trainer)
    after = recall_at_1(trainer.model, dims, data)
    # results.json: {"before d16": {"retrieval": ...}, ...}, each in mmfast-eval's shape
    example.results = {f"{label} d{dim}": {"retrieval": r[dim]} for label, r in (("before", before), ("after", after))
                       for dim in dims}  # fmt: skip
    example.format_results = lambda _: prefix_table(dims, before, after)
    return example.report(trainer)


if __name__ == "__main__":
    sys.exit(run(main))

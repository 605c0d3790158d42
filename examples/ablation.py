"""The loss ablation on the embedded default: InfoNCE vs LLaVE's hardness weighting vs UniME's
false-negative margin + top-k, each with and without the data's hard negatives, on the same data,
steps and seeds. Everything but the loss is the default run (`mmfast-train` with no arguments).

    python examples/ablation.py                      # 6 losses x 3 seeds x 150 steps: 21 min at load 7-10
    python examples/ablation.py --steps 2 --seeds 0 --eval_images 8   # a smoke run (CI)

Writes <output>/results.json (every run), table.md (mean ± sample std over seeds, and each seed) and
ablation.png. The score is held-out text→image and image→text R@1 on the default Flickr-style split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from mmfast.train import build_trainer, parse_arguments
from mmfast.train.default import PROFILE, default_data
from mmfast.train.evaluate import evaluate_retrieval
from mmfast.train.evaluate.default_sets import CAPTION_PROMPT, IMAGE_PROMPT

# Each loss as overrides of the default run's LLaVE recipe (τ 0.02, symmetric in every row, so only the
# named options differ).
LOSSES = {
    "InfoNCE": {"hardness": 0.0},
    "LLaVE hardness α=9": {"hardness": 9.0},
    "UniME margin 0.1 + top-8": {"hardness": 0.0, "false_negative_margin": 0.1, "topk": 8},
}
METRICS = ("t2i_R@1", "i2t_R@1")


def run(loss: str, hard_negatives: bool, seed: int, args) -> dict:
    """Trains one configuration and scores it on the held-out retrieval split."""
    overrides = {**LOSSES[loss], "max_steps": args.steps, "seed": seed, "save_strategy": "no",
                 "report_to": "none", "disable_tqdm": True, "logging_steps": max(args.steps // 10, 1)}  # fmt: skip
    if not hard_negatives:
        overrides["max_negatives"] = 0
    argv = ["--output_dir", str(args.output / "runs" / f"{loss}-{hard_negatives}-{seed}")]
    argv += [token for name, value in overrides.items() for token in (f"--{name}", str(value))]
    trainer = build_trainer(parse_arguments(argv, profile=PROFILE))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scores = evaluate_retrieval(trainer.model, default_data().flickr, limit=args.eval_images, show_progress=False,
                                text_prompt=CAPTION_PROMPT, image_prompt=IMAGE_PROMPT)  # fmt: skip
    metrics = next(iter(scores["retrieval"].values()))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"loss": loss, "hard_negatives": hard_negatives, "seed": seed, "train_seconds": round(seconds, 1),
            "final_loss": losses[-1] if losses else None, **{m: metrics[m] for m in METRICS},
            "num_images": metrics["num_images"]}  # fmt: skip


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for loss in LOSSES:
        for hard in (False, True):
            runs = [r for r in results if r["loss"] == loss and r["hard_negatives"] == hard]
            row = {"loss": loss, "hard_negatives": hard}
            for m in METRICS:
                values = [r[m] for r in runs]
                row[m] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "runs": values}  # fmt: skip
            rows.append(row)
    return rows


def table(rows: list[dict], args) -> str:
    lines = [f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))}; R@1 in % (mean ± sample std; each seed)",
             "", "| loss | hard negatives | t2i R@1 | i2t R@1 |", "| --- | --- | --- | --- |"]  # fmt: skip
    for row in rows:
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f} ({', '.join(f'{v:.1f}' for v in row[m]['runs'])})"
                 for m in METRICS]  # fmt: skip
        lines.append(f"| {row['loss']} | {'yes' if row['hard_negatives'] else 'no'} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(11, 3.8), sharey=True)
    for axis, metric in zip(axes, METRICS, strict=True):
        for i, row in enumerate(rows):
            colour = "tab:orange" if row["hard_negatives"] else "tab:blue"
            axis.bar(i, row[metric]["mean"], yerr=row[metric]["std"], color=colour, alpha=0.7, capsize=3)
            axis.scatter([i] * len(row[metric]["runs"]), row[metric]["runs"], color="black", s=8, zorder=3)
        axis.set_xticks(range(len(rows)), [f"{r['loss']}\n{'+ hard neg.' if r['hard_negatives'] else ''}"
                                           for r in rows], fontsize=7, rotation=30, ha="right")  # fmt: skip
        axis.set_title(f"held-out {metric} (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval_images", type=int, default=None, help="score on the first N images (default: all)")
    parser.add_argument("--output", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for loss in LOSSES:
            for hard in (False, True):
                results.append(run(loss, hard, seed, args))
                print(json.dumps(results[-1]), flush=True)
    rows = summarise(results)
    (args.output / "results.json").write_text(json.dumps({"runs": results, "summary": rows}, indent=1) + "\n")
    (args.output / "table.md").write_text(table(rows, args))
    plot(rows, args.output / "ablation.png")
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

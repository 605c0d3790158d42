"""Mined hard negatives on the embedded default: the default run with and without `mmfast-mine`'s
negatives (and with its B3-style batch order), same steps and seeds, scored by held-out R@1.

    python examples/mined_negatives.py --output runs/mined            # teacher, mining, 3 x 3 runs
    python examples/mined_negatives.py --steps 2 --seeds 0 --eval_images 8 --teacher_steps 2   # a smoke run

1. The teacher: the default run (`mmfast-train` with no arguments: 400 steps, seed 0) into <output>/teacher.
2. `mmfast-mine --model <output>/teacher --output_dir <output>/mined --k K --batch_order 64`.
3. For each seed, the default run's hyperparameters (`default.PROFILE`) with --steps steps on
   - the default data (its own generated near-miss negatives, on half of the rows): "default data";
   - the mined data (`--data <output>/mined/mixture.json`): "mined negatives";
   - the mined data in the mined batch order (`--batch_order`): "mined + batch order".
Writes <output>/results.json (every run) and table.md (mean ± sample std, and each seed). The score is
held-out text→image and image→text R@1 on the default Flickr-style split (1,280 captions × 256 images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from mmfast.train import build_trainer, parse_arguments
from mmfast.train.arguments import to_tokens
from mmfast.train.default import PROFILE, default_data
from mmfast.train.evaluate import evaluate_retrieval
from mmfast.train.evaluate.default_sets import CAPTION_PROMPT, IMAGE_PROMPT
from mmfast.train.mine import BATCH_ORDER_NAME, run_mine

METRICS = ("t2i_R@1", "i2t_R@1")
SETUPS = ("default data", "mined negatives", "mined + batch order")


def train(output: Path, steps: int, seed: int, extra: list[str]):
    overrides = {**PROFILE, "max_steps": steps, "seed": seed, "save_strategy": "no", "report_to": "none",
                 "disable_tqdm": True, "logging_steps": max(steps // 10, 1)}  # fmt: skip
    argv = ["--output_dir", str(output), *to_tokens(overrides), *extra]
    trainer = build_trainer(parse_arguments(argv, profile=PROFILE))
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def score(model, args) -> dict:
    scores = evaluate_retrieval(model, default_data().flickr, limit=args.eval_images, show_progress=False,
                                text_prompt=CAPTION_PROMPT, image_prompt=IMAGE_PROMPT)  # fmt: skip
    return next(iter(scores["retrieval"].values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", type=Path, default=Path("runs/mined"))
    p.add_argument("--steps", type=int, default=PROFILE["max_steps"])
    p.add_argument("--teacher_steps", type=int, default=PROFILE["max_steps"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--false_negative_ratio", default="0.95")
    p.add_argument("--eval_images", type=int, default=None, help="score on the first N held-out images only")
    args = p.parse_args()
    teacher = args.output / "teacher"
    if not (teacher / "mmfast_encoder.json").is_file():
        trainer, _ = train(teacher, args.teacher_steps, 0, [])
        trainer.save_model()
    mined = args.output / "mined"
    if not (mined / BATCH_ORDER_NAME).is_file():
        run_mine(["--model", str(teacher), "--output_dir", str(mined), "--k", str(args.k), "--batch_order",
                  str(PROFILE["per_device_train_batch_size"]), "--false_negative_ratio", args.false_negative_ratio,
                  "--no_progress", "--cpu_threads", "1"])  # fmt: skip
    extra = {"default data": [], "mined negatives": ["--data", str(mined / "mixture.json")],
             "mined + batch order": ["--data", str(mined / "mixture.json"),
                                     "--batch_order", str(mined / BATCH_ORDER_NAME)]}  # fmt: skip
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    # The with/without pair of every seed first, then the batch order runs: the main comparison lands first.
    for setup, seed in [(s, seed) for seed in args.seeds for s in SETUPS[:2]] + [(SETUPS[2], s) for s in args.seeds]:
        if any(r["setup"] == setup and r["seed"] == seed and r["steps"] == args.steps for r in results):
            continue
        trainer, seconds = train(args.output / "runs" / f"{setup.replace(' ', '-')}-{seed}", args.steps, seed,
                                 extra[setup])  # fmt: skip
        metrics = score(trainer.model, args)
        results.append({"setup": setup, "seed": seed, "steps": args.steps, "train_seconds": round(seconds, 1),
                        **{m: metrics[m] for m in METRICS}, "num_images": metrics["num_images"]})  # fmt: skip
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results[-1]), flush=True)
    lines = [f"{args.steps} steps, seeds {', '.join(map(str, args.seeds))}; R@1 in % (mean ± sample std; each seed)",
             "", "| training data | t2i R@1 | i2t R@1 |", "| --- | --- | --- |"]  # fmt: skip
    for setup in SETUPS:
        runs = [r for r in results if r["setup"] == setup and r["steps"] == args.steps and r["seed"] in args.seeds]
        if not runs:
            continue
        cells = []
        for m in METRICS:
            values = [r[m] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} ± {std:.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {setup} | {' | '.join(cells)} |")
    (args.output / f"table-{args.steps}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

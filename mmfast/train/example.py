"""What the example scripts (`examples/train_<recipe>.py`) share: their own flags, the evaluation on
the held-out sets before and after training, and the outputs of a run.

    example = Example("llave", argv)        # the example's flags; every other argument is mmfast-train's
    trainer = build_trainer(example.arguments())
    example.evaluate("before", trainer.model)
    fit(trainer)
    example.evaluate("after", trainer.model)
    example.report(trainer)                 # the before/after table, <output_dir>/loss.png and results.json

The example's own flags:
    --dry-run            check the config and print the plan (`mmfast.train.dry_run`); no weights loaded
    --num_processes N    with --dry-run: plan for N data-parallel ranks
    --accelerate_config F  with --dry-run: check the `accelerate launch` config file F, plan for its processes
    --heldout_tasks T...    held-out tasks to evaluate (mmeb retrieval sugarcrepe video visdoc nli, all or none);
                         default, when training the embedded default: those matching the recipe (the image sets;
                         E5-V and UniME also nli), none for your own model or data (evaluate those with
                         mmfast-eval on the real benchmark)
    --heldout_size tiny     a few rows of every held-out set instead of the full ones (fast checks, CI)
results.json holds one results dict per evaluation ("before", "after", ...), each in mmfast-eval's shape.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .arguments import option_value, parse_arguments, read_config, to_tokens, with_default_evaluation
from .cli import DRY_RUN_FLAGS
from .command import configure_logging, run_command
from .default import PROFILE
from .default.sizes import Sizes
from .default.synthetic import GENERATOR_VERSION, cache_home, default_data
from .dry_run import dry_run_main
from .evaluate.compare import format_comparison
from .evaluate.default_sets import MULTI_VECTOR_TASKS, evaluate_default
from .evaluate.report import TASKS
from .recipes import get_recipe
from .run import leave_process_group

logger = logging.getLogger(__name__)
LOSS_CURVE = "loss.png"
# The held-out sets an example evaluates by default on the embedded default: those that match what it trains.
# VLM2Vec and LLaVE train image-text pairs; E5-V trains NLI text only (the image sets then show what does not
# transfer from scratch) and UniME's stage 1 distils text, stage 2 trains image-text pairs.
IMAGE_TASKS = tuple(task for task in TASKS if task != "nli")
RECIPE_HELDOUT_TASKS = {"e5v": TASKS, "unime-stage1": TASKS}
# What the curve draws beside the loss when the run evaluated during training (the embedded default does,
# `default.EVALUATION`): held-out R@1 (`--eval_tasks retrieval`), a multi-vector run's NDCG@5 (visdoc).
CURVE_METRIC = "eval_flickr30k_t2i_R@1"
MULTI_VECTOR_CURVE_METRIC = "eval_documents_ndcg_linear@5"


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _wait_for_main_process() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class Example:
    """One example run of `recipe` (the first stage's) with `argv` (default: sys.argv[1:]).
    output_dir: where the run goes when neither the command line nor the config says."""

    def __init__(self, recipe: str, argv: Sequence[str] | None = None, *, output_dir: str | None = None):
        configure_logging()
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        parser.add_argument(*DRY_RUN_FLAGS, dest="dry_run", action="store_true")
        parser.add_argument("--heldout_tasks", nargs="+", choices=(*TASKS, "all", "none"))
        parser.add_argument("--heldout_size", choices=("full", "tiny"), default="full")
        parser.add_argument("--stage2_config")
        options, self.argv = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        self.recipe, self.dry_run, self.stage2_config = recipe, options.dry_run, options.stage2_config
        self.heldout_size, self._heldout_tasks = options.heldout_size, options.heldout_tasks
        if output_dir and not self._sets_output_dir():
            self.argv += ["--output_dir", output_dir]
        # the embedded default evaluates as it trains (unless told how to evaluate), in every stage
        self.argv = with_default_evaluation(self.argv, recipe)
        self.results: dict[str, dict] = {}
        # How report() prints the results: before/after side by side (an example may print its own table).
        self.format_results = format_comparison
        self.seconds: dict[str, float] = {}

    # --- arguments ---

    def arguments(self, recipe: str | None = None, *, model: str | None = None, output_subdir: str | None = None,
                  config: str | None = None):  # fmt: skip
        """The `RunConfig` (parse_arguments) of this example's argv with the recipe, and optionally a model (a previous
        stage's output), an output subfolder and another config file. A stage that starts from a
        previous stage's model on the embedded default data keeps the default's profile.

        The first stage's arguments are parsed once: a second TrainingArguments resets accelerate's
        state, which a trainer built from the first one still uses."""
        first = self._first_stage()
        if recipe in (None, self.recipe) and model is None and output_subdir is None and config is None:
            return first
        argv = ["--recipe", recipe or self.recipe, *self._argv(config)]
        if model is not None:
            if self.trains_default:
                argv = to_tokens(PROFILE) + argv
            argv += ["--model_name_or_path", model]
        if output_subdir is not None:
            argv += ["--output_dir", str(self.output_dir / output_subdir)]
        return parse_arguments(argv, profile=PROFILE)

    def _argv(self, config: str | None) -> list[str]:
        if config is None:
            return list(self.argv)
        # a later stage's own config replaces the first stage's
        rest, skip = [], False
        for token in self.argv:
            if skip:
                skip = False
            elif token == "--config":
                skip = True
            elif not token.startswith("--config="):
                rest.append(token)
        return ["--config", config, *rest]

    @property
    def config(self) -> str | None:
        """The first stage's --config, if any."""
        values = [t for i, t in enumerate(self.argv) if i and self.argv[i - 1] == "--config"]
        values += [t.split("=", 1)[1] for t in self.argv if t.startswith("--config=")]
        return values[-1] if values else None

    @property
    def output_dir(self) -> Path:
        return Path(self._first_stage().training.output_dir)

    @property
    def trains_default(self) -> bool:
        """No model and no data given: the embedded default trains."""
        first = self._first_stage()
        return first.model.model_name_or_path is None and not first.data.data

    def _first_stage(self):
        if not hasattr(self, "_parsed"):
            self._parsed = parse_arguments(["--recipe", self.recipe, *self.argv], profile=PROFILE)
        return self._parsed

    def _sets_output_dir(self) -> bool:
        return self._chooses("output_dir")

    def _chooses(self, *names: str) -> bool:
        """Whether the command line or a config file sets any of `names` (a broken config counts as
        setting them: the real parse reports it)."""
        if any(option_value(self.argv, name) is not None for name in names):
            return True
        configs = [t for i, t in enumerate(self.argv) if i and self.argv[i - 1] == "--config"]
        try:
            return any(name in read_config(config) for config in configs for name in names)
        except (ValueError, FileNotFoundError):
            return True

    def plan(self, *stages: tuple[str, str | None]) -> int:
        """--dry-run of each (recipe, config) stage; 0 when every one is valid, else 2."""
        status = 0
        for i, (recipe, config) in enumerate(stages or ((self.recipe, None),)):
            if len(stages) > 1:
                print(f"--- stage {i + 1}: {recipe}" + (" (starts from the previous stage's output)" if i else ""))
            argv = ["--recipe", recipe, *self._argv(config)]
            status = max(status, dry_run_main(argv, program=f"{recipe} --dry-run", profile=PROFILE))
        return status

    # --- evaluation ---

    @property
    def heldout_tasks(self) -> tuple[str, ...]:
        if self._heldout_tasks is None:
            if not self.trains_default:
                return ()
            if get_recipe(self.recipe).is_multi_vector:
                return MULTI_VECTOR_TASKS
            return RECIPE_HELDOUT_TASKS.get(self.recipe, IMAGE_TASKS)
        if "none" in self._heldout_tasks:
            return ()
        return TASKS if "all" in self._heldout_tasks else tuple(self._heldout_tasks)

    def evaluate(self, name: str, encoder) -> dict | None:
        """Evaluates `encoder` on the held-out sets (main process only) as results[name]."""
        if not self.heldout_tasks:
            return None
        if _is_main_process():
            start = time.perf_counter()
            data = None
            if self.heldout_size == "tiny":
                data = default_data(cache_home() / f"default-data-tiny-v{GENERATOR_VERSION}", sizes=Sizes.tiny())
            self.results[name] = evaluate_default(encoder, tasks=self.heldout_tasks, data=data, show_progress=False)
            self.seconds[f"evaluation {name}"] = time.perf_counter() - start
        _wait_for_main_process()
        return self.results.get(name)

    def fit(self, trainer, name: str = "training"):
        from .run import fit

        start = time.perf_counter()
        fit(trainer)
        self.seconds[name] = time.perf_counter() - start
        return trainer

    # --- outputs ---

    def report(self, *trainers, labels: Sequence[str] | None = None) -> int:
        """Prints the comparison table, writes results.json and the loss curve; leaves the process group."""
        if _is_main_process():
            out = self.output_dir
            out.mkdir(parents=True, exist_ok=True)
            if self.results:
                sets = "tiny held-out sets" if self.heldout_size == "tiny" else "held-out sets"
                print(f"\n{self.recipe}: the embedded default's {sets}, {' / '.join(self.results)}")
                print(self.format_results(self.results))
                (out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
                print(f"results: {out / 'results.json'}")
            else:
                print("no held-out evaluation (--heldout_tasks); evaluate with mmfast-eval --model", out)
            labels = list(labels or [f"stage {i + 1}" for i in range(len(trainers))])
            metric = MULTI_VECTOR_CURVE_METRIC if get_recipe(self.recipe).is_multi_vector else CURVE_METRIC
            curve = plot_losses({label: t.state.log_history for label, t in zip(labels, trainers, strict=True)},
                                out / LOSS_CURVE, metric)  # fmt: skip
            if curve is not None:
                print(f"loss curve: {curve}")
            print("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()))
        leave_process_group()
        return 0


def run(main, argv: Sequence[str] | None = None) -> int:
    """Runs an example's main(argv); a user error (a bad argument, a missing file, malformed data)
    becomes one line naming it and exit status 2, as with mmfast-train."""
    return run_command(main, Path(sys.argv[0]).name, argv)


def losses(log_history: Sequence[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step."""
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]


def evaluations(log_history: Sequence[dict], metric: str = CURVE_METRIC) -> list[tuple[int, float]]:
    """(step, value) of `metric` at every evaluation during training (`--eval_strategy`)."""
    return [(entry["step"], entry[metric]) for entry in log_history if metric in entry and "step" in entry]


def plot_losses(
    histories: dict[str, Sequence[dict]], path: str | os.PathLike, metric: str = CURVE_METRIC
) -> Path | None:
    """The training loss against the step, one line per stage (later stages continue the step count),
    and, when the run evaluated during training, `metric` (held-out R@1, %) on a second axis; None,
    with a warning that says why, when nothing was logged or matplotlib is missing. The legend names
    each line's stage (its key in `histories`) only when there are several."""
    curves, scores, offset = {}, {}, 0

    def name(label: str, what: str) -> str:
        return f"{label}: {what}" if len(histories) > 1 else what

    for label, history in histories.items():
        points = losses(history)
        curves[label] = [(offset + step, loss) for step, loss in points]
        scores[label] = [(offset + step, value) for step, value in evaluations(history, metric)]
        offset += max((step for step, _ in points), default=0)
    if not any(curves.values()):
        logger.warning("no training loss was logged (logging_steps larger than the run?): no loss curve")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'mmfast[train]'): no loss curve at %s", path)
        return None
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    for label, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="." if len(points) < 30 else None, label=name(label, "training loss"))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    if any(scores.values()):
        right = axes.twinx()
        for label, points in scores.items():
            if points:
                steps, values = zip(*points, strict=True)
                right.plot(steps, values, "s--", color="tab:red", markersize=3, label=name(label, f"held-out {metric}"))
        right.set_ylabel(f"held-out {metric} (%)")
        right.set_ylim(0, 100)
        more_handles, more_names = right.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    if len(handles) > 1:
        axes.legend(handles, names, fontsize=7, loc="center right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)

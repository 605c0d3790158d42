"""mmfast's evaluation as the Trainer's: what `--eval_strategy` evaluates, and its results as log metrics.

`HeldOutEvaluation` stands where the Trainer expects an eval dataset: the tasks (`--eval_tasks`) on the
embedded default's held-out sets, or on the user's (`--eval_data`, one per task). `EmbeddingTrainer.evaluate`
runs it and logs `flat_metrics` of the results, e.g. `eval_flickr30k_t2i_R@1` or `eval_mmeb_overall_acc`.
Under data parallelism `RankShards` lets every rank embed its share of the inputs; rank 0 writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoder import cat_padded
from . import evaluate_task
from .default_sets import evaluate_default
from .report import TASKS, merge_results, result_rows

# Path parts of the results that only group sets (MMEB's "datasets/ImageNet-1K/acc" logs as mmeb_ImageNet-1K_acc).
GROUPING_PARTS = ("datasets", "meta_tasks")


@dataclass(frozen=True)
class HeldOutEvaluation:
    """The evaluation run at each `--eval_strategy` point.

    tasks: among `report.TASKS`. data: None for the embedded default's held-out sets, else one path per
    task (as `mmfast-eval --data`). image_roots: None, or one root (or None) per task.
    """

    tasks: tuple[str, ...]
    data: tuple[str, ...] | None = None
    image_roots: tuple[str | None, ...] | None = None
    batch_size: int = 64

    @classmethod
    def from_arguments(
        cls, tasks: Sequence[str] | None, data: Sequence[str] | None, image_roots: Sequence[str] | None, batch_size: int
    ) -> HeldOutEvaluation:
        """Checks `--eval_tasks`, `--eval_data` and `--eval_image_root`; errors name the argument."""
        if not tasks:
            raise ValueError("--eval_tasks: name at least one task (" + ", ".join(TASKS) + ")")
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"--eval_tasks {' '.join(unknown)}: must be among {', '.join(TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"--eval_tasks {' '.join(tasks)}: a task is named twice")
        if image_roots and not data:
            raise ValueError("--eval_image_root goes with --eval_data")
        for name, values in (("--eval_data", data), ("--eval_image_root", image_roots)):
            if values and len(values) != len(tasks):
                raise ValueError(
                    f"{name}: give one per --eval_tasks entry ({len(tasks)}: {' '.join(tasks)}), got {len(values)}"
                )
            for value in values or ():
                if value is not None and not os.path.exists(value):
                    raise FileNotFoundError(f"{name} {value}: no such file or folder")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"--per_device_eval_batch_size must be a positive integer, got {batch_size!r}")
        return cls(
            tasks=tuple(tasks),
            data=tuple(data) if data else None,
            image_roots=tuple(image_roots) if image_roots else None,
            batch_size=batch_size,
        )

    def run(self, encoder, output_dir: str | os.PathLike | None = None) -> dict:
        """The results dict (`report`'s shape); output_dir, when given, gets the tasks' own score files.
        Embeddings are cached in memory for this call only: the weights change between evaluations."""
        common = {"batch_size": self.batch_size, "show_progress": False, "output_dir": output_dir}
        if self.data is None:
            return evaluate_default(encoder, tasks=self.tasks, **common)
        roots = self.image_roots or (None,) * len(self.tasks)
        parts = [
            evaluate_task(encoder, task, data, image_root=root, **common)
            for task, data, root in zip(self.tasks, self.data, roots, strict=True)
        ]
        return merge_results(*parts)


def flat_metrics(results: Mapping) -> dict[str, float]:
    """Every score of the results under one flat name (set, then metric): flickr30k_t2i_R@1,
    mmeb_overall_acc, mmeb_ImageNet-1K_acc. Counts (num_*) stay in the results files only."""
    flat: dict[str, float] = {}
    for task, path, metric, value in result_rows(results):
        if metric.startswith("num_"):
            continue
        parts = [part for part in path.split("/") if part and part not in GROUPING_PARTS]
        name = "_".join([*(["mmeb"] if task == "mmeb" else []), *parts, metric])
        if name in flat:
            raise ValueError(f"two evaluated sets give the metric {name!r}: give their data different names")
        flat[name] = float(value)
    return flat


class _SameVector:
    """A stand-in encoder that gives every input the same vector: an evaluation with it reads the held-out
    sets and names every score (whose values mean nothing) without a model. `family` decides, as the
    model's would, whether video is also scored as the backbone's own video input."""

    def __init__(self, family=None):
        self.family = family

    def encode(self, texts, images=None, *, batch_size: int = 32, show_progress: bool = True) -> torch.Tensor:
        return torch.zeros(len(list(texts)), 1)


def metric_names(evaluation: HeldOutEvaluation, family=None) -> list[str]:
    """The names `EmbeddingTrainer.evaluate` logs for `evaluation` (eval_flickr30k_t2i_R@1, eval_runtime, …),
    found without a model: the held-out sets are read (as the first evaluation reads them), not embedded."""
    from transformers.trainer_utils import speed_metrics

    scores = flat_metrics(evaluation.run(_SameVector(family)))
    return [f"eval_{name}" for name in scores] + list(speed_metrics("eval", 0.0))


def check_metric_for_best_model(metric: str | None, evaluation: HeldOutEvaluation, family=None) -> None:
    """A ValueError naming `--metric_for_best_model` and the metrics the evaluation logs when it logs no
    such metric (the Trainer, as HF's, finds out only after the first evaluation)."""
    if metric is None:
        return
    names = metric_names(evaluation, family)
    if (metric if metric.startswith("eval_") else f"eval_{metric}") not in names:
        raise ValueError(
            f"--metric_for_best_model {metric}: the evaluation (--eval_tasks {' '.join(evaluation.tasks)}) logs "
            f"no such metric; it logs {', '.join(names)}"
        )


class RankShards:
    """An encoder for data-parallel evaluation: `encode` embeds this rank's contiguous share of the
    inputs and returns every rank's embeddings, in order, so each rank scores the whole set. Every rank
    must call it with the same inputs (the evaluators read the same files, so they do)."""

    def __init__(self, encoder, rank: int, world_size: int):
        self.encoder, self.rank, self.world_size = encoder, rank, world_size

    def __getattr__(self, name: str):
        # The evaluators read the encoder's prompts and config; those are the wrapped encoder's.
        return getattr(self.encoder, name)

    def encode(self, texts, images=None, *, batch_size: int = 32, show_progress: bool = True) -> torch.Tensor:
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        share = -(-len(texts) // self.world_size)
        start = min(self.rank * share, len(texts))
        end = min(start + share, len(texts))
        mine = None
        if end > start:
            mine = self.encoder.encode(
                texts[start:end], images[start:end], batch_size=batch_size, show_progress=show_progress
            )
        shares = [None] * self.world_size
        torch.distributed.all_gather_object(shares, mine)
        parts = [part for part in shares if part is not None]
        # A multi-vector encoder's shares are [n, L, dim] with each rank's own longest L: padded to the longest.
        return torch.cat(parts) if parts[0].dim() == 2 else cat_padded(parts)


def evaluation_output_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the evaluation at `step` writes its results.json, results.csv and score files."""
    return Path(output_dir) / "eval" / f"step-{step}"

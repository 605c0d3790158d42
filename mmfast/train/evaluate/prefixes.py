"""`mmfast-eval --dims`: a Matryoshka model scored at several embedding sizes in one run.

Each input is embedded once, at the full size, into one shared cache; each prefix size d is then
scored through `PrefixEncoder`, which hands the evaluators the first d dimensions of those
embeddings, L2-normalised again (exactly `Encoder.encode(..., dim=d)`). The results: one ordinary
results dict per size, and a summary with one row per size.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..encoder import check_prefix_dim, prefix
from .cache import EmbeddingCache
from .report import result_rows, table_lines

# The headline number of each task, per set, for the one-row-per-size summary.
HEADLINE_METRICS = {
    "mmeb": ("acc",),
    "retrieval": ("t2i_R@1", "i2t_R@1"),
    "sugarcrepe": ("acc",),
    "video": ("t2v_R@1", "v2t_R@1", "hit@1"),
    "visdoc": ("ndcg_linear@5",),
    "nli": ("p2e_R@1",),
}


class PrefixEncoder:
    """An encoder whose embeddings are the first `dim` dimensions of `full`'s, renormalised. `full` is
    an EmbeddingCache of the real encoder, shared by every size: an input is embedded once."""

    def __init__(self, full: EmbeddingCache, dim: int):
        encoder = full.encoder
        self.full, self.dim = full, dim
        # What the evaluators read of an encoder besides `encode`: its prompts, its backbone family.
        self.encoder_config = getattr(encoder, "encoder_config", None)
        self.config = getattr(encoder, "config", None)
        self.family = getattr(encoder, "family", None)

    def encode(self, texts, images=None, *, batch_size: int = 32, show_progress: bool = True) -> torch.Tensor:
        return prefix(self.full.embed(texts, images), self.dim)


def check_dims(dims: Sequence[int], encoder) -> tuple[int, ...]:
    """--dims: positive, distinct, at most the encoder's embedding size; in increasing order."""
    size = getattr(encoder, "embedding_size", None)
    multi_vector = getattr(getattr(encoder, "encoder_config", None), "multi_vector", False)
    for dim in dims:
        check_prefix_dim(dim, size if size is not None else dim, multi_vector=multi_vector, name="--dims")
    if len(set(dims)) != len(dims):
        raise ValueError(f"--dims: each size once, got {' '.join(map(str, dims))}")
    return tuple(sorted(dims))


def evaluate_prefixes(encoder, dims: Sequence[int], evaluate, *, cache, batch_size: int, show_progress: bool,
                      output_dir: str | os.PathLike) -> dict[int, dict]:  # fmt: skip
    """{d: results at size d}. evaluate(encoder, output_dir) runs the chosen evaluation on one encoder;
    each size writes its score files into <output_dir>/dim_<d>."""
    full = EmbeddingCache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    return {dim: evaluate(PrefixEncoder(full, dim), os.path.join(output_dir, f"dim_{dim}")) for dim in dims}


def headline_rows(by_dim: Mapping[int, Mapping]) -> tuple[list[str], list[list]]:
    """The summary table: one row per size, one column per (task, set, headline metric)."""
    columns: dict[tuple[str, str, str], None] = {}
    values: dict[int, dict] = {}
    for dim, results in by_dim.items():
        values[dim] = {}
        for task, name, metric, value in result_rows(results):
            if metric in HEADLINE_METRICS.get(task, ()) and (task != "mmeb" or name == "overall"):
                if task == "sugarcrepe" and not name.endswith("/mean"):
                    continue
                columns[(task, name, metric)] = None
                values[dim][(task, name, metric)] = value
    header = ["dim", *(f"{name} {metric}" for _, name, metric in columns)]
    rows = [[str(dim), *(values[dim].get(column, "-") for column in columns)] for dim in by_dim]
    return header, rows


def format_prefix_table(by_dim: Mapping[int, Mapping]) -> str:
    header, rows = headline_rows(by_dim)
    return "\n".join(["By embedding size (Matryoshka prefix, %)", *table_lines(header, rows)])


def write_prefix_results(by_dim: Mapping[int, Mapping], output_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json ({"dims": {"<d>": results}}) and results.csv (dim, task, set, metric, value)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output / "results.json", output / "results.csv"
    json_path.write_text(json.dumps({"dims": {str(d): r for d, r in by_dim.items()}}, indent=2) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("dim", "task", "set", "metric", "value"))
        writer.writerows((dim, *row) for dim, results in by_dim.items() for row in result_rows(results))
    return {"json": json_path, "csv": csv_path}

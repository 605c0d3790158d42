"""Teacher embeddings for UniME stage 1 (distillation): one row per data row of the file they belong
to; row i holds the teacher's embedding of data row i's query (`sent0` / `qry`) and of its positive
(`sent1` / `pos_text`), skipped rows included, so a skipped row never shifts the others.

On disk, by suffix:
- `.safetensors`: two float tensors, "query" [n, Dt] and "positive" [n, Dt];
- `.npy`: one float array [n, 2, Dt]; [:, 0] is the query, [:, 1] the positive.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class TeacherEmbeddings:
    """Precomputed teacher embeddings, row i for data row i: float32 [n, Dt] each."""

    query: torch.Tensor
    positive: torch.Tensor
    path: str

    def __len__(self) -> int:
        return self.query.shape[0]

    @property
    def dim(self) -> int:
        return self.query.shape[1]

    def rows(self, examples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (query, positive) rows [len(examples), Dt] of a batch of `Example`s."""
        index = []
        for e in examples:
            if e.teacher is None:
                raise ValueError(f"{e.source}, row {e.row}: example has no teacher row (teacher file {self.path})")
            index.append(e.teacher)
        index = torch.tensor(index, dtype=torch.long)
        return self.query[index], self.positive[index]


def load_teacher(path: str | os.PathLike, num_rows: int | None) -> TeacherEmbeddings:
    """Reads teacher embeddings (layout in the module docstring) for a data file of `num_rows` rows
    (None: a file whose rows were not all read, as in the dry run's sample; any number of rows)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "query" not in tensors or "positive" not in tensors:
            raise ValueError(
                f"{path}: a teacher .safetensors needs tensors 'query' and 'positive', has {sorted(tensors)}"
            )
        query, positive = tensors["query"], tensors["positive"]
        layout = "tensors 'query' and 'positive' of shape [n, Dt]"
        if query.dim() != 2 or query.shape != positive.shape:
            raise ValueError(f"{path}: expected {layout}, got {tuple(query.shape)} and {tuple(positive.shape)}")
    elif path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        layout, shape = "one array of shape [n, 2, Dt]", array.shape
        if array.ndim != 3 or array.shape[1] != 2:
            raise ValueError(f"{path}: expected {layout} (query, positive), got shape {shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path}: teacher embeddings must be floating point, got {array.dtype}")
        query, positive = torch.from_numpy(array[:, 0].copy()), torch.from_numpy(array[:, 1].copy())
    else:
        raise ValueError(f"{path}: a teacher file must be .safetensors or .npy")
    if not query.is_floating_point():
        raise ValueError(f"{path}: teacher embeddings must be floating point, got {query.dtype}")
    if query.shape[0] != (query.shape[0] if num_rows is None else num_rows) or query.shape[1] == 0:
        raise ValueError(
            f"{path}: {layout} with n = {num_rows} rows (one per data row) expected, got {tuple(query.shape)}"
        )
    bad = ~(torch.isfinite(query).all(1) & torch.isfinite(positive).all(1))
    if bad.any():
        raise ValueError(f"{path}: non-finite teacher embedding at row {int(bad.nonzero()[0])}")
    return TeacherEmbeddings(query.float().contiguous(), positive.float().contiguous(), str(path))


def save_teacher(path: str | os.PathLike, query: torch.Tensor, positive: torch.Tensor) -> Path:
    """Writes teacher embeddings [n, Dt] x 2 in the layout `load_teacher` reads (by the suffix)."""
    path = Path(path)
    if query.dim() != 2 or query.shape != positive.shape:
        raise ValueError(
            f"query and positive must both be [n, Dt], got {tuple(query.shape)} and {tuple(positive.shape)}"
        )
    query, positive = query.detach().float().contiguous().cpu(), positive.detach().float().contiguous().cpu()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"query": query, "positive": positive}, str(path))
    elif path.suffix == ".npy":
        np.save(path, torch.stack([query, positive], 1).numpy())
    else:
        raise ValueError(f"{path}: a teacher file must be .safetensors or .npy")
    return path

"""A batch order: which rows make each contrastive batch, fixed ahead of training (B3-style batches
of mutual hard negatives, written by `mmfast-mine --batch_order`), read by `mmfast-train --batch_order`.

The file (JSON Lines):

    {"mmfast_batch_order": 1, "batch_size": 64, "files": ["/abs/mined/MSCOCO_t2i/MSCOCO_t2i.jsonl", ...]}
    [[0, 17], [0, 4], ...]        one global contrastive batch per line: [file number, row] pairs

`batch_size` is the global batch (every process's rows of one step together, what cross-device
negatives see); `row` is the 0-based data row of that file (`Example.row`). A row may appear in
several batches, a batch must not hold a row twice.

`BatchOrderSampler` yields the batches under the same contract as `ContrastiveBatchSampler`: with R
processes each line is cut into R per-device batches of batch_size / R rows, consecutive, so rank r
gets slice r of every line through accelerate's `BatchSamplerShard` and one step sees the whole line.
An epoch is every line once, the lines in an order that is a pure function of (seed, epoch), so a
resumed run replays the same batches and R processes train on the batches one process would.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mmfast.train.data import file_rows

FORMAT_KEY = "mmfast_batch_order"
VERSION = 1


def write_batch_order(path: str | os.PathLike, files: Sequence[str | os.PathLike], batches, batch_size: int) -> None:
    """Writes `batches` (each a sequence of (file number, row) pairs) to `path`, atomically."""
    path = Path(path)
    header = {FORMAT_KEY: VERSION, "batch_size": batch_size, "files": [os.path.abspath(f) for f in files]}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for batch in batches:
            f.write(json.dumps([[int(n), int(row)] for n, row in batch], separators=(",", ":")) + "\n")
    os.replace(temporary, path)


def read_batch_order(path: str | os.PathLike) -> tuple[dict, list[tuple[int, list[tuple[int, int]]]]]:
    """(header, [(line number, batch)]) of a batch order file; every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch_order: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise ValueError(f"--batch_order {path}: the file is empty")
    try:
        header = json.loads(lines[0][1])
    except json.JSONDecodeError as e:
        raise ValueError(f"--batch_order {path}: line {lines[0][0]} (the header) is not JSON: {e}") from None
    if not isinstance(header, dict) or header.get(FORMAT_KEY) != VERSION:
        raise ValueError(f"--batch_order {path}: line {lines[0][0]} is not a batch order header "
                         f'{{"{FORMAT_KEY}": {VERSION}, ...}} (write one with mmfast-mine --batch_order)')  # fmt: skip
    files, size = header.get("files"), header.get("batch_size")
    if not isinstance(files, list) or not files or not all(isinstance(p, str) for p in files):
        raise ValueError(f"--batch_order {path}: the header's files must be a non-empty list of paths")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"--batch_order {path}: the header's batch_size must be an int >= 1, got {size!r}")
    batches = []
    for number, line in lines[1:]:
        where = f"--batch_order {path}: line {number}"
        try:
            pairs = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON: {e}") from None
        well_formed = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
            for p in pairs
        )
        if not well_formed:
            raise ValueError(f"{where} must be a list of [file number, row] pairs of integers")
        if len(pairs) != size:
            raise ValueError(f"{where} holds {len(pairs)} rows; the header's batch_size is {size}")
        bad = next((p for p in pairs if not 0 <= p[0] < len(files) or p[1] < 0), None)
        if bad is not None:
            raise ValueError(f"{where}: {bad} names no row (file numbers 0..{len(files) - 1}, rows >= 0)")
        if len({tuple(p) for p in pairs}) != len(pairs):
            raise ValueError(f"{where} holds a row twice (a copy of a row is a false negative of itself)")
        batches.append((number, [(n, row) for n, row in pairs]))
    if not batches:
        raise ValueError(f"--batch_order {path}: no batch after the header")
    return header, batches


class BatchOrderSampler(torch.utils.data.Sampler[list[int]]):
    """The batches of a batch order file, as dataset indices (see the module docstring).

    examples: the dataset's examples (their `source` and `row` locate the file's rows).
    batch_size: the per-device batch; batch_size × num_replicas must equal the file's batch_size.
    """

    def __init__(self, path: str | os.PathLike, examples: Sequence, batch_size: int, *, seed: int = 0,
                 num_replicas: int = 1):  # fmt: skip
        for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        header, batches = read_batch_order(path)
        if header["batch_size"] != batch_size * num_replicas:
            raise ValueError(
                f"--batch_order {path}: its batches hold {header['batch_size']} rows, but a step here takes "
                f"per_device_train_batch_size {batch_size} x {num_replicas} process(es) = {batch_size * num_replicas}"
                "; mine it again with that --batch_order size, or change the batch size"
            )
        files = [os.path.abspath(p) for p in header["files"]]
        number = {p: n for n, p in enumerate(files)}
        index, i = {}, 0
        for source, rows in file_rows(examples):  # by column: no row is read
            n = number.get(os.path.abspath(source))
            if n is not None:
                index.update(zip(zip(itertools.repeat(n), rows.tolist()), range(i, i + len(rows)), strict=True))
            i += len(rows)
        self.batches = np.empty((len(batches), header["batch_size"]), dtype=np.int64)
        for b, (line, pairs) in enumerate(batches):
            for j, (n, row) in enumerate(pairs):
                if (n, row) not in index:
                    raise ValueError(
                        f"--batch_order {path}: line {line} names row {row} of {files[n]}, which is not in the "
                        "training data (is that file in --data? was the row skipped? see the data report)"
                    )
                self.batches[b, j] = index[(n, row)]
        self.path, self.batch_size, self.num_replicas, self.seed, self.epoch = path, batch_size, num_replicas, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batches) * self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.batches))
        for line in order:
            for start in range(0, self.batches.shape[1], self.batch_size):
                yield [int(i) for i in self.batches[line, start : start + self.batch_size]]

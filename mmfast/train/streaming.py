"""`--streaming`: contrastive batches read from the data files as training needs them, for data too
large to convert to Arrow up front. Nothing is converted or cached; rows come from `datasets`' streaming
readers (`records.open_records(streaming=True)`), in chunks, and each chunk is checked by the same
column checks as the converted data (`data.py`), so a bad row is skipped and counted (or, strict, an
error naming the file and the row) when the stream reaches it.

The batches keep `sampling.ContrastiveBatchSampler`'s rules, as a stream can:
- a round (one step's global batch, `batch_size` × `num_replicas` rows) is drawn by a seeded generator:
  homogeneous, one subset per round drawn by weight; mixed, the round's rows split over the subsets by
  a multinomial draw of the weights. No weights: the subsets' row counts (parquet metadata, JSONL lines).
- each subset is an endless stream: its files in order, again and again, rows taken at random from a
  shuffle buffer of `buffer_rows` rows; a bad row is counted on the stream's first pass;
- every rank computes the same rounds and keeps its own `batch_size` slice (rank r: rows r·B to
  (r+1)·B), so a round has no row twice (when a subset's buffer holds a round) and is of one subset on
  every rank when homogeneous;
- the batches are a pure function of the seed: a resumed run skips the batches already trained
  (the Trainer's `skip_first_batches`) and sees the rest unchanged.
A stream has no length: the run needs `--max_steps`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from mmfast.train.data import MMEB_NEGATIVES, MMEB_REQUIRED, NLI_COLUMNS, Example, check_file_chunk
from mmfast.train.data_report import DataReport
from mmfast.train.data_spec import DataSource
from mmfast.train.records import UNREADABLE, open_records, table_chunks

STREAM_CHUNK_ROWS = 1024


class StreamBatch(list):
    """One device's batch of Examples, with the rows the stream skipped while reading it (`skipped`)."""

    skipped: DataReport


def count_rows(path) -> int:
    """A file's rows without reading them: parquet metadata, or the non-blank lines of a .jsonl / .csv."""
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    lines = 0
    with open(path, "rb") as f:
        for line in f:
            lines += bool(line.strip())
    return lines - (path.suffix == ".csv")


class _SubsetStream:
    """Endless checked rows of one subset, through a shuffle buffer."""

    def __init__(
        self, source: DataSource, rng: np.random.Generator, buffer_rows: int, strict: bool, report: DataReport
    ):
        self.source, self.rng, self.buffer_rows, self.strict, self.report = source, rng, buffer_rows, strict, report
        self.buffer: list[Example] = []
        self.rows = self._rows()

    def _rows(self) -> Iterator[Example]:
        required, optional = (MMEB_REQUIRED, MMEB_NEGATIVES) if self.source.format == "mmeb" else (NLI_COLUMNS, ())
        columns = (*required, *optional, UNREADABLE)
        for turn in itertools.count():
            found = 0
            for path in self.source.paths:
                records = open_records(path, required=required, lists=optional, streaming=True)
                start, state = 0, {}
                for chunk in table_chunks(records, columns, chunk_rows=STREAM_CHUNK_ROWS):
                    # A bad row is counted the first time the stream meets it, as a converted file's once.
                    report = self.report if turn == 0 else DataReport()
                    rows = check_file_chunk(path, self.source, chunk, start, state, self.strict, report)
                    start += chunk.num_rows
                    found += len(rows)
                    yield from rows
            if not found:
                raise ValueError(f"--data: subset {self.source.name!r} has no usable row\n{self.report.summary()}")

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            while len(self.buffer) < self.buffer_rows:
                self.buffer.append(next(self.rows))
            i = int(self.rng.integers(len(self.buffer)))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            out.append(self.buffer.pop())
        return out


class StreamingBatches(torch.utils.data.IterableDataset):
    """This device's contrastive batches from the subsets' streams (see the module docstring)."""

    def __init__(self, sources: Sequence[DataSource], batch_size: int, *, homogeneous: bool = False, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, strict: bool = False, buffer_rows: int = 10_000):  # fmt: skip
        if any(s.teacher is not None for s in sources):
            raise ValueError("--streaming: teacher files are not supported (their rows follow a file read whole)")
        self.sources, self.batch_size, self.homogeneous = tuple(sources), batch_size, homogeneous
        self.seed, self.num_replicas, self.rank, self.strict = seed, num_replicas, rank, strict
        self.buffer_rows, self.epoch = buffer_rows, 0
        if any(s.weight is not None for s in self.sources):
            weights = np.array([1.0 if s.weight is None else s.weight for s in self.sources])
        else:
            weights = np.array([float(sum(count_rows(p) for p in s.paths)) for s in self.sources])
        if weights.sum() <= 0:
            raise ValueError("--streaming: at least one subset needs a weight > 0 (and rows)")
        self.weights = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[StreamBatch]:
        round_size = self.batch_size * self.num_replicas
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        report = DataReport(strict=self.strict)
        streams = [
            _SubsetStream(s, np.random.default_rng([self.seed, self.epoch, 1 + k]), max(self.buffer_rows, round_size),
                          self.strict, report)
            for k, s in enumerate(self.sources)
        ]  # fmt: skip
        while True:
            if self.homogeneous:
                members = streams[int(rng.choice(len(streams), p=self.weights))].take(round_size)
            else:
                counts = rng.multinomial(round_size, self.weights)
                members = [e for k, c in enumerate(counts) if c for e in streams[k].take(int(c))]
                members = [members[i] for i in rng.permutation(round_size)]
            batch = StreamBatch(members[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
            batch.skipped, report = report, DataReport(strict=self.strict)
            for stream in streams:
                stream.report = report
            if self.rank:  # a row skipped while reading a round is counted once, by rank 0
                batch.skipped = DataReport(strict=self.strict)
            yield batch

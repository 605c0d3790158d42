"""Record files read through Hugging Face `datasets`: Arrow, memory-mapped and cached, or streamed.

`open_records(path)` is the one way training reads a data file (`.jsonl`, `.parquet`, `.csv`):
- `.parquet` and a well-formed `.jsonl`: `datasets.load_dataset("parquet" | "json")`. The file is
  converted to Arrow once, into HF's datasets cache (`$HF_DATASETS_CACHE`, by default
  `~/.cache/huggingface/datasets`; `cache_dir` overrides it), and memory-mapped on every later start:
  rows stay on disk, and a second start on the same file reads nothing but the columns it checks.
- A `.jsonl` that pyarrow's reader refuses (a line that is not JSON, or not UTF-8, a value whose type
  changes between rows) or that has a required column with no value in some row, and a `.csv` (E5-V's
  triplets): `Dataset.from_generator` over `jsonl_records` / `csv_records`, which name the file and the
  line of each fault. A line that is not UTF-8 is a row of its own, with `UNREADABLE` saying why (a bad
  row, counted by the caller); a line that is not a JSON object rejects the file.
- `streaming=True` converts nothing: `load_dataset(..., streaming=True)` (parquet) or
  `IterableDataset.from_generator` over the same line readers, read in order as it is iterated.

`table_chunks(records, ...)` yields the rows as pyarrow tables of at most `chunk_rows` rows, in file
order, from either kind; the caller checks each chunk's columns at once (`data.py`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

UNREADABLE = "__unreadable__"  # a column of rows that could not be read: why (None for the readable)
CHUNK_ROWS = 65_536


def _datasets():
    import datasets

    return datasets


def _signature(path: Path) -> dict:
    """What a generator's cache is keyed on besides its code: the file and its version on disk."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def jsonl_records(path: str, required: Sequence[str], lists: Sequence[str], size: int = 0, mtime_ns: int = 0):
    """{column: value} per non-blank line of a .jsonl file, for `from_generator`. Required columns are
    strings ("" for null); `lists` columns become lists of strings (a string is a list of one). A line
    that is not UTF-8 is a row with UNREADABLE set; one that is not a JSON object, a required column
    missing from a row, or a value of the wrong type is a ValueError naming the file, line and row."""
    del size, mtime_ns  # part of the cache key only
    empty = {column: "" for column in required} | {column: [] for column in lists}
    with open(path, "rb") as f:
        row = 0
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield {**empty, UNREADABLE: "not UTF-8 text"}
                row += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_number} (row {row}) is not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_number} (row {row}) is a {type(record).__name__}, not an object")
            out = {UNREADABLE: None}
            for column in required:
                if column not in record:
                    raise ValueError(f"{path}: row {row} has no column {column!r} (has {sorted(record)})")
                out[column] = _string(path, row, column, record[column])
            for column in lists:
                out[column] = _strings(path, row, column, record.get(column))
            yield out
            row += 1


def _string(path, row: int, column: str, value) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise ValueError(f"{path}: row {row}, column {column!r} is {type(value).__name__} {value!r:.60}, expected a string")


def _strings(path, row: int, column: str, value) -> list[str]:
    if value is None or isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
        return [v or "" for v in value]
    raise ValueError(
        f"{path}: row {row}, column {column!r} is {type(value).__name__} {value!r:.60}, "
        "expected a string or a list of strings"
    )


def csv_records(path: str, columns: Sequence[str], size: int = 0, mtime_ns: int = 0):
    """{column: value} per data row of a .csv file with a header holding `columns` (checked by the caller)."""
    del size, mtime_ns
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row, record in enumerate(reader):
            if None in record or any(value is None for value in record.values()):
                raise ValueError(f"{path}: row {row} does not have the header's {len(reader.fieldnames)} fields")
            yield {**{column: record[column] for column in columns}, UNREADABLE: None}


def csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def _features(required: Sequence[str], lists: Sequence[str]):
    datasets = _datasets()
    features = {column: datasets.Value("string") for column in required}
    features |= {column: datasets.List(datasets.Value("string")) for column in lists}
    return datasets.Features(features | {UNREADABLE: datasets.Value("string")})


def _from_generator(generator, gen_kwargs: dict, features, streaming: bool, cache_dir: str | None):
    datasets = _datasets()
    if streaming:
        return datasets.IterableDataset.from_generator(generator, features=features, gen_kwargs=gen_kwargs)
    try:
        return datasets.Dataset.from_generator(generator, features=features, gen_kwargs=gen_kwargs, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as error:  # our ValueError, raised inside the builder
        cause = error.__cause__
        raise (cause if isinstance(cause, ValueError) else error) from None


def _is_empty(path: Path) -> bool:
    with open(path, "rb") as f:
        return not any(line.strip() for line in f)


def open_records(path: Path, *, required: Sequence[str], lists: Sequence[str] = (), streaming: bool = False,
                 cache_dir: str | None = None):  # fmt: skip
    """The rows of a data file as a `datasets.Dataset` (Arrow, memory-mapped), or a `datasets.IterableDataset`
    when streaming; see the module docstring. Its columns are the file's own (parquet, fast JSONL path) or
    `required` + `lists` + UNREADABLE (the line readers); the caller checks them."""
    datasets = _datasets()
    suffix = path.suffix
    signature = _signature(path)
    if suffix == ".csv":
        header = csv_header(path)
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (header {header})")
        # Tuples, not lists: datasets would take list arguments for shards to split the generator over.
        kwargs = {"path": signature["path"], "columns": tuple(required), "size": signature["size"],
                  "mtime_ns": signature["mtime_ns"]}  # fmt: skip
        return _from_generator(csv_records, kwargs, _features(required, ()), streaming, cache_dir)
    if suffix == ".parquet":
        files = {"train": [str(path)]}
        return datasets.load_dataset(
            "parquet", data_files=files, split="train", streaming=streaming, cache_dir=cache_dir
        )
    if suffix != ".jsonl":
        raise ValueError(f"{path}: a data file must be .jsonl, .parquet or .csv")
    kwargs = {"path": signature["path"], "required": tuple(required), "lists": tuple(lists),
              "size": signature["size"], "mtime_ns": signature["mtime_ns"]}  # fmt: skip
    if _is_empty(path) if signature["size"] < 2**16 else False:
        return datasets.Dataset.from_dict(
            {c: [] for c in _features(required, lists)}, features=_features(required, lists)
        )
    if not streaming:
        quiet = logging.getLogger("datasets.packaged_modules.json")
        level, quiet.level = quiet.level, logging.CRITICAL  # its "Failed to load JSON" is not the user's error
        try:
            table = datasets.load_dataset("json", data_files={"train": [str(path)]}, split="train", cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - pyarrow refuses a file in many ways; the line reader says which line, and why
            table = None
        finally:
            quiet.level = level
        if table is not None and not _needs_line_reader(table, required, lists):
            return table
    return _from_generator(jsonl_records, kwargs, _features(required, lists), streaming, cache_dir)


def _needs_line_reader(table, required: Sequence[str], lists: Sequence[str]) -> bool:
    """Whether pyarrow's reading of a .jsonl hides what the line reader would name: a column whose
    values changed type between rows (datasets keeps them as JSON text, an extension type), a required
    column null in some row (a key missing from that row, an error, or an explicit null, an empty
    string), a line that is not UTF-8."""
    data = table.data.table
    present = [c for c in (*required, *lists) if c in data.column_names]
    if any(isinstance(data.schema.field(c).type, pa.BaseExtensionType) for c in present):
        return True
    # A required column missing (the file may not even hold objects) or null somewhere: the line reader
    # names the row.
    if not all(c in data.column_names and not data.column(c).null_count for c in required):
        return True
    try:  # pyarrow's reader keeps a line that is not UTF-8 as it is: a bad row the line reader marks
        for chunk in table_chunks(table, present):
            chunk.validate(full=True)
    except pa.ArrowInvalid:
        return True
    return False


def table_chunks(records, columns: Sequence[str], *, limit: int | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:  # fmt: skip
    """The rows (only `columns` that the file has), as pyarrow tables of at most chunk_rows rows, in order;
    at most `limit` rows in all."""
    datasets = _datasets()
    left = limit
    if isinstance(records, datasets.Dataset):
        names = [c for c in columns if c in records.column_names]
        files = [f["filename"] for f in records.cache_files]
        if not files:  # in memory (an empty file)
            table = records.data.table.select(names)
            yield from (table.slice(s, chunk_rows) for s in range(0, table.slice(0, limit).num_rows, chunk_rows))
            return
        # The cache files are read, not mapped: a pass over every row then leaves the rows on disk, where a
        # pass through the memory map would leave each page it touched in this process's resident memory.
        pending, count = [], 0
        for name in files:
            with pa.OSFile(name) as f:
                for batch in pa.ipc.open_stream(f):
                    if left is not None:
                        batch = batch.slice(0, left)
                        left -= batch.num_rows
                    pending.append(batch.select(names))
                    count += batch.num_rows
                    if count >= chunk_rows:
                        yield pa.Table.from_batches(pending)
                        pending, count = [], 0
                    if left is not None and left <= 0:
                        break
            if left is not None and left <= 0:
                break
        if count:
            yield pa.Table.from_batches(pending)
        return
    names = [c for c in columns if c in (records.column_names or columns)]
    stream = records.select_columns(names) if records.column_names else records
    schema = records.features.arrow_schema if records.features else None
    for values in stream.iter(batch_size=chunk_rows):
        # Built with the declared types: a stream's rows alone may not tell them (an all-empty list column).
        fields = None if schema is None else pa.schema([schema.field(name) for name in values])
        batch = pa.Table.from_pydict(values, schema=fields)
        if left is not None:
            batch = batch.slice(0, left)
            left -= batch.num_rows
        if batch.num_rows:
            yield batch
        if left is not None and left <= 0:
            return


def row_count(records) -> int | None:
    """The rows of a converted file (None for a stream, whose length is not known before it is read)."""
    datasets = _datasets()
    return records.num_rows if isinstance(records, datasets.Dataset) else None


def cache_files(records) -> list[str]:
    return [f["filename"] for f in getattr(records, "cache_files", [])]


def file_signature(path: os.PathLike) -> dict:
    return _signature(Path(path))

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

The evaluators read their held-out files here too, whole and record by record (each checks its own):
`read_rows(path)` for .jsonl / .json / .parquet (through `datasets` where pyarrow reads the file as it
was written, else through the same line reader, `json_lines`), `parquet_table(path)` for a parquet
file's columns (MMEB, visual documents), and `csv_rows(path)`, the CSV reader training's `csv_records`
wraps (NLI triplets, MSR-VTT captions). Errors name the file and the line or row.
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


def json_lines(path) -> Iterator[tuple[int, int, str | None]]:
    """(line number, row, text) per non-blank line of a .jsonl file: `row` counts the non-blank lines from 0;
    `text` is None for a line that is not UTF-8. Training (`jsonl_records`) and evaluation (`read_rows`)
    read JSON lines through this one reader."""
    with open(path, "rb") as f:
        row = 0
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            yield line_number, row, text
            row += 1


def parse_json(text: str, path, where: str):
    """JSON text; a ValueError naming the file and `where` when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: {where} is not valid JSON ({error})") from None


def json_object(text: str, path, where: str) -> dict:
    """One JSON object; a ValueError naming the file and `where` when it is not valid JSON or not an object."""
    record = parse_json(text, path, where)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where} is a {type(record).__name__}, not an object")
    return record


def jsonl_records(path: str, required: Sequence[str], lists: Sequence[str], size: int = 0, mtime_ns: int = 0):
    """{column: value} per non-blank line of a .jsonl file, for `from_generator`. Required columns are
    strings ("" for null); `lists` columns become lists of strings (a string is a list of one). A line
    that is not UTF-8 is a row with UNREADABLE set; one that is not a JSON object, a required column
    missing from a row, or a value of the wrong type is a ValueError naming the file, line and row."""
    del size, mtime_ns  # part of the cache key only
    empty = {column: "" for column in required} | {column: [] for column in lists}
    for line_number, row, text in json_lines(path):
        if text is None:
            yield {**empty, UNREADABLE: "not UTF-8 text"}
            continue
        record = json_object(text, path, f"line {line_number} (row {row})")
        out = {UNREADABLE: None}
        for column in required:
            if column not in record:
                raise ValueError(f"{path}: row {row} has no column {column!r} (has {sorted(record)})")
            out[column] = _string(path, row, column, record[column])
        for column in lists:
            out[column] = _strings(path, row, column, record.get(column))
        yield out


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


def csv_rows(path) -> Iterator[tuple[int, int, dict]]:
    """(line number, row, {column: value}) per data row of a .csv file (the header first); a row whose
    fields do not match the header's in number is a ValueError naming the file, row and line. Training
    (`csv_records`) and evaluation (NLI triplets, MSR-VTT captions) read CSV through this one reader."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row, record in enumerate(reader):
            if None in record or any(value is None for value in record.values()):
                fields, line = len(reader.fieldnames), reader.line_num
                raise ValueError(f"{path}: row {row} does not have the header's {fields} fields (line {line})")
            yield reader.line_num, row, record


def csv_records(path: str, columns: Sequence[str], size: int = 0, mtime_ns: int = 0):
    """{column: value} per data row of a .csv file with a header holding `columns` (checked by the caller)."""
    del size, mtime_ns
    for _, _, record in csv_rows(path):
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


def _load(builder: str, path: Path, cache_dir: str | None = None):
    """`load_dataset(builder)` on one file, converted to Arrow in datasets' cache (memory-mapped after).
    Its own log of a file it cannot read ("Failed to load JSON", "Failed to read schema") is silenced:
    the caller says what is wrong, naming the file."""
    quiet = logging.getLogger(f"datasets.packaged_modules.{builder}")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return _datasets().load_dataset(builder, data_files={"train": [str(path)]}, split="train", cache_dir=cache_dir)
    finally:
        quiet.level = level


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
        try:
            table = _load("json", path, cache_dir)
        except Exception:  # noqa: BLE001 - pyarrow refuses a file in many ways; the line reader says which line, and why
            table = None
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


# --------------------------------------------------------------- held-out files, read whole (evaluation)

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def parquet_table(path: Path) -> pa.Table:
    """A .parquet file's rows as an Arrow table, memory-mapped from datasets' cache (converted on the first
    read); a damaged file is a ValueError naming it."""
    try:
        return _load("parquet", path).data.table
    except Exception as error:  # noqa: BLE001 - pyarrow and datasets raise many kinds for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({error})") from None


def read_rows(path: Path, suffixes: Sequence[str] = RECORD_SUFFIXES) -> Iterator[tuple[int, dict]]:
    """(row, record) of a held-out record file, for the evaluators, which check each record themselves:
    - .parquet: `parquet_table`, each row as stored (an HF Image column as {"bytes", "path"});
    - .jsonl (one object a line) and .json (a list of objects): through datasets when pyarrow reads the file
      as written; else the line reader (`json_lines`), which keeps each record as written and names the
      line of a fault (a line that is not JSON, not an object or not UTF-8). pyarrow's reading differs
      from the file where a key is missing from some rows or null (both read as null), a value's type
      changes between rows (read as JSON text), or an integer shares a column with decimals (read as one).
    `row` is the record's number from 0 (.jsonl: among the non-blank lines, as training counts)."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(f"{path}: unknown file type {suffix!r} (expected {', '.join(suffixes)})")
    if suffix == ".parquet":
        yield from enumerate(_python_rows(parquet_table(path)))
        return
    table = _as_written(path)
    if table is not None:
        yield from enumerate(_python_rows(table))
    elif suffix == ".jsonl":
        for line_number, row, text in json_lines(path):
            if text is None:
                raise ValueError(f"{path}: line {line_number} is not UTF-8 text")
            yield row, json_object(text, path, f"line {line_number}")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        records = parse_json(text, path, "the file")
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for row, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: record {row} must be an object, got {type(record).__name__}")
            yield row, record


def _python_rows(table: pa.Table) -> Iterator[dict]:
    for batch in table.to_batches(max_chunksize=CHUNK_ROWS):
        yield from batch.to_pylist()


def _as_written(path: Path) -> pa.Table | None:
    """A .jsonl / .json file's rows through datasets, or None where pyarrow's reading would differ from
    the file (see `read_rows`), or cannot read it: the line reader reads it then."""
    start = _leading_bytes(path)
    if start == b"" or path.suffix.lower() == ".json" and start != b"[{":
        return None  # datasets would read {column: [values]}, or [1, 2] as a column "text", as records
    try:
        table = _load("json", path).data.table
        table.validate(full=True)  # a string that is not UTF-8
    except Exception:  # noqa: BLE001 - pyarrow refuses a file in many ways; the line reader says which line, and why
        return None
    if not all(_exact_type(field.type) for field in table.schema):
        return None
    if any(_has_nulls(chunk) for column in table.columns for chunk in column.chunks):
        return None
    return table


def _leading_bytes(path: Path, count: int = 2) -> bytes:
    """The file's first `count` bytes that are not white space (fewer when it has fewer)."""
    found = b""
    with open(path, "rb") as f:
        while len(found) < count and (block := f.read(1 << 16)):
            found += b"".join(block.split())[: count - len(found)]
    return found


def _exact_type(t: pa.DataType) -> bool:
    """Whether values of this type read back as JSON wrote them: no JSON text (a type changed between
    rows), no decimals (an integer among them reads as a float), no all-null column."""
    if isinstance(t, pa.BaseExtensionType) or pa.types.is_floating(t) or pa.types.is_null(t):
        return False
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _exact_type(t.value_type)
    if pa.types.is_struct(t):
        return all(_exact_type(t.field(i).type) for i in range(t.num_fields))
    return True


def _has_nulls(array: pa.Array) -> bool:
    """A null anywhere, nested values included: a key missing from some record, or null in it."""
    if array.null_count:
        return True
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return _has_nulls(array.flatten())
    if pa.types.is_struct(array.type):
        return any(_has_nulls(child) for child in array.flatten())
    return False

"""Training data: MMEB-train rows, NLI triplets and teacher embeddings, read into `Example`s, with
every bad row counted and reported.

Light on purpose: torch, numpy, PIL, pyarrow, json and csv only (no transformers).

Rows and rules
--------------
- MMEB-train (`.jsonl` or `.parquet`): columns `qry`, `qry_image_path`, `pos_text`,
  `pos_image_path`, optional `neg_text`, `neg_image_path` (a string, or a list of strings for several
  hard negatives). Image paths are relative to `image_dir` ("" = no image; absolute paths are kept; with
  `image_dir=None` they are relative to the data file's folder, and a file none of whose relative image
  paths is found there is an error that suggests `--image_dir`). `<|image_1|>` marks where an image goes
  and is kept verbatim; the encoder rewrites it for its backbone.
- NLI triplets (`.csv`, E5-V's `nli_for_simcse.csv`): `sent0` (anchor), `sent1` (entailment),
  `hard_neg` (contradiction; may be empty).
- `Example.row` is the 0-based data row in its file (JSONL: non-blank lines; CSV: rows after the header).

A malformed file (a required column missing, a value of the wrong type, a line that is not JSON) is a
`ValueError` naming the file and the column, raised at load time, before training. A bad row (an empty
query or positive, a referenced image that does not exist, an image token with no image, negatives whose
texts and images differ in number) is skipped and counted in a `DataReport`, which keeps the first
offenders; with `strict=True` it raises `BadRowError` naming the file and the row. Images are checked
for existence at load time and decoded lazily with `load_image` (the collator reports corrupt ones as
"corrupt image").

Teacher embeddings (UniME stage 1): `load_teacher`, layout in `mmfast.train.teacher_file`.
Several subsets with weights from `--data`: `mmfast.train.data_spec`. Batches: `mmfast.train.sampling`.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mmfast.train.data_report import BadImageError, BadRowError, DataReport
from mmfast.train.placeholder import placeholder_problem
from mmfast.train.sampling import ContrastiveBatchSampler, Mixture, mixture
from mmfast.train.teacher_file import TeacherEmbeddings, load_teacher, save_teacher

__all__ = [
    "BadImageError",
    "BadRowError",
    "ContrastiveBatchSampler",
    "DataReport",
    "EmbeddingDataset",
    "Example",
    "Input",
    "Mixture",
    "TeacherEmbeddings",
    "load_image",
    "load_mmeb_train",
    "load_nli_triplets",
    "load_teacher",
    "mixture",
    "save_teacher",
    "subset_name",
]

MMEB_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MMEB_NEGATIVES = ("neg_text", "neg_image_path")
NLI_COLUMNS = ("sent0", "sent1", "hard_neg")


@dataclass(frozen=True)
class Input:
    """One side of a pair: text with an optional image."""

    text: str
    image: str | None = None  # absolute path, or None for text only


@dataclass(frozen=True)
class Example:
    query: Input
    positive: Input
    negatives: tuple[Input, ...]
    subset: str
    source: str
    row: int
    teacher: int | None = None  # row into the teacher arrays, when there are any


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decodes an image file to RGB; raises BadImageError(path, reason) when it is missing or corrupt."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(str(path), "missing image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(str(path), "corrupt image", f"{type(e).__name__}: {e}") from None


_SHARD = re.compile(r"^(original|diverse_instruction|train|test|data)?(-\d+-of-\d+)?$")


def subset_name(path: str | os.PathLike) -> str:
    """The subset a data file belongs to: its stem (`ImageNet_1K.jsonl`), or its folder for the HF
    layout (`ImageNet_1K/original-00000-of-00001.parquet`)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    return path.parent.name if _SHARD.match(stem) and path.parent.name else stem


# ---------------------------------------------------------------------------------------------- MMEB


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a .jsonl file that is a data error of its row (counted or, strict, raised), not of the file."""

    reason: str


def _jsonl_rows(path: Path) -> Iterator[dict | UnreadableRow]:
    """The objects of a .jsonl file, one per non-empty line; a line that is not UTF-8 text is an
    UnreadableRow in its place (a bad row), where a line that is not JSON rejects the file."""
    with open(path, "rb") as f:
        row = 0
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield UnreadableRow("not UTF-8 text")
                row += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_number} (row {row}) is not valid JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {line_number} (row {row}) is a {type(record).__name__}, not an object")
            yield record
            row += 1


def _parquet_rows(
    path: Path, required: Sequence[str], optional: Sequence[str], limit: int | None = None
) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {schema.names})")
    columns = [c for c in (*required, *optional) if c in schema.names]
    for c in columns:
        t = schema.field(c).type
        stringy = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
        listy = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
        )
        if not (stringy or (listy and c in optional)):
            raise ValueError(
                f"{path}: column {c!r} has type {t}, expected string" + (" or list<string>" * (c in optional))
            )
    if limit is not None:  # the first rows only, without reading the whole file (batches end at row groups)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=max(limit, 1), columns=columns):
            rows = batch.to_pylist()[:limit]
            yield from rows
            limit -= len(rows)
            if limit <= 0:
                return
        return
    table = pq.read_table(path, columns=columns)
    yield from table.to_pylist()


def _text(path: Path, row: int, record: dict, column: str, *, optional: bool = False) -> str | list[str]:
    if column not in record:
        if optional:
            return ""
        raise ValueError(f"{path}: row {row} has no column {column!r} (has {sorted(record)})")
    value = record[column]
    if value is None or isinstance(value, str):
        return value or ""
    if optional and isinstance(value, list) and all(isinstance(v, str) or v is None for v in value):
        return [v or "" for v in value]
    expected = "a string or a list of strings" if optional else "a string"
    raise ValueError(
        f"{path}: row {row}, column {column!r} is {type(value).__name__} {value!r:.60}, expected {expected}"
    )


def _resolve(image_dir: Path, image: str) -> str | None:
    return os.path.abspath(os.path.join(image_dir, image)) if image else None


def _negatives(neg_text: str | list[str], neg_image: str | list[str]) -> list[tuple[str, str]] | None:
    """Pairs (text, image) of the hard negatives; None when texts and images differ in number."""
    texts = neg_text if isinstance(neg_text, list) else [neg_text]
    images = neg_image if isinstance(neg_image, list) else [neg_image]
    if len(texts) != len(images):  # an empty side stands for "no image" / "no text" of every negative
        if texts in ([], [""]):
            texts = [""] * len(images)
        elif images in ([], [""]):
            images = [""] * len(texts)
        else:
            return None
    return [(t, i) for t, i in zip(texts, images, strict=True) if t or i]


def _row_problem(example: Example) -> tuple[str, str | None] | None:
    """Why this row cannot be used (a DataReport reason, with the offending image path), or None."""
    sides = [(example.query, "query"), (example.positive, "positive")] + [(n, "negative") for n in example.negatives]
    for side, what in sides:
        if not side.text.strip() and side.image is None:
            return f"empty {what}", None
        problem = placeholder_problem(side.text, side.image is not None, what)
        if problem:
            return problem, None
        if side.image is not None and not os.path.isfile(side.image):
            return "missing image", side.image
    return None


def _check_images_beside(path: Path, records: Sequence[dict]) -> None:
    """Without an image_dir, relative image paths are read beside the data file. When not one of them is
    there, the data surely lives elsewhere (the HF layout keeps images apart): an error, not every image
    row skipped."""
    relative = [
        image
        for record in records
        for column in ("qry_image_path", "pos_image_path", "neg_image_path")
        for image in (record.get(column) if isinstance(record.get(column), list) else [record.get(column)])
        if isinstance(image, str) and image and not os.path.isabs(image)
    ]
    if relative and not any(os.path.isfile(path.parent / image) for image in relative):
        tried = os.path.abspath(path.parent / relative[0])
        raise ValueError(
            f"{path}: no image found beside the data file (tried {tried} for row paths like {relative[0]!r}, "
            f"and {len(relative) - 1} more); give the folder the image paths start from with --image_dir "
            "(or image_dir: in a data spec)"
        )


def _as_paths(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not paths:
        raise ValueError("no data files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    return paths


def load_mmeb_train(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    image_dir: str | os.PathLike | None,
    *,
    subset: str | None = None,
    strict: bool = False,
    report: DataReport | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Reads MMEB-train rows from .jsonl / .parquet files (see the module docstring for the rules).
    `subset` names the examples' subset; by default each file's `subset_name`. `limit`: read only the
    first rows of each file (a dry run's sample)."""
    report = DataReport(strict=strict) if report is None else report
    examples = []
    for path in _as_paths(files):
        if path.suffix == ".jsonl":
            rows = itertools.islice(_jsonl_rows(path), limit)
        elif path.suffix == ".parquet":
            rows = _parquet_rows(path, MMEB_REQUIRED, MMEB_NEGATIVES, limit)
        else:
            raise ValueError(f"{path}: MMEB-train data must be .jsonl or .parquet")
        base = Path(image_dir) if image_dir is not None else path.parent
        name, source, count, read = subset or subset_name(path), str(path), 0, []
        for row, record in enumerate(rows):
            count += 1
            if isinstance(record, UnreadableRow):
                report.skip(source, row, record.reason, strict=strict or None)
                continue
            texts = {c: _text(path, row, record, c) for c in MMEB_REQUIRED}
            negatives = _negatives(*(_text(path, row, record, c, optional=True) for c in MMEB_NEGATIVES))
            if negatives is None:
                report.skip(source, row, "ragged negatives", strict=strict or None)
                continue
            example = Example(
                query=Input(texts["qry"], _resolve(base, texts["qry_image_path"])),
                positive=Input(texts["pos_text"], _resolve(base, texts["pos_image_path"])),
                negatives=tuple(Input(t, _resolve(base, i)) for t, i in negatives),
                subset=name,
                source=source,
                row=row,
            )
            read.append((example, record))
        if image_dir is None:
            _check_images_beside(path, [record for _, record in read])
        for example, _ in read:
            row = example.row
            problem = _row_problem(example)
            if problem is not None:
                report.skip(source, row, problem[0], problem[1], strict=strict or None)
                continue
            examples.append(example)
        report.read(source, count)
    return examples


# ----------------------------------------------------------------------------------------------- NLI


def load_nli_triplets(
    path: str | os.PathLike,
    *,
    subset: str | None = None,
    strict: bool = False,
    report: DataReport | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Reads E5-V NLI triplets (sent0, sent1, hard_neg) from a CSV file; text only (`limit`: the first rows)."""
    (path,) = _as_paths(path)
    report = DataReport(strict=strict) if report is None else report
    source, name, examples, count = str(path), subset or subset_name(path), [], 0
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NLI_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (header {reader.fieldnames})")
        for row, record in enumerate(itertools.islice(reader, limit)):
            count += 1
            if None in record or any(value is None for value in record.values()):
                raise ValueError(f"{path}: row {row} does not have the header's {len(reader.fieldnames)} fields")
            anchor, positive, negative = (record[c] for c in NLI_COLUMNS)
            for text, what in ((anchor, "query"), (positive, "positive")):
                if not text.strip():
                    report.skip(source, row, f"empty {what}", strict=strict or None)
                    break
            else:
                negatives = (Input(negative),) if negative.strip() else ()
                examples.append(Example(Input(anchor), Input(positive), negatives, name, source, row))
    report.read(source, count)
    return examples


# ------------------------------------------------------------------------------------------- dataset


class EmbeddingDataset(torch.utils.data.Dataset):
    """Examples by index (a list or a `Mixture`), with their teacher embeddings when there are any."""

    def __init__(self, examples: Sequence[Example], teacher: TeacherEmbeddings | None = None):
        self.examples, self.teacher = examples, teacher
        if teacher is not None:
            for e in examples:
                if e.teacher is None or not 0 <= e.teacher < len(teacher):
                    rows = f"{teacher.path} ({len(teacher)} rows)"
                    raise ValueError(f"{e.source}, row {e.row}: teacher row {e.teacher} is not in {rows}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

"""Training data: MMEB-train rows and NLI triplets, read through Hugging Face `datasets` (Arrow,
memory-mapped; `mmfast.train.records`) and checked column by column, with every bad row counted and
reported. A row becomes an `Example` only when it is indexed.

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
query or positive, a referenced image that does not exist, an image token with no image, several image
tokens in one input, negatives whose texts and images differ in number, a line that is not UTF-8) is
skipped and counted in a `DataReport`, which keeps the first offenders; with `strict=True` it raises
`BadRowError` naming the file and the row. Images are checked for existence at load time and decoded
lazily with `load_image` (the collator reports corrupt ones as "corrupt image").

`limit` reads only a file's first rows; with `streaming=True` they are read from the file as a stream
(nothing converted, nothing cached): how the dry run reads its sample through this same loader.

Teacher embeddings (UniME stage 1): `mmfast.train.teacher_file`. Several subsets with weights from
`--data`: `mmfast.train.data_spec`. Batches: `mmfast.train.sampling`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, UnidentifiedImageError

from mmfast.train.data_report import BadImageError, DataReport
from mmfast.train.placeholder import IMAGE_PLACEHOLDER, placeholder_problems, placeholder_reasons
from mmfast.train.records import UNREADABLE, open_records, table_chunks
from mmfast.train.sampling import Concatenation, Mixture
from mmfast.train.teacher_file import TeacherEmbeddings

__all__ = [
    "EmbeddingDataset",
    "Example",
    "FileRows",
    "Input",
    "load_image",
    "load_mmeb_train",
    "load_nli_triplets",
    "subset_name",
]

MMEB_REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MMEB_NEGATIVES = ("neg_text", "neg_image_path")
NLI_COLUMNS = ("sent0", "sent1", "hard_neg")
SLICE_ROWS = 8192  # rows a slice of FileRows takes from its table at once


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


# ------------------------------------------------------------------------------------------ the rows


@dataclass(frozen=True)
class FileRows(Sequence[Example]):
    """The usable rows of one data file, as `Example`s built when indexed from its Arrow table.

    `rows`: the file rows that are usable (0-based, in file order); `negatives`: each one's number of
    hard negatives; `images`: whether any of them has an image; `image_depth`: each one's `image_depth`.
    `teacher_offset`: the teacher row of file row 0 (None without a teacher file)."""

    kind: str  # "mmeb" or "nli"
    source: str
    subset: str
    table: pa.Table
    rows: np.ndarray
    negatives: np.ndarray
    images: bool
    image_depth: np.ndarray
    base: str = ""  # where relative image paths start (MMEB)
    teacher_offset: int | None = None
    first_row: int = 0  # the file row of the table's first row (a chunk of a stream)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):  # read by chunk of rows, not one row at a time
            rows = self.rows[index]
            return [
                self._example(self.first_row + int(row), record)
                for start in range(0, len(rows), SLICE_ROWS)
                for row, record in zip(
                    rows[start : start + SLICE_ROWS],
                    self.table.take(pa.array(rows[start : start + SLICE_ROWS])).to_pylist(),
                    strict=True,
                )
            ]
        row = int(self.rows[index])
        (record,) = self.table.slice(row, 1).to_pylist()
        return self._example(self.first_row + row, record)

    def _example(self, row: int, record: dict) -> Example:
        teacher = None if self.teacher_offset is None else self.teacher_offset + row
        if self.kind == "nli":
            anchor, positive, negative = (record[c] or "" for c in NLI_COLUMNS)
            negatives = (Input(negative),) if negative.strip() else ()
            return Example(Input(anchor), Input(positive), negatives, self.subset, self.source, row, teacher)
        pairs = _negatives(*(record.get(c) for c in MMEB_NEGATIVES)) or []
        return Example(
            query=Input(record["qry"] or "", _resolve(self.base, record["qry_image_path"])),
            positive=Input(record["pos_text"] or "", _resolve(self.base, record["pos_image_path"])),
            negatives=tuple(Input(t, _resolve(self.base, i)) for t, i in pairs),
            subset=self.subset,
            source=self.source,
            row=row,
            teacher=teacher,
        )

    def teacher_rows(self) -> np.ndarray:
        """Each usable row's teacher row (-1 without a teacher file)."""
        if self.teacher_offset is None:
            return np.full(len(self), -1)
        return self.rows + self.first_row + self.teacher_offset

    def with_teacher(self, offset: int) -> FileRows:
        return replace(self, teacher_offset=offset)


NO_IMAGE = np.iinfo(np.int32).max


def image_depth(example: Example) -> int:
    """How many of a row's hard negatives the loss must see for the row to hold an image: 0 when its query
    or positive has one, k when its k-th negative is the first that has one, NO_IMAGE when none has. A
    row reaches the vision tower when it keeps at least that many negatives (`max_negatives`)."""
    if example.query.image is not None or example.positive.image is not None:
        return 0
    return next((k for k, side in enumerate(example.negatives, 1) if side.image is not None), NO_IMAGE)


def _resolve(base: str, image: str | None) -> str | None:
    return os.path.abspath(os.path.join(base, image)) if image else None


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [v or "" for v in value] if isinstance(value, list) else [value]


def _negatives(neg_text, neg_image) -> list[tuple[str, str]] | None:
    """Pairs (text, image) of the hard negatives; None when texts and images differ in number."""
    texts, images = _as_list(neg_text), _as_list(neg_image)
    if len(texts) != len(images):  # an empty side stands for "no image" / "no text" of every negative
        if texts in ([], [""]):
            texts = [""] * len(images)
        elif images in ([], [""]):
            images = [""] * len(texts)
        else:
            return None
    return [(t, i) for t, i in zip(texts, images, strict=True) if t or i]


# ------------------------------------------------------------------------------- checks by column

FIRST_READ_REASONS = ("not UTF-8 text", "ragged negatives")  # found as a row is read, before the others
SIDES = ("query", "positive", "negative")
REASONS = tuple(dict.fromkeys(
    ("", *FIRST_READ_REASONS)
    + tuple(reason for what in SIDES for reason in (f"empty {what}", *placeholder_reasons(what)))
    + ("missing image",)
))  # fmt: skip
CODE = {reason: code for code, reason in enumerate(REASONS)}


def _string_column(path: Path, table: pa.Table, column: str, optional: bool) -> None:
    t = table.schema.field(column).type
    stringy = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    listy = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type) or pa.types.is_null(t.value_type)
    )
    if not (stringy or (listy and optional)):
        raise ValueError(f"{path}: column {column!r} has type {t}, expected string" + (" or list<string>" * optional))


def check_columns(path: Path, table: pa.Table, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """A ValueError naming the file and the column when a required one is missing or a type is wrong."""
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    for column in required:
        _string_column(path, table, column, False)
    for column in optional:
        if column in table.column_names:
            _string_column(path, table, column, True)


def _strings(table: pa.Table, column: str) -> pa.ChunkedArray:
    values = table.column(column)
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    return pc.fill_null(values, "")


def _numpy(values) -> np.ndarray:
    return np.asarray(values.to_numpy(zero_copy_only=False))


class _ImageFiles:
    """os.path.isfile, once per path."""

    def __init__(self):
        self.seen: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        found = self.seen.get(path)
        if found is None:
            found = self.seen[path] = os.path.isfile(path)
        return found


@dataclass
class _Verdicts:
    """What the checks found in a file's rows, chunk after chunk."""

    codes: list[np.ndarray]
    negatives: list[np.ndarray]
    bad_images: dict[int, str]
    depths: list[np.ndarray] = field(default_factory=list)  # each row's image_depth
    images: bool = False
    relative: str | None = None  # the first relative image path (image_dir None)
    relative_count: int = 0
    found_beside: bool = False
    rows: int = 0


def _side_codes(code: np.ndarray, text: pa.ChunkedArray, has_image: np.ndarray, what: str) -> None:
    """Marks the rows whose `what` side is empty or breaks the placeholder rule (where still unmarked)."""
    empty = _numpy(pc.equal(pc.utf8_trim_whitespace(text), "")) & ~has_image
    code[(code == 0) & empty] = CODE[f"empty {what}"]  # an empty text holds no placeholder: the two never meet
    for rows, reason in placeholder_problems(_numpy(pc.count_substring(text, IMAGE_PLACEHOLDER)), has_image, what):
        code[(code == 0) & rows] = CODE[reason]


def _image_codes(code, start: int, images: pa.ChunkedArray, has_image: np.ndarray, base: str, exists: _ImageFiles,
                 verdicts: _Verdicts) -> None:  # fmt: skip
    """Marks the rows whose image file does not exist (where still unmarked)."""
    where = np.flatnonzero((code == 0) & has_image)
    for i, image in zip(where, images.take(pa.array(where)).to_pylist(), strict=True):
        path = _resolve(base, image)
        if not exists(path):
            code[i] = CODE["missing image"]
            verdicts.bad_images[start + int(i)] = path


def _note_relative(images: Iterable[str], base: str, exists: _ImageFiles, verdicts: _Verdicts) -> None:
    """Without an image_dir: whether any relative image path is found beside the data file."""
    for image in images:
        if image and not os.path.isabs(image):
            verdicts.relative_count += 1
            verdicts.relative = verdicts.relative or image
            verdicts.found_beside = verdicts.found_beside or exists(os.path.join(base, image))


def _negative_codes(code, start: int, negative_pairs: dict[int, list[tuple[str, str]]], base: str,
                    exists: _ImageFiles, verdicts: _Verdicts) -> None:  # fmt: skip
    """Marks the rows one of whose negatives is empty, breaks the placeholder rule or misses its image
    (where still unmarked): the negatives in order, the texts checked by column as the other sides are."""
    owners = [i for i, pairs in negative_pairs.items() for _ in pairs]
    if not owners:
        return
    images = [image for pairs in negative_pairs.values() for _, image in pairs]
    text_codes = np.zeros(len(owners), np.uint8)
    texts = pa.array([text for pairs in negative_pairs.values() for text, _ in pairs], pa.string())
    _side_codes(text_codes, texts, np.array([bool(image) for image in images]), "negative")
    for i, text_code, image in zip(owners, text_codes.tolist(), images, strict=True):
        if code[i]:
            continue
        if text_code:
            code[i] = text_code
        elif image and not exists(_resolve(base, image)):
            code[i] = CODE["missing image"]
            verdicts.bad_images[start + i] = _resolve(base, image)


def _check_mmeb_chunk(chunk: pa.Table, start: int, base: str, beside: bool, exists: _ImageFiles,
                      verdicts: _Verdicts) -> None:  # fmt: skip
    n = chunk.num_rows
    code = np.zeros(n, np.uint8)
    if UNREADABLE in chunk.column_names:
        code[_numpy(pc.is_valid(chunk.column(UNREADABLE)))] = CODE["not UTF-8 text"]
    texts = {c: _strings(chunk, c) for c in ("qry", "pos_text")}
    images = {c: _strings(chunk, c) for c in ("qry_image_path", "pos_image_path")}
    has_image = {c: _numpy(pc.not_equal(values, "")) for c, values in images.items()}
    # Hard negatives: per row, in Python, only where a row has any (most rows of MMEB-train have none).
    count = np.zeros(n, np.int32)
    present = [c for c in MMEB_NEGATIVES if c in chunk.column_names]
    some = np.zeros(n, bool)
    for column in present:
        values = chunk.column(column)
        if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            some |= _numpy(pc.fill_null(pc.list_value_length(values), 0)) > 0
        elif not pa.types.is_null(values.type):
            some |= _numpy(pc.not_equal(pc.fill_null(values, ""), ""))
    negative_pairs = {}
    if some.any():
        where = np.flatnonzero(some & (code == 0))
        taken = chunk.select(present).take(pa.array(where)).to_pylist()
        for i, record in zip(where, taken, strict=True):
            pairs = _negatives(*(record.get(c) for c in MMEB_NEGATIVES))
            if pairs is None:
                code[i] = CODE["ragged negatives"]
            else:
                negative_pairs[int(i)], count[i] = pairs, len(pairs)
    if beside and not verdicts.found_beside:
        for column, values in images.items():
            _note_relative(values.filter(pa.array(has_image[column])).to_pylist(), base, exists, verdicts)
        _note_relative((i for pairs in negative_pairs.values() for _, i in pairs), base, exists, verdicts)
    for what, text, image in (("query", "qry", "qry_image_path"), ("positive", "pos_text", "pos_image_path")):
        _side_codes(code, texts[text], has_image[image], what)
        _image_codes(code, start, images[image], has_image[image], base, exists, verdicts)
    _negative_codes(code, start, negative_pairs, base, exists, verdicts)
    depth = np.where(has_image["qry_image_path"] | has_image["pos_image_path"], 0, NO_IMAGE).astype(np.int32)
    for i, pairs in negative_pairs.items():  # by column for the rows without negatives, the most
        if depth[i]:
            depth[i] = next((k for k, (_, image) in enumerate(pairs, 1) if image), NO_IMAGE)
    verdicts.depths.append(depth)
    usable = code == 0
    verdicts.images = verdicts.images or bool(
        (has_image["qry_image_path"] | has_image["pos_image_path"])[usable].any()
        or any(image for i, pairs in negative_pairs.items() if usable[i] for _, image in pairs)
    )
    verdicts.codes.append(code)
    verdicts.negatives.append(count)


def _check_nli_chunk(chunk: pa.Table, verdicts: _Verdicts) -> None:
    code = np.zeros(chunk.num_rows, np.uint8)
    for column, what in (("sent0", "query"), ("sent1", "positive")):
        empty = _numpy(pc.equal(pc.utf8_trim_whitespace(_strings(chunk, column)), ""))
        code[(code == 0) & empty] = CODE[f"empty {what}"]
    negative = _numpy(pc.not_equal(pc.utf8_trim_whitespace(_strings(chunk, "hard_neg")), ""))
    verdicts.codes.append(code)
    verdicts.negatives.append(negative.astype(np.int32))
    verdicts.depths.append(np.full(chunk.num_rows, NO_IMAGE, np.int32))


def _report(verdicts: _Verdicts, source: str, report: DataReport, strict: bool, before_others=None,
            start: int = 0) -> np.ndarray:  # fmt: skip
    """Counts (or, strict, raises) the bad rows in file order, those found as rows are read first, as a
    reader that meets them line by line would; `before_others` runs between the two. The usable rows
    (`start`: the file row of the verdicts' first row)."""
    code = np.concatenate(verdicts.codes) if verdicts.codes else np.zeros(0, np.uint8)
    first = np.isin(code, [CODE[r] for r in FIRST_READ_REASONS])
    for row in np.flatnonzero(first) + start:
        report.skip(source, int(row), REASONS[code[row - start]], strict=strict or None)
    if before_others is not None:
        before_others()
    for row in np.flatnonzero((code != 0) & ~first) + start:
        reason, image = REASONS[code[row - start]], verdicts.bad_images.get(int(row))
        report.skip(source, int(row), reason, image, strict=strict or None)
    report.read(source, len(code))
    return np.flatnonzero(code == 0) + start


def _load_file(path: Path, kind: str, *, image_dir, subset: str | None, strict: bool, report: DataReport,
               limit: int | None, streaming: bool) -> FileRows:  # fmt: skip
    required, optional = (MMEB_REQUIRED, MMEB_NEGATIVES) if kind == "mmeb" else (NLI_COLUMNS, ())
    records = open_records(path, required=required, lists=optional, streaming=streaming)
    base = str(Path(image_dir) if image_dir is not None else path.parent)
    verdicts, exists, chunks = _Verdicts([], [], {}), _ImageFiles(), []
    columns = (*required, *optional, UNREADABLE)
    for chunk in table_chunks(records, columns, limit=limit):
        if verdicts.rows == 0:
            check_columns(path, chunk, required, optional)
        if kind == "mmeb":
            _check_mmeb_chunk(chunk, verdicts.rows, base, image_dir is None, exists, verdicts)
        else:
            _check_nli_chunk(chunk, verdicts)
        verdicts.rows += chunk.num_rows
        if streaming:  # a sample, kept in memory
            chunks.append(chunk)
    if streaming:
        table = pa.concat_tables(chunks) if chunks else pa.table({c: pa.array([], pa.string()) for c in required})
    else:
        table = records.data.table
        table = table.select([c for c in columns if c in table.column_names])
        if verdicts.rows == 0:
            check_columns(path, table, required, optional)

    source = str(path)
    usable = _report(verdicts, source, report, strict, lambda: image_dir is None and _images_beside(path, verdicts))
    negatives = np.concatenate(verdicts.negatives)[usable] if verdicts.negatives else np.zeros(0, np.int32)
    depth = np.concatenate(verdicts.depths)[usable] if verdicts.depths else np.zeros(0, np.int32)
    return FileRows(kind, source, subset or subset_name(path), table, usable, negatives, verdicts.images, depth, base)


def _images_beside(path: Path, verdicts: _Verdicts) -> None:
    """Without an image_dir, relative image paths none of which is beside the data file: the data surely
    lives elsewhere (the HF layout keeps images apart), an error rather than every image row skipped."""
    if verdicts.relative and not verdicts.found_beside:
        tried = os.path.abspath(path.parent / verdicts.relative)
        raise ValueError(
            f"{path}: no image found beside the data file (tried {tried} for row paths like "
            f"{verdicts.relative!r}, and {verdicts.relative_count - 1} more); give the folder the image paths "
            "start from with --image_dir (or image_dir: in a data spec)"
        )


def check_file_chunk(path: Path, source, chunk: pa.Table, start: int, state: dict, strict: bool,
                     report: DataReport) -> list[Example]:  # fmt: skip
    """A chunk of a streamed file (file rows start, start + 1, ...) checked as a converted file is; its
    usable rows as Examples. `source` is the subset's `DataSource`; `state` carries what the file's
    earlier chunks found (whether its relative image paths are found beside it)."""
    mmeb = source.format == "mmeb"
    required, optional = (MMEB_REQUIRED, MMEB_NEGATIVES) if mmeb else (NLI_COLUMNS, ())
    if start == 0:
        check_columns(path, chunk, required, optional)
    image_dir = source.image_dir
    base = str(Path(image_dir) if image_dir is not None else path.parent)
    verdicts = state.setdefault("verdicts", _Verdicts([], [], {}))
    verdicts.codes, verdicts.negatives, verdicts.bad_images, verdicts.depths = [], [], {}, []
    if mmeb:
        _check_mmeb_chunk(chunk, start, base, image_dir is None, _ImageFiles(), verdicts)
    else:
        _check_nli_chunk(chunk, verdicts)
    beside = (lambda: _images_beside(path, verdicts)) if image_dir is None else None
    usable = _report(verdicts, str(path), report, strict, beside, start)
    negatives = np.concatenate(verdicts.negatives)[usable - start]
    depth = np.concatenate(verdicts.depths)[usable - start]
    rows = FileRows(source.format, str(path), source.name, chunk, usable - start, negatives, verdicts.images, depth,
                    base, first_row=start)  # fmt: skip
    return list(rows)


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
    streaming: bool = False,
) -> Sequence[Example]:
    """Reads MMEB-train rows from .jsonl / .parquet files (see the module docstring for the rules).
    `subset` names the examples' subset; by default each file's `subset_name`. `limit`: read only the
    first rows of each file; `streaming`: read them as a stream, converting nothing."""
    report = DataReport(strict=strict) if report is None else report
    parts = []
    for path in _as_paths(files):
        if path.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"{path}: MMEB-train data must be .jsonl or .parquet")
        parts.append(_load_file(path, "mmeb", image_dir=image_dir, subset=subset, strict=strict, report=report,
                                limit=limit, streaming=streaming))  # fmt: skip
    return parts[0] if len(parts) == 1 else Concatenation(parts)


def load_nli_triplets(
    path: str | os.PathLike,
    *,
    subset: str | None = None,
    strict: bool = False,
    report: DataReport | None = None,
    limit: int | None = None,
    streaming: bool = False,
) -> FileRows:
    """Reads E5-V NLI triplets (sent0, sent1, hard_neg) from a CSV file; text only (`limit`: the first rows)."""
    (path,) = _as_paths(path)
    report = DataReport(strict=strict) if report is None else report
    return _load_file(path, "nli", image_dir=None, subset=subset, strict=strict, report=report, limit=limit,
                      streaming=streaming)  # fmt: skip


# ------------------------------------------------------------------------------------------- dataset


def file_rows(examples: Sequence[Example]) -> Iterator[tuple[str, np.ndarray]]:
    """(source, the file row of each example) per stretch of examples from one file, in their order: by
    column for `FileRows` and concatenations of them, one by one for rows in memory."""
    if isinstance(examples, Mixture):
        examples = examples.items
    if isinstance(examples, FileRows):
        yield examples.source, examples.rows + examples.first_row
    elif isinstance(examples, Concatenation):
        for part in examples.parts:
            yield from file_rows(part)
    else:
        for e in examples:
            yield e.source, np.array([e.row])


def teacher_rows(examples: Sequence[Example]) -> np.ndarray:
    """Each example's teacher row (-1 for none): by column for `FileRows` and concatenations of them."""
    if isinstance(examples, Mixture):
        examples = examples.items
    if isinstance(examples, FileRows):
        return examples.teacher_rows()
    if isinstance(examples, Concatenation):
        return np.concatenate([teacher_rows(p) for p in examples.parts] or [np.zeros(0, np.int64)])
    return np.array([-1 if e.teacher is None else e.teacher for e in examples], dtype=np.int64)


class EmbeddingDataset(torch.utils.data.Dataset):
    """Examples by index (a list or a `Mixture`), with their teacher embeddings when there are any."""

    def __init__(self, examples: Sequence[Example], teacher: TeacherEmbeddings | None = None):
        self.examples, self.teacher = examples, teacher
        if teacher is not None:
            rows = teacher_rows(examples)
            bad = np.flatnonzero((rows < 0) | (rows >= len(teacher)))
            if len(bad):
                e = examples[int(bad[0])]
                where = f"{teacher.path} ({len(teacher)} rows)"
                raise ValueError(f"{e.source}, row {e.row}: teacher row {e.teacher} is not in {where}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

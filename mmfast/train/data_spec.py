"""`--data`: which files to train on, as subsets with weights.

Three forms:
- a list of data files and folders: `--data a.jsonl b.parquet nli.csv`. `.jsonl`/`.parquet` are
  MMEB-train, `.csv` NLI triplets; a folder stands for the data files in it and in its subfolders (the
  HF layout `<Subset>/*.parquet`). Each file's subset is `subset_name(file)`; files of one subset merge,
  except MMEB-train's two instruction splits (below). Images come from `--image_dir`. No weights: subsets
  are sampled in proportion to their sizes.
- a spec file, `.yaml`/`.yml`/`.json`, one entry per subset:
      ImageNet_1K:
        path: train/ImageNet_1K.jsonl      # or a list of files; relative to the spec file
        weight: 2.0                        # optional; a subset without one weighs 1.0 when any has one
        image_dir: .                       # optional; relative to the spec file; else --image_dir
        teacher: teacher.safetensors       # optional (UniME stage 1); one row per data row
        format: mmeb                       # optional: mmeb or nli; else from the suffix
        mmeb_split: diverse_instruction    # optional; else --mmeb_split
        num_sample_per_subset: 1000        # optional; else --num_sample_per_subset
  or the shorthand `Name: path`. A path may also be a folder (the subset's folder of the HF layout).
- `teacher=` attaches a teacher file to the only source of the list form.

MMEB-train publishes each subset twice, `<Subset>/original-*.parquet` and
`<Subset>/diverse_instruction-*.parquet` (the same rows, the instructions reworded). Like VLM2Vec, a
subset trains on one of them: `--mmeb_split` (default `original`) or the spec's `mmeb_split` picks it,
and the other split's files are left out. A subset that has files of another split but none of the
chosen one is an error that names both (never a silent merge, never a silent empty subset). Files whose
names carry no split (`ImageNet_1K.jsonl`) are always read.

`--num_sample_per_subset N` (or the spec's `num_sample_per_subset`): VLM2Vec's cap, the first N rows of
the subset, its files in order; rows that turn out bad among them are skipped and counted as usual.

A subset of several files with a teacher: the teacher's rows follow the files in order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfast.train.data import (
    NO_IMAGE,
    EmbeddingDataset,
    Example,
    FileRows,
    image_depth,
    load_mmeb_train,
    load_nli_triplets,
    subset_name,
)
from mmfast.train.data_report import DataReport
from mmfast.train.mapping_file import read_mapping_file
from mmfast.train.sampling import Concatenation, Mixture, mixture
from mmfast.train.teacher_file import TeacherEmbeddings, load_teacher

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 20_000  # rows of each file a dry run (or a streaming run, up front) reads: more than a global batch
FORMATS = {".jsonl": "mmeb", ".parquet": "mmeb", ".csv": "nli"}
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
SPEC_KEYS = {"path", "weight", "image_dir", "teacher", "format", "mmeb_split", "num_sample_per_subset"}
MMEB_SPLITS = ("original", "diverse_instruction")
_SPLIT_FILE = re.compile(rf"^({'|'.join(MMEB_SPLITS)})(-\d+-of-\d+)?$")


@dataclass(frozen=True)
class DataSource:
    """One subset: its files, their format, where its images are, its weight and teacher file."""

    name: str
    paths: tuple[Path, ...]
    format: str  # "mmeb" or "nli"
    image_dir: Path | None = None
    weight: float | None = None
    teacher: Path | None = None
    max_rows: int | None = None  # num_sample_per_subset: read only the subset's first rows


@dataclass(frozen=True)
class TrainData:
    """The rows of every subset (`mixture`, in `sources` order). What loading them found is counted in the
    `DataReport` the caller gave `load_data`."""

    dataset: EmbeddingDataset
    mixture: Mixture[Example]
    sources: tuple[DataSource, ...]

    def _files(self, name: str) -> list[FileRows]:
        rows = self.mixture.items.parts[self.mixture.names.index(name)]
        return list(rows.parts) if isinstance(rows, Concatenation) else [rows]

    def negatives_per_row(self) -> np.ndarray:
        """Each row's number of hard negatives, in the mixture's order (read by column from files, not row
        by row; rows given in memory are counted one by one)."""
        return np.concatenate([
            f.negatives if isinstance(f, FileRows) else np.array([len(e.negatives) for e in f], dtype=np.int64)
            for name in self.mixture.names
            for f in self._files(name)
        ])  # fmt: skip

    def every_row_has_image(self, max_negatives: int | None) -> bool:
        """Whether every row holds an image on a side the loss sees (its query, positive or first
        `max_negatives` hard negatives, `collator.kept_negatives`): then every mini-batch reaches the vision
        tower. Read by column from files (`FileRows.image_depth`); rows given in memory one by one."""
        kept = NO_IMAGE - 1 if max_negatives is None else max_negatives
        return all(
            bool((f.image_depth <= kept).all()) if isinstance(f, FileRows) else all(image_depth(e) <= kept for e in f)
            for name in self.mixture.names
            for f in self._files(name)
        )

    def subsets_with_images(self) -> list[str]:
        def has_images(rows) -> bool:
            if isinstance(rows, FileRows):
                return rows.images
            return any(side.image for e in rows for side in (e.query, e.positive, *e.negatives))

        return [name for name in self.mixture.names if any(has_images(f) for f in self._files(name))]


def _format_of(path: Path, where: str) -> str:
    if path.suffix not in FORMATS:
        raise ValueError(f"{where}: {path} is not a data file (.jsonl / .parquet for MMEB-train, .csv for NLI)")
    return FORMATS[path.suffix]


def _files_in(folder: Path, where: str = "--data") -> list[Path]:
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in FORMATS)
    files += sorted(p for p in folder.glob("*/*") if p.is_file() and p.suffix in FORMATS)
    if not files:
        raise ValueError(f"{where}: the folder {folder} holds no .jsonl, .parquet or .csv file")
    return files


def split_of(path: Path) -> str | None:
    """The MMEB-train instruction split a file belongs to by its name (`original-00000-of-00001.parquet`)."""
    match = _SPLIT_FILE.match(path.name.split(".")[0])
    return match.group(1) if match else None


def check_split(split: object, where: str) -> str:
    if split not in MMEB_SPLITS:
        raise ValueError(f"{where}: mmeb_split must be one of {', '.join(MMEB_SPLITS)}, got {split!r}")
    return split


def check_max_rows(value: object, where: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}: num_sample_per_subset must be a whole number >= 1, got {value!r}")
    return value


def one_split(name: str, paths: Sequence[Path], split: str, where: str) -> tuple[Path, ...]:
    """The subset's files of `split`, and those named with no split; files of the other split are left out."""
    splits = {path: split_of(path) for path in paths}
    kept = tuple(path for path in paths if splits[path] in (None, split))
    others = sorted({s for s in splits.values() if s not in (None, split)})
    if others and not any(splits[path] == split for path in paths):
        files = ", ".join(str(p) for p in paths)
        raise ValueError(
            f"{where}: subset {name!r} has {' and '.join(others)} files but no {split} file ({files}); "
            f"choose the split with --mmeb_split (or mmeb_split: in a data spec)"
        )
    if others:
        left_out = [str(p) for p in paths if p not in kept]
        logger.info("subset %s: training on the %s split, leaving out %s", name, split, ", ".join(left_out))
    return kept


SPEC_SHAPE = "a non-empty mapping {subset name: {path: ..., weight: ...}}"


def _spec_file(path: Path, image_dir: Path | None, split: str, max_rows: int | None) -> list[DataSource]:
    spec = read_mapping_file(path, "data spec", expected=SPEC_SHAPE)
    if not spec:
        raise ValueError(f"data spec {path} must hold {SPEC_SHAPE}")
    base, sources = path.parent, []
    for name, entry in spec.items():
        where = f"{path}, subset {name!r}"
        entry = {"path": entry} if isinstance(entry, (str, list)) else entry
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{where}: needs a 'path' (a file or a list of files)")
        unknown = set(entry) - SPEC_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
        raw = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        if not raw or not all(isinstance(p, str) and p for p in raw):
            raise ValueError(f"{where}: 'path' must be a file name or a non-empty list of them, got {entry['path']!r}")
        paths = []
        for item in (base / p for p in raw):
            paths += _files_in(item, where) if item.is_dir() else [item]
        own_split = check_split(entry.get("mmeb_split", split), where)
        own_max_rows = check_max_rows(entry.get("num_sample_per_subset", max_rows), where)
        paths = one_split(str(name), paths, own_split, where)
        formats = {_format_of(p, where) for p in paths}
        fmt = entry.get("format", formats.pop() if len(formats) == 1 else None)
        if fmt not in ("mmeb", "nli"):
            raise ValueError(f"{where}: 'format' must be 'mmeb' or 'nli' (files {[str(p) for p in paths]})")
        weight = entry.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0
        ):
            raise ValueError(f"{where}: 'weight' must be a number >= 0, got {weight!r}")
        for key in ("image_dir", "teacher"):
            if key in entry and not isinstance(entry[key], str):
                raise ValueError(f"{where}: {key!r} must be a path, got {entry[key]!r}")
        own_dir = base / entry["image_dir"] if "image_dir" in entry else image_dir
        teacher = base / entry["teacher"] if "teacher" in entry else None
        weight = None if weight is None else float(weight)
        sources.append(DataSource(str(name), paths, fmt, own_dir, weight, teacher, own_max_rows))
    return sources


def parse_data_spec(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_dir: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    mmeb_split: str = "original",
    num_sample_per_subset: int | None = None,
) -> tuple[DataSource, ...]:
    """Turns `--data` (see the module docstring) into subsets; no file is read but a spec file."""
    check_split(mmeb_split, "--mmeb_split")
    check_max_rows(num_sample_per_subset, "--num_sample_per_subset")
    items = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(d) for d in data]
    image_dir = Path(image_dir) if image_dir is not None else None
    if not items:
        raise ValueError("--data: no file given")
    for item in items:
        if not item.exists():
            raise FileNotFoundError(f"--data: {item} does not exist")
    if any(p.suffix in SPEC_SUFFIXES for p in items):
        if len(items) != 1:
            raise ValueError(f"--data: a spec file ({', '.join(map(str, items))}) must be given alone")
        if teacher is not None:
            raise ValueError("--data: with a spec file, give each subset's teacher in the spec")
        sources = _spec_file(items[0], image_dir, mmeb_split, num_sample_per_subset)
    else:
        by_name: dict[str, list[Path]] = {}
        for item in items:
            for path in _files_in(item) if item.is_dir() else [item]:
                by_name.setdefault(subset_name(path), []).append(path)
        sources = []
        for name, paths in by_name.items():
            paths = one_split(name, paths, mmeb_split, "--data")
            formats = {_format_of(p, "--data") for p in paths}
            if len(formats) > 1:
                raise ValueError(f"--data: subset {name!r} mixes formats: {[str(p) for p in paths]}")
            sources.append(DataSource(name, paths, formats.pop(), image_dir, max_rows=num_sample_per_subset))
        if teacher is not None:
            if len(sources) != 1:
                raise ValueError(f"--data: a teacher file needs exactly one subset, got {[s.name for s in sources]}")
            sources = [dataclasses.replace(sources[0], teacher=Path(teacher))]
    return tuple(sources)


def load_data(
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[DataSource],
    *,
    image_dir: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    mmeb_split: str = "original",
    num_sample_per_subset: int | None = None,
    strict: bool = False,
    report: DataReport | None = None,
    sample_rows: int | None = None,
) -> TrainData:
    """Reads every subset of `--data` into one dataset with its mixture (and teacher rows).
    `sample_rows`: read at most that many rows of each file, as a stream (the dry run's sample)."""
    is_spec = not isinstance(data, (str, os.PathLike)) and data and all(isinstance(d, DataSource) for d in data)
    if is_spec:
        sources = tuple(data)
    else:
        split_and_cap = {"mmeb_split": mmeb_split, "num_sample_per_subset": num_sample_per_subset}
        sources = parse_data_spec(data, image_dir=image_dir, teacher=teacher, **split_and_cap)
    report = DataReport(strict=strict) if report is None else report
    with_teacher = [s.teacher is not None for s in sources]
    if any(with_teacher) and not all(with_teacher):
        missing = [s.name for s in sources if s.teacher is None]
        raise ValueError(f"--data: subsets {missing} have no teacher file while others do; distillation needs all")
    subsets, teachers, offset = {}, [], 0
    for source in sources:
        if source.max_rows is not None and source.teacher is not None:
            raise ValueError(
                f"--data: subset {source.name!r}: num_sample_per_subset with a teacher file is not supported "
                "(the teacher holds one row per data row); cut the data file and the teacher instead"
            )
        files, rows, cut = [], 0, False
        for path in source.paths:
            limit = None if source.max_rows is None else source.max_rows - rows
            if limit == 0:
                break
            if sample_rows is not None:
                limit = sample_rows if limit is None else min(limit, sample_rows)
            local = DataReport(strict=strict or report.strict, keep=report.keep)
            read = {"subset": source.name, "strict": strict, "report": local, "limit": limit,
                    "streaming": sample_rows is not None}  # fmt: skip
            if source.format == "nli":
                loaded = load_nli_triplets(path, **read)
            else:
                loaded = load_mmeb_train(path, source.image_dir, **read)
            if source.teacher is not None:
                loaded = loaded.with_teacher(offset + rows)
            files.append(loaded)
            cut = cut or (sample_rows is not None and local.rows_read >= sample_rows)
            rows += local.rows_read
            report.merge(local)
        if source.name in subsets:
            raise ValueError(f"--data: subset {source.name!r} is given twice")
        if not sum(len(f) for f in files):
            raise ValueError(f"--data: subset {source.name!r} has no usable row\n{report.summary()}")
        subsets[source.name] = files[0] if len(files) == 1 else Concatenation(files)
        if source.teacher is not None:
            teachers.append(load_teacher(source.teacher, None if cut else rows))
            offset += rows
    weights = None
    if any(s.weight is not None for s in sources):
        weights = {s.name: 1.0 if s.weight is None else s.weight for s in sources}
    mix = mixture(subsets, weights)
    teacher_rows = None
    if teachers:
        dims = {t.dim for t in teachers}
        if len(dims) > 1:
            raise ValueError(f"--data: teacher files differ in dimension: {[(t.path, t.dim) for t in teachers]}")
        teacher_rows = TeacherEmbeddings(
            torch.cat([t.query for t in teachers]),
            torch.cat([t.positive for t in teachers]),
            "; ".join(t.path for t in teachers),
        )
    return TrainData(EmbeddingDataset(mix, teacher_rows), mix, sources)

"""`--data`: which files to train on, as subsets with weights.

Three forms:
- a list of data files and folders: `--data a.jsonl b.parquet nli.csv`. `.jsonl`/`.parquet` are
  MMEB-train, `.csv` NLI triplets; a folder stands for the data files in it and in its subfolders (the
  HF layout `<Subset>/*.parquet`). Each file's subset is `subset_name(file)`; files of one subset merge.
  Images come from `--image_dir`. No weights: subsets are sampled in proportion to their sizes.
- a spec file, `.yaml`/`.yml`/`.json`, one entry per subset:
      ImageNet_1K:
        path: train/ImageNet_1K.jsonl      # or a list of files; relative to the spec file
        weight: 2.0                        # optional; a subset without one weighs 1.0 when any has one
        image_dir: .                       # optional; relative to the spec file; else --image_dir
        teacher: teacher.safetensors       # optional (UniME stage 1); one row per data row
        format: mmeb                       # optional: mmeb or nli; else from the suffix
  or the shorthand `Name: path`.
- `teacher=` attaches a teacher file to the only source of the list form.

A subset of several files with a teacher: the teacher's rows follow the files in order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmfast.train.data import (
    EmbeddingDataset,
    Example,
    TeacherEmbeddings,
    load_mmeb_train,
    load_nli_triplets,
    load_teacher,
    subset_name,
)
from mmfast.train.data_report import DataReport
from mmfast.train.mapping_file import read_mapping_file
from mmfast.train.sampling import Mixture, mixture

FORMATS = {".jsonl": "mmeb", ".parquet": "mmeb", ".csv": "nli"}
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
SPEC_KEYS = {"path", "weight", "image_dir", "teacher", "format"}


@dataclass(frozen=True)
class DataSource:
    """One subset: its files, their format, where its images are, its weight and teacher file."""

    name: str
    paths: tuple[Path, ...]
    format: str  # "mmeb" or "nli"
    image_dir: Path | None = None
    weight: float | None = None
    teacher: Path | None = None


@dataclass(frozen=True)
class TrainData:
    dataset: EmbeddingDataset
    mixture: Mixture[Example]
    report: DataReport
    sources: tuple[DataSource, ...]


def _format_of(path: Path, where: str) -> str:
    if path.suffix not in FORMATS:
        raise ValueError(f"{where}: {path} is not a data file (.jsonl / .parquet for MMEB-train, .csv for NLI)")
    return FORMATS[path.suffix]


def _files_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in FORMATS)
    files += sorted(p for p in folder.glob("*/*") if p.is_file() and p.suffix in FORMATS)
    if not files:
        raise ValueError(f"--data {folder}: the folder holds no .jsonl, .parquet or .csv file")
    return files


SPEC_SHAPE = "a non-empty mapping {subset name: {path: ..., weight: ...}}"


def _spec_file(path: Path, image_dir: Path | None) -> list[DataSource]:
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
        paths = tuple(base / p for p in raw)
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
        sources.append(DataSource(str(name), paths, fmt, own_dir, None if weight is None else float(weight), teacher))
    return sources


def parse_data_spec(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_dir: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
) -> tuple[DataSource, ...]:
    """Turns `--data` (see the module docstring) into subsets; no file is read but a spec file."""
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
        sources = _spec_file(items[0], image_dir)
    else:
        by_name: dict[str, list[Path]] = {}
        for item in items:
            for path in _files_in(item) if item.is_dir() else [item]:
                by_name.setdefault(subset_name(path), []).append(path)
        sources = []
        for name, paths in by_name.items():
            formats = {_format_of(p, "--data") for p in paths}
            if len(formats) > 1:
                raise ValueError(f"--data: subset {name!r} mixes formats: {[str(p) for p in paths]}")
            sources.append(DataSource(name, tuple(paths), formats.pop(), image_dir))
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
    strict: bool = False,
    report: DataReport | None = None,
) -> TrainData:
    """Reads every subset of `--data` into one dataset with its mixture (and teacher rows)."""
    is_spec = not isinstance(data, (str, os.PathLike)) and data and all(isinstance(d, DataSource) for d in data)
    sources = tuple(data) if is_spec else parse_data_spec(data, image_dir=image_dir, teacher=teacher)
    report = DataReport(strict=strict) if report is None else report
    with_teacher = [s.teacher is not None for s in sources]
    if any(with_teacher) and not all(with_teacher):
        missing = [s.name for s in sources if s.teacher is None]
        raise ValueError(f"--data: subsets {missing} have no teacher file while others do; distillation needs all")
    subsets, teachers, offset = {}, [], 0
    for source in sources:
        examples, rows = [], 0
        for path in source.paths:
            local = DataReport(strict=strict or report.strict, keep=report.keep)
            if source.format == "nli":
                loaded = load_nli_triplets(path, subset=source.name, strict=strict, report=local)
            else:
                loaded = load_mmeb_train(path, source.image_dir, subset=source.name, strict=strict, report=local)
            if source.teacher is not None:
                loaded = [dataclasses.replace(e, teacher=offset + rows + e.row) for e in loaded]
            examples += loaded
            rows += local.rows_read
            report.merge(local)
        if source.name in subsets:
            raise ValueError(f"--data: subset {source.name!r} is given twice")
        if not examples:
            raise ValueError(f"--data: subset {source.name!r} has no usable row\n{report.summary()}")
        subsets[source.name] = examples
        if source.teacher is not None:
            teachers.append(load_teacher(source.teacher, rows))
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
    return TrainData(EmbeddingDataset(mix, teacher_rows), mix, report, sources)

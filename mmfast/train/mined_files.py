"""The files `mmfast-mine` writes: each training file again, in its own format, with the mined hard
negatives in place of the row's own, and a data spec that trains on them as the input trained.

- MMEB-train (.jsonl, .parquet): every column kept; `neg_text` and `neg_image_path` hold the mined
  negatives, a string each with k = 1 (as MMEB-train writes one negative), else a list of strings (as
  the data layer reads several). Image paths are relative to the subset's image folder, like the
  row's own paths; a text-only negative has image path "" (and an image-only one text "").
- NLI triplets (.csv): `hard_neg` holds the mined negative (one per row: k must be 1).

Only the rows the data layer read are written (a skipped row is counted in the data report, as in
training), in their order; `num_sample_per_subset` keeps its first N rows. So a mined file's row n is
the n-th usable row of its source. Files go to <output_dir>/<subset>/<file name>; <output_dir>/
mixture.json names them with each subset's image folder (absolute), weight and instruction split.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .data import Example, Input
from .data_spec import DataSource

SPEC_NAME = "mixture.json"


def image_base(source: DataSource) -> Path:
    """The folder a subset's relative image paths start from (its image_dir, else its files' folder)."""
    if source.image_dir is not None:
        return Path(source.image_dir).resolve()
    parents = {p.resolve().parent for p in source.paths}
    if len(parents) > 1 and source.format == "mmeb":
        raise ValueError(
            f"--data: subset {source.name!r} has files in several folders and no image folder: give --image_dir "
            "(the mined files are written elsewhere, so their image paths need one root)"
        )
    return parents.pop()


def raw_records(path: Path, rows: set[int]) -> Iterator[tuple[int, dict]]:
    """(row, record) of the given 0-based data rows of a file, as it stores them (every column)."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            row = 0
            for raw in f:
                if not raw.strip():
                    continue
                if row in rows:
                    yield row, json.loads(raw.decode("utf-8"))
                row += 1
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(path).to_pylist()):
            if row in rows:
                yield row, record
    else:
        with open(path, encoding="utf-8", newline="") as f:
            for row, record in enumerate(csv.DictReader(f)):
                if row in rows:
                    yield row, record


def negative_columns(negatives: Sequence[Input], base: Path, k: int) -> dict:
    """neg_text / neg_image_path of a row (see the module docstring)."""
    texts = [n.text for n in negatives]
    images = ["" if n.image is None else os.path.relpath(n.image, base) for n in negatives]
    if k == 1:
        return {"neg_text": texts[0] if texts else "", "neg_image_path": images[0] if images else ""}
    return {"neg_text": texts, "neg_image_path": images}


def write_mined_file(
    source: DataSource, path: Path, examples: Sequence[Example], negatives: Sequence[Sequence[Input]],
    output: Path, k: int,
) -> Path:  # fmt: skip
    """Writes one source file's read rows with their mined negatives; returns the file written."""
    target = output / source.name / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    mined = {e.row: n for e, n in zip(examples, negatives, strict=True)}
    base = image_base(source)
    records = []
    for row, record in raw_records(path, set(mined)):
        if source.format == "nli":
            record["hard_neg"] = mined[row][0].text if mined[row] else ""
        else:
            record.update(negative_columns(mined[row], base, k))
        records.append(record)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if path.suffix == ".jsonl":
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), temporary)
    else:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f))
        with open(temporary, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)
    os.replace(temporary, target)
    return target


def write_spec(
    output: Path, sources: Sequence[DataSource], written: dict[str, list[Path]], split: dict[str, str]
) -> Path:
    """<output>/mixture.json: a --data spec of the mined files (see the module docstring)."""
    spec = {}
    for source in sources:
        entry = {"path": [str(p.relative_to(output)) for p in written[source.name]], "format": source.format}
        if source.format == "mmeb":
            entry["image_dir"] = str(image_base(source))
            entry["mmeb_split"] = split[source.name]
        if source.weight is not None:
            entry["weight"] = source.weight
        spec[source.name] = entry
    path = output / SPEC_NAME
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path

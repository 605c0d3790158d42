"""Files on disk for the generator: one random stream per part, image folders, JSON, parquet.

Every writer is deterministic: the same inputs give the same bytes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from mmfast.train.default.render import Scene, render, render_crop, save


def part_rng(seed: int, part: str) -> np.random.Generator:
    """The random stream of one part: parts never share draws, so a held-out render is never a
    training render, and resizing one part leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(part.encode())])


class Images:
    """Writes the images of one folder; returns their paths relative to `base`."""

    def __init__(self, base: Path, folder: str, size: int):
        self.base, self.folder, self.size = base, folder, size

    def scene(self, scene: Scene, name: str) -> str:
        return self.image(render(scene, self.size), name)

    def crop(self, scene: Scene, index: int, name: str) -> str:
        return self.image(render_crop(scene, scene.objects[index], self.size), name)

    def image(self, image, name: str) -> str:
        relative = f"{self.folder}/{name}.jpg"
        save(image, self.base / relative)
        return relative


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_parquet(path: Path, columns: dict[str, list], list_columns: tuple[str, ...] = ()) -> None:
    """String columns, and list<string> ones for `list_columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.list_(pa.string()) if name in list_columns else pa.string()) for name in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)

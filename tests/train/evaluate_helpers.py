"""A fake encoder and tiny on-disk data for the evaluator tests (no model, no download).

An image's identity is its width in pixels: exact through JPEG, unlike a colour. The fake encoder
looks an input up in a table of unit vectors — by (text, width), ("image", width) or text — and
otherwise draws a unit vector seeded by the input, so unrelated inputs are near-orthogonal.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


@dataclass(frozen=True)
class FakeConfig:
    text_prompt: str = "{text}"
    image_prompt: str = "{text}"


class FakeEncoder:
    def __init__(self, vectors: dict | None = None, dim: int = 6):
        self.vectors = {key: torch.tensor(value, dtype=torch.float32) for key, value in (vectors or {}).items()}
        self.dim = dim
        self.config = FakeConfig()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 3)
        self.calls = 0
        self.inputs: list[tuple[str, int | None]] = []

    def encode(self, texts, images=None, *, batch_size=32, show_progress=True):
        self.calls += 1
        images = [None] * len(texts) if images is None else list(images)
        assert len(images) == len(texts)  # the evaluator's contract, not user input
        rows = []
        for text, image in zip(texts, images, strict=True):
            width = None
            if image is not None:
                image = image if isinstance(image, Image.Image) else Image.open(image)
                width = image.size[0]
            self.inputs.append((text, width))
            rows.append(self.vector(text, width))
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)

    def vector(self, text: str, width: int | None) -> torch.Tensor:
        for key in ((text, width), ("image", width)) if width is not None else (text,):
            if key in self.vectors:
                return self.vectors[key]
        generator = torch.Generator().manual_seed(zlib.crc32(f"{text}|{width}".encode()))
        return torch.nn.functional.normalize(torch.randn(self.dim, generator=generator), dim=0)


def make_image(path: Path, width: int, height: int = 6) -> Path:
    """A small image whose width is its identity; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (width * 7 % 256, 90, 160)).save(path)
    return path


def unit(*values: float) -> list[float]:
    """A unit vector from exact components (one-hot vectors and the like)."""
    vector = torch.tensor(values, dtype=torch.float64)
    return (vector / vector.norm()).tolist()


def axis(index: int, dim: int = 6) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(dim)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# The tiny data sets: each builder writes files under `root` and returns the encoder's vector table.
PLAIN = "{text}"  # a text prompt that leaves captions as they are, so the tables below can name them


def write_mmeb(root: Path) -> dict:
    images = root / "images"
    for width in (10, 11, 12, 13, 14, 15):
        make_image(images / f"q{width}.jpg", width)
    query = "<|image_1|>\nRepresent the given image for classification"
    classification = [  # 3 of 4 correct; row 2 ties the ground truth with another label: correct
        {
            "qry_text": query,
            "qry_img_path": "q10.jpg",
            "tgt_text": ["cat", "dog", "fish"],
            "tgt_img_path": ["", "", ""],
        },
        {"qry_text": query, "qry_img_path": "q11.jpg", "tgt_text": ["dog", "cat"], "tgt_img_path": ["", ""]},
        {"qry_text": query, "qry_img_path": "q12.jpg", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]},
        {"qry_text": query, "qry_img_path": "q13.jpg", "tgt_text": ["dog", "cat"], "tgt_img_path": ["", ""]},
    ]
    write_parquet(root / "ImageNet-1K" / "test-00000-of-00001.parquet", classification)
    target = "<|image_1|>\nRepresent the given image."
    custom = [  # 1 of 2 correct
        {
            "qry_text": "find a cat",
            "qry_img_path": "",
            "tgt_text": [target, target],
            "tgt_img_path": ["q14.jpg", "q15.jpg"],
        },
        {
            "qry_text": "find a dog",
            "qry_img_path": "",
            "tgt_text": [target, target],
            "tgt_img_path": ["q14.jpg", "q15.jpg"],
        },
    ]
    write_parquet(root / "MyRetrieval" / "test-00000-of-00001.parquet", custom)
    mystery = [{"qry_text": "?", "qry_img_path": None, "tgt_text": ["a", "b", "c"], "tgt_img_path": ["", "", ""]}]
    write_parquet(root / "Mystery" / "test-00000-of-00001.parquet", mystery)
    (root / "mmeb_subsets.json").write_text('{"MyRetrieval": {"meta_task": "retrieval", "split": "ood"}}')
    return {
        ("image", 10): axis(0), ("image", 11): axis(1), ("image", 12): unit(1, 1, 0, 0, 0, 0), ("image", 13): axis(0),
        "cat": axis(0), "dog": axis(1), "fish": axis(2),
        ("image", 14): axis(3), ("image", 15): axis(4), "find a cat": axis(3), "find a dog": axis(4),
    }  # fmt: skip


def caption_records() -> tuple[list[dict], dict]:
    """Three images (widths 20..22), five captions each; caption 4 of image 2 points at image 0."""
    records, vectors = [], {}
    for index, width in enumerate((20, 21, 22)):
        captions = [f"photo {index} caption {j}" for j in range(5)]
        records.append({"image": f"imgs/{width}.jpg", "caption": captions})
        vectors[("image", width)] = axis(index)
        vectors.update({caption: axis(index) for caption in captions})
    vectors["photo 2 caption 4"] = axis(0)
    return records, vectors


def write_sugarcrepe(root: Path) -> dict:
    import json

    coco = root / "coco"
    for width in (30, 31, 32, 34, 35):
        make_image(coco / f"{width}.jpg", width)
    add_obj = {  # correct, a tie (a miss), wrong, a missing image (a miss)
        "0": {"filename": "30.jpg", "caption": "pos 0", "negative_caption": "neg 0"},
        "1": {"filename": "31.jpg", "caption": "pos 1", "negative_caption": "neg 1"},
        "2": {"filename": "32.jpg", "caption": "pos 2", "negative_caption": "neg 2"},
        "3": {"filename": "33.jpg", "caption": "pos 3", "negative_caption": "neg 3"},
    }
    swap_att = {
        "0": {"filename": "34.jpg", "caption": "pos 4", "negative_caption": "neg 4"},
        "1": {"filename": "35.jpg", "caption": "pos 5", "negative_caption": "neg 5"},
    }
    (root / "sugarcrepe").mkdir(parents=True)
    (root / "sugarcrepe" / "add_obj.json").write_text(json.dumps(add_obj))
    (root / "sugarcrepe" / "swap_att.json").write_text(json.dumps(swap_att))
    return {
        ("image", 30): axis(0), "pos 0": axis(0), "neg 0": axis(1),
        ("image", 31): axis(0), "pos 1": axis(2), "neg 1": axis(2),
        ("image", 32): axis(0), "pos 2": axis(1), "neg 2": axis(0),
        ("image", 34): axis(3), "pos 4": axis(3), "neg 4": axis(4),
        ("image", 35): axis(4), "pos 5": axis(4), "neg 5": axis(5),
    }  # fmt: skip


def write_msrvtt(root: Path) -> dict:
    """video0: 5 frames (widths 40..44), video1: 3 frames (50..52), video2: missing."""
    for width in range(40, 45):
        make_image(root / "videos" / "video0" / f"frame{width - 39}.jpg", width)
    for width in range(50, 53):
        make_image(root / "videos" / "video1" / f"{width - 50:04d}.png", width)
    lines = ["key,vid_key,video_id,sentence", "ret0,msr7010,video0,a man cooks", "ret1,msr7011,video1,a dog runs"]
    lines.append("ret2,msr7012,video2,a car drives")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(lines) + "\n")
    query = "Find me an video that matches the given caption: "
    return {
        ("image", 40): axis(0), ("image", 41): axis(1), ("image", 42): axis(0),
        ("image", 43): axis(5), ("image", 44): axis(1),
        ("image", 50): axis(2), ("image", 51): axis(2), ("image", 52): axis(2),
        query + "a man cooks": axis(0), query + "a dog runs": axis(2), query + "a car drives": axis(5),
    }  # fmt: skip

"""What the evaluators share about their inputs: prompts, image checks. Record files are read by
`mmfast.train.records.read_rows`, as training reads its own.

Missing images, everywhere: each image file is checked once (it exists and PIL can read its header).
A bad one is counted, and whatever needs it is scored as a miss while still counted in its
denominator (`num_pred`, the number of queries). With `strict=True` it is an error naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..placeholder import IMAGE_PLACEHOLDER

IMAGE_PROMPT = IMAGE_PLACEHOLDER + "\nRepresent the given image."
CAPTION_PROMPT = "Find me an everyday image that matches the given caption: {text}"
BARE_CAPTION = "{text}"


def caption_prompt_for(encoder, text_prompt: str | None) -> str:
    """The caption prompt: the one given, else the VLM2Vec-style instruction — unless the encoder
    wraps texts in its own template (E5-V's and UniME's one-word prompt), which the instruction
    would only be nested inside; then the bare caption."""
    if text_prompt is None:
        config = getattr(encoder, "encoder_config", None)
        own = getattr(config, "text_prompt", BARE_CAPTION)
        text_prompt = CAPTION_PROMPT if own == BARE_CAPTION else BARE_CAPTION
    if "{text}" not in text_prompt:
        raise ValueError(f"text_prompt must hold {{text}} where the caption goes, got {text_prompt!r}")
    return text_prompt


MISSING_EXAMPLES = 5


class BytesImage:
    """An image stored inline (HF datasets' Image feature: {"bytes", "path"}), keyed by its bytes."""

    def __init__(self, data: bytes, label: str):
        self.data, self.label = data, label

    def cache_key(self) -> str:
        return "bytes:" + hashlib.sha256(self.data).hexdigest()

    def load(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")

    def __repr__(self) -> str:
        return f"BytesImage({self.label})"


class ImageChecker:
    """Checks each image once. `usable(image, where)` is False for a missing or unreadable file,
    which is then counted (or, with strict, raised as an error naming the file and `where`)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._verdicts: dict[str, str | None] = {}

    def usable(self, image, where: str) -> bool:
        if isinstance(image, BytesImage):
            name = image.label
            if name not in self._verdicts:
                self._verdicts[name] = _image_problem(io.BytesIO(image.data))
        elif isinstance(image, (str, os.PathLike)):
            name = str(image)
            if name not in self._verdicts:
                self._verdicts[name] = "is missing" if not Path(name).is_file() else _image_problem(name)
        else:
            return True  # None, or an image already in memory
        problem = self._verdicts[name]
        if problem is not None and self.strict:
            raise FileNotFoundError(f"{where}: image {name} {problem}")
        return problem is None

    def report(self) -> dict:
        bad = [f"{path} ({problem})" for path, problem in self._verdicts.items() if problem is not None]
        return {"num_missing_images": len(bad), "missing_image_examples": bad[:MISSING_EXAMPLES]}


def _image_problem(source) -> str | None:
    try:
        with Image.open(source) as image:  # reads the header only
            image.size  # noqa: B018
    except (OSError, UnidentifiedImageError, ValueError) as error:
        return f"is unreadable ({error})"
    return None


def resolve_image(root: Path, value, where: str):
    """A path relative to `root` (absolute paths kept), BytesImage for inline bytes, None for none."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):  # HF Image feature
        if value.get("bytes"):
            return BytesImage(bytes(value["bytes"]), f"{where}: {value.get('path') or 'inline bytes'}")
        value = value.get("path")
        if not value:
            return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: an image must be a path or {{bytes, path}}, got {type(value).__name__}")
    return root / value


def load_json(path: Path):
    """A JSON file of settings or entries (not records: those are read by `records.read_rows`)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the file is not valid JSON ({error})") from None


def string_field(record: Mapping, column: str, where: str) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        found = "missing" if column not in record else f"a {type(value).__name__}"
        raise ValueError(f"{where}: column {column!r} must be a string, is {found}")
    return value

"""Image–text retrieval: R@1/5/10 in both directions over the full gallery (UniME's protocol).

Two layouts:
- captions per image (Flickr30K, COCO 5K, ShareGPT4V): a .jsonl, .json (list) or .parquet file, or a
  folder of them, one record per image: `image` (a path relative to `image_root`, by default the
  file's folder, or HF's {"bytes", "path"}) and its captions in `caption`, `captions` or `text` (a
  string or a list; the first `max_captions`, 5 by default, are kept). ShareGPT4V's records
  (`image` + `conversations`) take `conversations[1].value`. Caption j of the flattened list belongs
  to its record's image: with five per image, image j // 5.
- 1:1 folder (Urban1K): `caption/<id>.txt` (its first line) and `image/<id>.jpg`.

Text→image: a caption's image must be found among all images. Image→text: a hit when any of the
image's captions is in the top k. A missing image: see `metrics.cross_modal_metrics`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..records import RECORD_SUFFIXES, read_rows
from .cache import as_cache
from .inputs import IMAGE_PROMPT, ImageChecker, caption_prompt_for, resolve_image
from .metrics import cross_modal_metrics

CAPTION_COLUMNS = ("caption", "captions", "text")
IMAGE_COLUMNS = ("image", "image_path")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class CaptionSet:
    """Images, their captions flattened, and which image each caption belongs to."""

    name: str
    images: list = field(default_factory=list)  # Path or BytesImage
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # where each image came from, for messages
    notes: dict = field(default_factory=dict)


def evaluate_retrieval(
    encoder,
    data: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    strict: bool = False,
    cache=None,
    image_prompt: str = IMAGE_PROMPT,
    text_prompt: str | None = None,
    max_captions: int | None = 5,
    limit: int | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Returns {"retrieval": {name: {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", ..., "t2i_MdR",
    "t2i_MnR", "i2t_MdR", "i2t_MnR" (rates in %), "num_images", "num_captions", "num_missing_images",
    ...}}}. `name` defaults to the file's stem or the folder's name; `limit` keeps the first images
    (ShareGPT4V-1k is the first 1000); `text_prompt` holds "{text}" where the caption goes."""
    text_prompt = caption_prompt_for(encoder, text_prompt)
    dataset = load_retrieval_set(data, image_root, max_captions=max_captions, limit=limit)
    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    metrics = score_caption_set(dataset, embeddings, strict=strict, image_prompt=image_prompt, text_prompt=text_prompt)
    return {"retrieval": {name or dataset.name: metrics}}


def score_caption_set(dataset: CaptionSet, embeddings, *, strict: bool, image_prompt: str, text_prompt: str) -> dict:
    checker = ImageChecker(strict)
    present = torch.tensor(
        [checker.usable(image, where) for image, where in zip(dataset.images, dataset.sources, strict=True)]
    )
    texts = embeddings.embed([text_prompt.replace("{text}", caption) for caption in dataset.captions])
    kept = [image for image, ok in zip(dataset.images, present.tolist(), strict=True) if ok]
    # Missing images keep a zero row that cross_modal_metrics leaves out of the gallery.
    images = torch.zeros(len(dataset.images), texts.shape[1])
    images[present] = embeddings.embed([image_prompt] * len(kept), kept)
    caption_image = torch.tensor(dataset.caption_image, dtype=torch.long)
    metrics = cross_modal_metrics(texts, images, caption_image, item_present=present)
    counts = {"num_images": len(dataset.images), "num_captions": len(dataset.captions)}
    return {**metrics, **counts, **checker.report(), **dataset.notes}


def load_retrieval_set(
    data: str | os.PathLike, image_root: str | os.PathLike | None = None, *, max_captions: int | None = 5, limit=None
) -> CaptionSet:
    """A record file, a folder of record files, or a 1:1 `caption/` + `image/` folder."""
    data = Path(data)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if max_captions is not None and (
        isinstance(max_captions, bool) or not isinstance(max_captions, int) or max_captions < 1
    ):
        raise ValueError(f"max_captions must be a positive integer or None, got {max_captions!r}")
    if data.is_dir() and (data / "caption").is_dir() and (data / "image").is_dir():
        dataset = load_paired_folder(data, limit=limit)
    elif data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in RECORD_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{data}: neither caption/ + image/ folders nor {', '.join(RECORD_SUFFIXES)} files")
        dataset = load_caption_files(files, image_root or data, max_captions=max_captions, limit=limit, name=data.name)
    elif data.is_file():
        dataset = load_caption_files([data], image_root or data.parent, max_captions=max_captions, limit=limit)
    else:
        raise FileNotFoundError(f"retrieval data {data} does not exist")
    if not dataset.images:
        raise ValueError(f"retrieval data {data} holds no images")
    return dataset


def load_caption_files(files: list[Path], image_root, *, max_captions=5, limit=None, name=None) -> CaptionSet:
    dataset = CaptionSet(name or files[0].stem)
    root = Path(image_root)
    for path in files:
        for number, record in read_rows(path):
            if limit is not None and len(dataset.images) >= limit:
                return dataset
            where = f"{path} row {number}"
            column = next((c for c in IMAGE_COLUMNS if c in record), None)
            if column is None:
                raise ValueError(f"{where}: no image column (one of {', '.join(IMAGE_COLUMNS)})")
            image = resolve_image(root, record[column], f"{where} column {column!r}")
            if image is None:
                raise ValueError(f"{where}: column {column!r} is empty")
            captions = _captions(record, where)[:max_captions]
            dataset.images.append(image)
            dataset.sources.append(where)
            dataset.captions.extend(captions)
            dataset.caption_image.extend([len(dataset.images) - 1] * len(captions))
    return dataset


def _captions(record: dict, where: str) -> list[str]:
    column = next((c for c in CAPTION_COLUMNS if c in record), None)
    if column is None and isinstance(record.get("conversations"), list):  # ShareGPT4V
        turns = record["conversations"]
        if len(turns) < 2 or not isinstance(turns[1], dict) or not isinstance(turns[1].get("value"), str):
            raise ValueError(f"{where}: column 'conversations' needs a second turn with a string 'value'")
        return [turns[1]["value"]]
    if column is None:
        raise ValueError(f"{where}: no caption column (one of {', '.join(CAPTION_COLUMNS)}, or conversations)")
    value = record[column]
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: column {column!r} must be a string or a list of strings")
    if not captions or not all(c.strip() for c in captions):
        raise ValueError(f"{where}: column {column!r} holds an empty caption list or an empty caption")
    return captions


def load_paired_folder(folder: Path, *, limit=None) -> CaptionSet:
    """Urban1K: caption/<id>.txt (first line) with image/<id>.jpg (or .jpeg/.png/.webp)."""
    dataset = CaptionSet(folder.name)
    caption_files = sorted((folder / "caption").glob("*.txt"))
    if not caption_files:
        raise FileNotFoundError(f"{folder / 'caption'}: no <id>.txt caption files")
    images = {p.stem: p for p in sorted((folder / "image").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in caption_files[:limit]:
        with open(path, encoding="utf-8") as f:
            caption = f.readline().strip()
        if not caption:
            raise ValueError(f"{path}: the first line (the caption) is empty")
        # An id without an image keeps the expected path, which the image check reports as missing.
        dataset.images.append(images.pop(path.stem, folder / "image" / f"{path.stem}.jpg"))
        dataset.sources.append(str(path))
        dataset.captions.append(caption)
        dataset.caption_image.append(len(dataset.images) - 1)
    if limit is None:
        dataset.notes["num_unpaired_images"] = len(images)  # images with no caption file: not scored
    return dataset

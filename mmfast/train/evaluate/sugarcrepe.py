"""SugarCrepe compositionality: is the image closer to its caption than to a hard negative?

Layout: a folder with the seven JSON files (add_obj, add_att, replace_obj, replace_att, replace_rel,
swap_obj, swap_att), each a dict "0", "1", ... of {filename, caption, negative_caption}, images
(COCO val2017) at `<image_root>/<filename>`. An entry is correct when cos(image, caption) >
cos(image, negative_caption) strictly: a tie is a miss (the model did not tell them apart).
An entry whose image is missing is a miss, counted in `num_pred`.

Beside each accuracy, `length_only_acc` is a blind baseline: the shorter caption called right, a tie
half right (a random pick), over every entry. Real SugarCrepe's add_* negatives are longer by
construction, so a model's accuracy means little until it is read against this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .cache import as_cache
from .inputs import IMAGE_PROMPT, ImageChecker, caption_prompt_for, load_json, string_field
from .metrics import accuracy

SUGARCREPE_FILES = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")
FIELDS = ("filename", "caption", "negative_caption")


def evaluate_sugarcrepe(
    encoder,
    data: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    files: tuple[str, ...] | None = None,
    strict: bool = False,
    cache=None,
    image_prompt: str = IMAGE_PROMPT,
    text_prompt: str | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Returns {"sugarcrepe": {name: {<file>: {"acc" (%), "num_correct", "num_pred",
    "num_missing_images"}, ..., "overall": pooled over every entry, "mean": unweighted mean of the
    files' acc, "files_not_found": [...]}}}.

    files: the file stems to score (default the seven). Without `files`, those of the seven that are
    absent are listed in "files_not_found" (an error with strict, or when none is there); a file named
    in `files` must exist. image_root defaults to `data`.
    """
    text_prompt = caption_prompt_for(encoder, text_prompt)
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"SugarCrepe folder {folder} is not a directory")
    root = folder if image_root is None else Path(image_root)
    wanted = SUGARCREPE_FILES if files is None else tuple(files)
    if not wanted or not all(isinstance(stem, str) and stem for stem in wanted):
        raise ValueError(f"files must name at least one JSON file stem, got {files!r}")
    absent = [stem for stem in wanted if not (folder / f"{stem}.json").is_file()]
    if absent and (files is not None or strict or len(absent) == len(wanted)):
        raise FileNotFoundError(f"SugarCrepe: {', '.join(f'{s}.json' for s in absent)} not found in {folder}")
    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    results: dict = {}
    correct = total = blind = 0.0
    for stem in wanted:
        if stem in absent:
            continue
        checker = ImageChecker(strict)
        entries = read_file(folder / f"{stem}.json")
        scores = score_file(folder / f"{stem}.json", root, embeddings, checker, image_prompt, text_prompt)
        shorter_wins = length_only_wins(entry for _, entry in entries)
        results[stem] = {**scores, "length_only_acc": 100.0 * shorter_wins / max(len(entries), 1), **checker.report()}
        correct, total, blind = correct + scores["num_correct"], total + scores["num_pred"], blind + shorter_wins
    results["overall"] = {**accuracy(int(correct), int(total)), "length_only_acc": 100.0 * blind / max(total, 1)}
    scored = [results[stem]["acc"] for stem in wanted if stem not in absent]
    results["mean"] = {"acc": sum(scored) / len(scored), "num_files": len(scored)}
    results["files_not_found"] = absent
    return {"sugarcrepe": {name or folder.name: results}}


def length_only_wins(entries) -> float:
    """How many entries a blind scorer gets right by calling the shorter caption right (a tie: half)."""
    wins = 0.0
    for entry in entries:
        positive, negative = len(entry["caption"]), len(entry["negative_caption"])
        wins += 1.0 if positive < negative else 0.5 if positive == negative else 0.0
    return wins


def read_file(path: Path) -> list[tuple[str, dict]]:
    """(entry key, entry) pairs, each entry checked for its three string fields."""
    entries = load_json(path)
    if not isinstance(entries, Mapping):
        raise ValueError(f'{path}: expected an object of entries {{"0": {{{", ".join(FIELDS)}}}, ...}}')
    checked = []
    for key, entry in entries.items():
        where = f"{path} entry {key!r}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: must be an object with {', '.join(FIELDS)}")
        for column in FIELDS:
            string_field(entry, column, where)
        checked.append((key, entry))
    return checked


def score_file(path: Path, root: Path, embeddings, checker: ImageChecker, image_prompt: str, text_prompt: str) -> dict:
    entries = read_file(path)
    images = [root / entry["filename"] for _, entry in entries]
    present = torch.tensor(
        [checker.usable(image, f"{path} entry {key!r}") for image, (key, _) in zip(images, entries, strict=True)]
    )
    kept = [entry for (_, entry), ok in zip(entries, present.tolist(), strict=True) if ok]
    if not kept:
        return accuracy(0, len(entries))
    image_vectors = embeddings.embed([image_prompt] * len(kept), [root / entry["filename"] for entry in kept])
    positive = embeddings.embed([text_prompt.replace("{text}", entry["caption"]) for entry in kept])
    negative = embeddings.embed([text_prompt.replace("{text}", entry["negative_caption"]) for entry in kept])
    wins = (image_vectors * positive).sum(dim=1) > (image_vectors * negative).sum(dim=1)
    return accuracy(int(wins.sum()), len(entries))

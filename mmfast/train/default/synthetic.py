"""The embedded default's data: a procedural mini-MMEB written to disk in the real public layouts, so
the trainer and the evaluator read it through the same loaders as real data.

`generate(root)` writes, deterministically (same seed and sizes -> byte-identical files), in seconds:

    root/manifest.json                         generator version, seed, image size, sizes
    root/train/<Subset>.jsonl                  MMEB-train rows (qry, qry_image_path, pos_text,
                                               pos_image_path, neg_text, neg_image_path); images under
    root/images/<Subset>/<i>.jpg               root (the --image_dir); ImageNet_1K, OK-VQA, MSCOCO_t2i,
                                               MSCOCO_i2t, MSCOCO (grounding)
    root/train/mixture.json                    a --data spec of those five subsets
    root/nli/nli_for_simcse.csv                E5-V triplets (sent0, sent1, hard_neg), same world
    root/nli/unime_stage1.json                 a --data spec: the CSV + teacher.safetensors
    root/eval/nli/nli_heldout.csv              held-out NLI triplets (the CSV's layout), no sentence of
                                               which is in the training CSV
    root/eval/mmeb/<Subset>/test-00000-of-00001.parquet   MMEB-eval rows (qry_text, qry_img_path,
    root/eval/mmeb_images/<Subset>/...                    tgt_text[], tgt_img_path[]; truth at 0)
    root/eval/mmeb/mmeb_subsets.json           meta-task and in/out-of-distribution of each subset
    root/retrieval/flickr30k/test-00000-of-00001.parquet  image (path), text (5 captions)
    root/retrieval/flickr30k/images/<i>.jpg
    root/retrieval/urban1k/{caption/<id>.txt, image/<id>.jpg}   1:1 long captions
    root/sugarcrepe/<add_obj|...>.json, root/sugarcrepe/images/  {"0": {filename, caption,
                                               negative_caption}, ...}
    root/video/MSRVTT_JSFUSION_test.csv        key, vid_key, video_id, sentence
    root/video/videos/<video_id>/000.jpg ...   frames of a shape moving (and changing)
    root/video/MSR-VTT/test_1k/test-00000-of-00001.parquet   the same, MMEB-V2's layout: video_id, video, caption
    root/visdoc/documents/{queries,corpus,qrels}/test-00000-of-00001.parquet   BEIR layout (ViDoRe):
                                               pages as inline PNG bytes, graded qrels

The teacher file `root/nli/teacher.safetensors` (UniME stage 1) is written by
`mmfast.train.default.teacher.default_teacher`, which needs a pretrained text model.

Image size: 64 px by default. A quadrant is then 32 px, so each shape (~22-28 px across) covers about
2x2 patches of a patch-14 ViT after the processors' resize to 56 px (Qwen2-VL rounds to multiples of
28), stars, crosses and rings stay distinct, and an image costs ~0.5 ms to draw and encode.

Held-out sets are fresh renders: every part draws from its own random stream, (seed, part name).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfast.train.default import captions as world
from mmfast.train.default import heldout
from mmfast.train.default.captions import ASK, CLASSIFY, CROP, FIND_CAPTION, FIND_IMAGE, GROUND, IMAGE
from mmfast.train.default.render import SHAPES
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.writing import Images, part_rng, write_json, write_jsonl

# v9: v7 (the default's videos also in MMEB-V2's layout) plus eval/nli, E5-V's held-out text set (v8 was this
# branch's eval/nli before it met v7, and may sit in a shared cache).
GENERATOR_VERSION = 9
TRAIN_SUBSETS = ("ImageNet_1K", "OK-VQA", "MSCOCO_t2i", "MSCOCO_i2t", "MSCOCO")
# Sampling weights of the mixture spec: the default trains on text-to-image pairs only (98% held-out R@1
# at 400 steps). With the classification, VQA or grounding subsets in the mix (mixed or one-task batches,
# t2i down to 60%) the image embeddings stayed together and R@1 near chance for 400 steps; t2i + i2t
# learnt only in one-task batches with α 0.5 (README, "Why the default learns"). The others are written
# all the same (weight 0): give them a weight in train/mixture.json to train on them.
TRAIN_WEIGHTS = {"ImageNet_1K": 0.0, "OK-VQA": 0.0, "MSCOCO_t2i": 1.0, "MSCOCO_i2t": 0.0, "MSCOCO": 0.0}


@dataclass(frozen=True)
class DefaultData:
    """Where everything `generate` wrote lives (see the module docstring)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    image_dir = property(lambda self: self.root)
    train_spec = property(lambda self: self.root / "train" / "mixture.json")
    train_files = property(lambda self: tuple(self.root / "train" / f"{s}.jsonl" for s in TRAIN_SUBSETS))
    nli = property(lambda self: self.root / "nli" / "nli_for_simcse.csv")
    nli_heldout = property(lambda self: self.root / "eval" / "nli" / "nli_heldout.csv")
    teacher = property(lambda self: self.root / "nli" / "teacher.safetensors")
    teacher_spec = property(lambda self: self.root / "nli" / "unime_stage1.json")
    mmeb_eval = property(lambda self: self.root / "eval" / "mmeb")
    mmeb_eval_images = property(lambda self: self.root / "eval" / "mmeb_images")
    mmeb_eval_subsets = property(lambda self: self.root / "eval" / "mmeb" / "mmeb_subsets.json")
    flickr = property(lambda self: self.root / "retrieval" / "flickr30k" / "test-00000-of-00001.parquet")
    urban1k = property(lambda self: self.root / "retrieval" / "urban1k")
    sugarcrepe = property(lambda self: self.root / "sugarcrepe")
    video_csv = property(lambda self: self.root / "video" / "MSRVTT_JSFUSION_test.csv")
    video_frames = property(lambda self: self.root / "video" / "videos")
    video_v2 = property(lambda self: self.root / "video" / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet")
    visdoc = property(lambda self: self.root / "visdoc" / "documents")
    manifest = property(lambda self: self.root / "manifest.json")


def _mmeb_row(qry: str, qry_image: str, pos: str, pos_image: str, neg: str = "", neg_image: str = "") -> dict:
    return {
        "qry": qry,
        "qry_image_path": qry_image,
        "pos_text": pos,
        "pos_image_path": pos_image,
        "neg_text": neg,
        "neg_image_path": neg_image,
    }


def _train_rows(subset: str, n: int, rng: np.random.Generator, images: Images) -> list[dict]:
    rows = []
    for i in range(n):
        with_negative = rng.random() < 0.5
        if subset == "ImageNet_1K":
            single = world.random_single(rng)
            path = images.scene(world.single_scene(single, rng, anywhere=True), str(i))
            other = world.label_miss(single, rng)
            rows.append(_mmeb_row(CLASSIFY, path, single.label, "", other if with_negative else ""))
        elif subset == "OK-VQA":
            scene, question, answer, kind = world.question(rng)
            wrong = [a for a in world.ANSWERS[kind] if a != answer]
            negative = wrong[int(rng.integers(len(wrong)))] if rng.random() < 0.3 else ""
            rows.append(_mmeb_row(ASK.format(question), images.scene(scene, str(i)), answer, "", negative))
        elif subset == "MSCOCO_t2i":
            single = world.random_single(rng)
            path = images.scene(world.single_scene(single, rng), str(i))
            row = _mmeb_row(FIND_IMAGE.format(world.single_caption(single, rng)), "", IMAGE, path)
            if with_negative:
                miss = world.single_scene(world.near_miss(single, rng), rng)
                row.update(neg_text=IMAGE, neg_image_path=images.scene(miss, f"{i}_neg"))
            rows.append(row)
        elif subset == "MSCOCO_i2t":
            single = world.random_single(rng)
            path = images.scene(world.single_scene(single, rng), str(i))
            negative = world.single_caption(world.near_miss(single, rng), rng) if with_negative else ""
            rows.append(_mmeb_row(FIND_CAPTION, path, world.single_caption(single, rng), "", negative))
        elif subset == "MSCOCO":
            count = int(rng.integers(2, 4))
            shapes = rng.choice(len(SHAPES), count, replace=False)
            colours = rng.choice(len(world.COLOUR_NAMES), count, replace=False)
            scene = world.scattered_scene(
                [(SHAPES[s], world.COLOUR_NAMES[c]) for s, c in zip(shapes, colours, strict=True)], rng
            )
            target = int(rng.integers(count))
            qry_image = images.scene(scene, str(i))
            row = _mmeb_row(
                GROUND.format(scene.objects[target].label), qry_image, CROP, images.crop(scene, target, f"{i}_crop")
            )
            if with_negative:
                other = (target + 1 + int(rng.integers(count - 1))) % count
                row.update(neg_text=CROP, neg_image_path=images.crop(scene, other, f"{i}_neg"))
            rows.append(row)
    return rows


def _nli_rows(n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    rows = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            single = world.random_single(rng)
            first, second = rng.choice(len(world.SINGLE_TEMPLATES), 2, replace=False)
            rows.append(
                (
                    world.single_caption(single, rng, int(first)),
                    world.single_caption(single, rng, int(second)),
                    world.single_caption(world.near_miss(single, rng), rng),
                )
            )
        elif kind < 0.8:
            a, b = world.two_labels(rng)
            relation = world.random_relation(rng)
            swapped = ((a[0], b[1]), relation, (b[0], a[1]))
            contradictions = [swapped, (a, world.RELATIONS[relation], b), (b, relation, a)]
            wrong = contradictions[int(rng.integers(3))]
            rows.append(
                (
                    world.relation_caption(a, relation, b),
                    world.relation_caption(b, world.RELATIONS[relation], a),
                    world.relation_caption(*wrong),
                )
            )
        else:
            shape, colour = SHAPES[int(rng.integers(8))], world.COLOUR_NAMES[int(rng.integers(8))]
            count = int(rng.integers(1, 5))
            other = world.NUMBERS.index(world.another(world.NUMBERS[count - 1], world.NUMBERS, rng)) + 1
            paraphrase = (
                f"there is exactly one {shape} and it is {colour}"
                if count == 1
                else f"there are {world.NUMBERS[count - 1]} {world.plural(shape)}, all of them {colour}"
            )
            rows.append(
                (world.count_phrase(count, colour, shape), paraphrase, world.count_phrase(other, colour, shape))
            )
    return rows


def _write_nli(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("sent0", "sent1", "hard_neg"))
        writer.writerows(rows)


def _nli_heldout_rows(n: int, seen: set[str], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """n triplets, each premise distinct, no sentence of which is in `seen` (the training CSV's)."""
    rows, premises = [], set()
    for _ in range(100):
        for row in _nli_rows(4 * n, rng):
            if row[0] not in premises and not seen.intersection(row):
                rows.append(row)
                premises.add(row[0])
                if len(rows) == n:
                    return rows
    raise ValueError(f"Sizes.nli_heldout_rows = {n}: the world has too few sentences outside the training CSV")


def _write_train(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    counts = dict(
        zip(
            TRAIN_SUBSETS,
            (sizes.train_classification, sizes.train_vqa, sizes.train_t2i, sizes.train_i2t, sizes.train_grounding),
            strict=True,
        )
    )
    for subset, n in counts.items():
        images = Images(root, f"images/{subset}", image_size)
        write_jsonl(
            root / "train" / f"{subset}.jsonl", _train_rows(subset, n, part_rng(seed, f"train/{subset}"), images)
        )
    spec = {s: {"path": f"{s}.jsonl", "image_dir": "..", "weight": TRAIN_WEIGHTS[s]} for s in TRAIN_SUBSETS}
    write_json(root / "train" / "mixture.json", spec)
    train = _nli_rows(sizes.nli_rows, part_rng(seed, "nli"))
    _write_nli(root / "nli" / "nli_for_simcse.csv", train)
    seen = {sentence for row in train for sentence in row}
    _write_nli(root / "eval" / "nli" / "nli_heldout.csv", _nli_heldout_rows(sizes.nli_heldout_rows, seen,
                                                                             part_rng(seed, "eval/nli")))  # fmt: skip
    spec = {"nli_for_simcse": {"path": "nli_for_simcse.csv", "teacher": "teacher.safetensors"}}
    write_json(root / "nli" / "unime_stage1.json", spec)


def generate(
    root: str | os.PathLike, *, seed: int = 0, image_size: int = 64, sizes: Sizes | None = None
) -> DefaultData:
    """Writes the default data under `root` (a new or empty folder); see the module docstring."""
    sizes = Sizes() if sizes is None else sizes
    if not isinstance(sizes, Sizes):
        raise TypeError(f"sizes must be a Sizes, got {type(sizes).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 24 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in 24..1024 (shapes must stay legible), got {image_size!r}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"generate: {root} exists and is not an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    _write_train(root, seed, image_size, sizes)
    heldout.write_all(root, seed, image_size, sizes)
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": image_size}
    write_json(root / "manifest.json", manifest | {"sizes": dataclasses.asdict(sizes)})
    return DefaultData(root)


def cache_home() -> Path:
    """$MMFAST_HOME, else ~/.cache/mmfast."""
    home = os.environ.get("MMFAST_HOME")
    return Path(home) if home else Path.home() / ".cache" / "mmfast"


def default_data(root: str | os.PathLike | None = None, *, sizes: Sizes | None = None) -> DefaultData:
    """The default data (seed 0), generated once into `root` (default
    `cache_home()/default-data-v<GENERATOR_VERSION>`) and reused while its manifest matches. Safe when
    several processes (DDP ranks) ask at once: each writes a private folder and the first rename wins."""
    sizes = Sizes() if sizes is None else sizes
    target = Path(root) if root is not None else cache_home() / f"default-data-v{GENERATOR_VERSION}"
    expected = {"generator_version": GENERATOR_VERSION, "seed": 0, "image_size": 64, "sizes": dataclasses.asdict(sizes)}

    def complete() -> bool:
        try:
            return json.loads((target / "manifest.json").read_text()) == expected
        except (OSError, ValueError):
            return False

    if complete():
        return DefaultData(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} holds something other than the default data v{GENERATOR_VERSION} (no matching manifest.json); "
            "remove it or pass another root"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    generate(scratch, sizes=sizes)
    try:
        if target.exists():
            target.rmdir()  # the empty folder a caller made; a non-empty one means another process won
        os.rename(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not complete():
            raise
    return DefaultData(target)

"""The default's held-out sets, fresh renders in the public layouts: MMEB-eval parquet with candidate
lists (truth at index 0), a Flickr30K-style and an Urban1K-style retrieval split, SugarCrepe-style
JSON, MSR-VTT-style frame folders (with the JSFUSION CSV and MMEB-V2's parquet) and a ViDoRe-style
visual-document set (`heldout_visdoc`). Layouts:
`mmfast.train.default.synthetic`."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmfast.train.default import captions as world
from mmfast.train.default.captions import (
    ASK,
    CLASSIFY,
    CROP,
    EDIT,
    FIND_CAPTION,
    FIND_IMAGE,
    GROUND,
    IMAGE,
    REFER,
    Single,
)
from mmfast.train.default.heldout_visdoc import write_visdoc
from mmfast.train.default.render import SHAPES, Obj, Scene, background, jitter_colour, render, save
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.writing import Images, part_rng, write_json, write_parquet

# name: (meta-task, the train subset it is in-distribution with, or None). The names are MMEB's, whose
# 20 train subsets are its in-distribution ones, so MMEB's own split agrees.
EVAL_SUBSETS = {
    "ImageNet-1K": ("classification", "ImageNet_1K"),
    "ImageNet-R": ("classification", None),  # the same labels drawn as outlines
    "OK-VQA": ("vqa", "OK-VQA"),
    "GQA": ("vqa", None),  # relational questions
    "MSCOCO_t2i": ("retrieval", "MSCOCO_t2i"),
    "MSCOCO_i2t": ("retrieval", "MSCOCO_i2t"),
    "FashionIQ": ("retrieval", None),  # image + change -> image
    "MSCOCO": ("grounding", "MSCOCO"),
    "RefCOCO": ("grounding", None),  # referring by place
}
SUGARCREPE = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")
ALL_LABELS = tuple(f"{c} {s}" for s in SHAPES for c in world.COLOUR_NAMES)


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def _label_candidates(single: Single, n: int, rng: np.random.Generator) -> list[str]:
    near = list(dict.fromkeys(m.label for m in world.near_misses(single) if m.label != single.label))
    rest = [label for label in ALL_LABELS if label not in near and label != single.label]
    return [single.label] + (_shuffled(near, rng) + _shuffled(rest, rng))[: n - 1]


def _answer_candidates(answer: str, kind: str, n: int, rng: np.random.Generator) -> list[str]:
    same = [a for a in world.ANSWERS[kind] if a != answer]
    other = [a for k, answers in world.ANSWERS.items() if k != kind for a in answers]
    return [answer] + (_shuffled(same, rng) + _shuffled(other, rng))[: n - 1]


class _Gallery:
    """One render per distinct picture, written on first use (retrieval candidates share them)."""

    def __init__(self, images: Images, rng: np.random.Generator):
        self.images, self.rng, self.paths = images, rng, {}

    def __call__(self, single: Single) -> str:
        if single not in self.paths:
            index = world.ALL_SINGLES.index(single)
            self.paths[single] = self.images.scene(world.single_scene(single, self.rng), f"gallery_{index:03d}")
        return self.paths[single]


def _grounding_rows(subset: str, n: int, c: int, rng: np.random.Generator, images: Images) -> list[tuple]:
    items = []  # (query text, scene image, target crop, crops of the scene's other objects, target label)
    for i in range(n):
        if subset == "MSCOCO":
            count = int(rng.integers(2, 4))
            shapes = rng.choice(len(SHAPES), count, replace=False)
            colours = rng.choice(len(world.COLOUR_NAMES), count, replace=False)
            labels = [(SHAPES[s], world.COLOUR_NAMES[k]) for s, k in zip(shapes, colours, strict=True)]
            scene, target = world.scattered_scene(labels, rng), int(rng.integers(count))
            text = GROUND.format(scene.objects[target].label)
        else:
            first, second = world.two_labels(rng)
            relation = ("to the left of", "above")[int(rng.integers(2))]
            scene, target = world.relation_scene(first, relation, second, rng), int(rng.integers(2))
            words = ("on the left", "on the right") if relation == "to the left of" else ("at the top", "at the bottom")
            text = REFER.format(f"the shape {words[target]}")
        crops = [images.crop(scene, k, f"{i}_crop{k}") for k in range(len(scene.objects))]
        others = crops[:target] + crops[target + 1 :]
        items.append((text, images.scene(scene, str(i)), crops[target], others, scene.objects[target].label))
    pool = [(item[2], item[4]) for item in items]  # every target crop, with its label
    rows = []
    for text, query_image, truth, others, label in items:
        fillers = [crop for crop, other in _shuffled(pool, rng) if other != label and crop != truth]
        targets = ([truth] + others + fillers)[:c]
        rows.append((text, query_image, [CROP] * len(targets), targets))
    return rows


def _mmeb_rows(subset: str, sizes: Sizes, rng: np.random.Generator, images: Images) -> list[tuple]:
    """Rows (qry_text, qry_img_path, tgt_text, tgt_img_path) of one MMEB-eval subset."""
    n, c = sizes.eval_rows, sizes.eval_candidates
    rows = []
    if subset in ("MSCOCO", "RefCOCO"):
        return _grounding_rows(subset, n, c, rng, images)
    gallery = _Gallery(images, rng)
    pictures = world.distinct_singles(n, rng) if subset == "MSCOCO_t2i" else None
    for i in range(n):
        if subset in ("ImageNet-1K", "ImageNet-R"):
            single = world.random_single(rng)
            scene = world.single_scene(single, rng, anywhere=True, outline=subset == "ImageNet-R")
            labels = _label_candidates(single, c, rng)
            rows.append((CLASSIFY, images.scene(scene, str(i)), labels, [""] * len(labels)))
        elif subset in ("OK-VQA", "GQA"):
            scene, question, answer, kind = (world.question if subset == "OK-VQA" else world.relational_question)(rng)
            answers = _answer_candidates(answer, kind, c, rng)
            rows.append((ASK.format(question), images.scene(scene, str(i)), answers, [""] * len(answers)))
        elif subset == "MSCOCO_t2i":
            single = pictures[i]
            targets = [gallery(m) for m in [single] + world.ranked_misses(single, rng)[: c - 1]]
            rows.append((FIND_IMAGE.format(world.single_caption(single, rng)), "", [IMAGE] * len(targets), targets))
        elif subset == "MSCOCO_i2t":
            single = world.random_single(rng)
            misses = world.ranked_misses(single, rng)[: c - 1]
            texts = [world.single_caption(s, rng) for s in [single] + misses]
            query = images.scene(world.single_scene(single, rng), f"query_{i}")
            rows.append((FIND_CAPTION, query, texts, [""] * len(texts)))
        elif subset == "FashionIQ":
            reference = world.random_single(rng)
            colour = world.another(reference.colour, world.COLOUR_NAMES, rng)
            target = replace(reference, colour=colour)
            misses = [m for m in world.ranked_misses(target, rng) if m != reference]
            targets = [gallery(s) for s in ([target, reference] + misses)[:c]]
            change = (f"make it {colour}", f"change the colour to {colour}")[int(rng.integers(2))]
            rows.append((EDIT.format(change), gallery(reference), [IMAGE] * len(targets), targets))
    return rows


def _write_mmeb_eval(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    for subset in EVAL_SUBSETS:
        images = Images(root / "eval" / "mmeb_images", subset, image_size)
        rows = _mmeb_rows(subset, sizes, part_rng(seed, f"eval/{subset}"), images)
        columns = dict(
            zip(
                ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"),
                map(list, zip(*rows, strict=True)),
                strict=True,
            )
        )
        path = root / "eval" / "mmeb" / subset / "test-00000-of-00001.parquet"
        write_parquet(path, columns, list_columns=("tgt_text", "tgt_img_path"))
    manifest = {
        # "split" is what mmfast.train.evaluate reads; the other two say why.
        name: {
            "meta_task": task,
            "split": "ind" if train is not None else "ood",
            "in_distribution": train is not None,
            "train_subset": train,
        }  # fmt: skip
        for name, (task, train) in EVAL_SUBSETS.items()
    }
    write_json(root / "eval" / "mmeb" / "mmeb_subsets.json", manifest)


def _write_retrieval(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    folder = root / "retrieval" / "flickr30k"
    rng = part_rng(seed, "retrieval/flickr30k")
    images, texts = [], []
    for i, single in enumerate(world.distinct_singles(sizes.flickr_images, rng)):
        images.append(Images(folder, "images", image_size).scene(world.single_scene(single, rng), f"{i:04d}"))
        templates = rng.choice(len(world.SINGLE_TEMPLATES), 5, replace=False)
        texts.append([world.single_caption(single, rng, int(t)) for t in templates])
    write_parquet(folder / "test-00000-of-00001.parquet", {"image": images, "text": texts}, list_columns=("text",))
    folder = root / "retrieval" / "urban1k"
    rng = part_rng(seed, "retrieval/urban1k")
    (folder / "caption").mkdir(parents=True, exist_ok=True)
    for i, single in enumerate(world.distinct_singles(sizes.urban_pairs, rng), 1):
        Images(folder, "image", image_size).scene(world.single_scene(single, rng), str(i))
        caption = (
            f"The picture shows a single {single.colour} {single.shape} on a plain light background. The "
            f"{single.shape} sits in the {world.position_words(single.quadrant, rng)} corner, and the rest of the "
            "picture is empty."
        )
        (folder / "caption" / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")


# add_*: the negative adds a false detail, and the positive carries a true one of its own (the shape is
# alone in the picture), so that neither caption is the longer by construction: with the positive bare,
# "the shorter caption is right" scored 100% on both files.
ALONE_AFTER = ("alone", "on its own", "with nothing around it", "on an empty background",
               "with no other shape near it", "with empty space all around it")  # fmt: skip
ALONE_BEFORE = ("lone", "single", "solitary")


def _length_balanced(
    rng: np.random.Generator, positives: list[str], negatives: list[str], longer: bool
) -> tuple[str, str]:
    """A (positive, negative) pair, the positive the longer (or the shorter) in characters, and in
    words or as many words."""
    sign = 1 if longer else -1

    def fits(p: str, n: str) -> bool:
        words = len(p.split()) - len(n.split())
        return (len(p) - len(n)) * sign > 0 and words * sign >= 0

    pairs = [(p, n) for p in positives for n in negatives if fits(p, n)]
    pairs = pairs or [(p, n) for p in positives for n in negatives]
    return pairs[int(rng.integers(len(pairs)))]


def _sugarcrepe_item(kind: str, rng: np.random.Generator, longer: bool = True) -> tuple[Scene, str, str]:
    """longer: whether an add_* positive is the longer caption (the writer alternates it)."""
    if kind.startswith(("add", "replace_obj", "replace_att")):
        single = world.random_single(rng)
        c, s, p = single.colour, single.shape, world.position_words(single.quadrant, rng)
        other_colour = world.another(c, world.COLOUR_NAMES, rng)
        other_shape = world.another(s, SHAPES, rng)
        scene = world.single_scene(single, rng)
        places = world.position_variants(single.quadrant)
        if kind == "add_obj":
            positives = [f"a {c} {s} {d} in the {q} corner" for d in ALONE_AFTER for q in places]
            negatives = [f"a {c} {s} next to a {other_colour} {other_shape} in the {q} corner" for q in places]
        elif kind == "add_att":
            positives = [f"a {w} {s} in the {q} corner" for w in ALONE_BEFORE for q in places]
            positives += [f"a {s} alone in the {q} corner" for q in places]
            negatives = [f"a {other_colour} {s} in the {q} corner" for q in places]
        if kind.startswith("add"):
            caption, negative = _length_balanced(rng, [world.articles(t) for t in positives],
                                                 [world.articles(t) for t in negatives], longer)  # fmt: skip
            return scene, caption, negative
        caption, negative = {
            "replace_obj": (f"a {c} {s} in the {p} corner", f"a {c} {other_shape} in the {p} corner"),
            "replace_att": (f"a {c} {s} in the {p} corner", f"a {other_colour} {s} in the {p} corner"),
        }[kind]
        return scene, world.articles(caption), world.articles(negative)
    a, b = world.two_labels(rng)
    relation = world.random_relation(rng)
    wrong = {
        "replace_rel": (a, world.RELATIONS[relation], b),
        "swap_obj": ((b[0], a[1]), relation, (a[0], b[1])),  # the shapes trade places
        "swap_att": ((a[0], b[1]), relation, (b[0], a[1])),  # the colours trade places
    }[kind]
    return (
        world.relation_scene(a, relation, b, rng),
        world.relation_caption(a, relation, b),
        world.relation_caption(*wrong),
    )


def _write_sugarcrepe(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    folder, number = root / "sugarcrepe", 0
    for kind in SUGARCREPE:
        rng, items = part_rng(seed, f"sugarcrepe/{kind}"), {}
        for i in range(sizes.sugarcrepe_rows):
            scene, caption, negative = _sugarcrepe_item(kind, rng, longer=i % 2 == 0)
            filename = f"{number:012d}.jpg"
            save(render(scene, image_size), folder / "images" / filename)
            items[str(i)] = {"filename": filename, "caption": caption, "negative_caption": negative}
            number += 1
        write_json(folder / f"{kind}.json", items)


MOTIONS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
CHANGES = ("", "turns", "grows", "shrinks")


def _write_video(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    folder, rng = root / "video", part_rng(seed, "video/msrvtt")
    combos = [(s, c, m, ch) for s in SHAPES for c in world.COLOUR_NAMES for m in MOTIONS for ch in CHANGES]
    if sizes.videos > len(combos):
        raise ValueError(f"Sizes.videos = {sizes.videos}: the world has {len(combos)} distinct videos")
    rows = []
    for i, k in enumerate(rng.choice(len(combos), sizes.videos, replace=False)):
        shape, colour, (start, end), change = combos[int(k)]
        later = world.another(colour, world.COLOUR_NAMES, rng)
        sentence = world.articles(f"a {colour} {shape} moves from the {start} to the {end}")
        sentence += {"": "", "turns": f" and turns {later}", "grows": " and grows", "shrinks": " and shrinks"}[change]
        across, angle, tint = float(rng.uniform(0.35, 0.65)), float(rng.uniform(-12, 12)), background(rng)
        rgb = {colour: jitter_colour(colour, rng), later: jitter_colour(later, rng)}
        where = {"left": 0.2, "right": 0.8, "top": 0.2, "bottom": 0.8}
        for f, t in enumerate(np.linspace(0.0, 1.0, sizes.video_frames)):
            along = where[start] + float(t) * (where[end] - where[start])
            x, y = (along, across) if start in ("left", "right") else (across, along)
            r = {"grows": 0.1 + 0.14 * t, "shrinks": 0.24 - 0.14 * t}.get(change, 0.16)
            now = later if change == "turns" and t >= 0.5 else colour
            scene = Scene((Obj(shape, now, x, y, float(r), angle, rgb[now]),), tint)
            save(render(scene, image_size), folder / "videos" / f"video{i}" / f"{f:03d}.jpg")
        rows.append((f"ret{i}", f"msr{i}", f"video{i}", sentence))
    with open(folder / "MSRVTT_JSFUSION_test.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("key", "vid_key", "video_id", "sentence"))
        writer.writerows(rows)
    # The same videos in MMEB-V2's layout (HF VLM2Vec/MSR-VTT), read with the frame folders as V2's frame_root.
    video_ids = [row[2] for row in rows]
    v2_rows = {"video_id": video_ids, "video": [f"{v}.mp4" for v in video_ids], "caption": [row[3] for row in rows]}
    (folder / "MSR-VTT" / "test_1k").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(v2_rows), folder / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet")


def write_all(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    _write_mmeb_eval(root, seed, image_size, sizes)
    _write_retrieval(root, seed, image_size, sizes)
    _write_sugarcrepe(root, seed, image_size, sizes)
    _write_video(root, seed, image_size, sizes)
    write_visdoc(root, seed, image_size, sizes)

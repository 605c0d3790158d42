"""The default's generator: deterministic bytes, every file read back by the real loaders (and pyarrow),
captions that identify their picture, held-out renders apart from the training ones, the cache."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfast.train.data import load_image, load_nli_triplets
from mmfast.train.data_report import DataReport
from mmfast.train.data_spec import load_data
from mmfast.train.default import captions as world
from mmfast.train.default.heldout import EVAL_SUBSETS, SUGARCREPE
from mmfast.train.default.synthetic import TRAIN_SUBSETS, DefaultData, Sizes, default_data, generate

SIZES = Sizes.tiny()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DefaultData:
    return generate(tmp_path_factory.mktemp("default") / "data", sizes=SIZES)


def digests(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_same_seed_same_bytes(data, tmp_path):
    again = generate(tmp_path / "again", sizes=SIZES)
    assert digests(data.root) == digests(again.root)
    other = digests(generate(tmp_path / "other", seed=1, sizes=SIZES).root)
    assert other["train/MSCOCO_t2i.jsonl"] != digests(data.root)["train/MSCOCO_t2i.jsonl"]


def test_train_files_load_through_the_spec(data):
    report = DataReport()
    train = load_data(data.train_spec, report=report)
    counts = (SIZES.train_classification, SIZES.train_vqa, SIZES.train_t2i, SIZES.train_i2t, SIZES.train_grounding)
    assert train.mixture.names == TRAIN_SUBSETS and train.mixture.sizes == counts
    assert report.total == 0 and report.rows_read == sum(counts)
    assert any(e.negatives for e in train.dataset) and not all(e.negatives for e in train.dataset)
    for example in train.dataset:
        for side in (example.query, example.positive, *example.negatives):
            assert (side.image is not None) == ("<|image_1|>" in side.text)
    assert load_data(list(data.train_files), image_dir=data.image_dir).mixture.sizes == counts


def test_nli_triplets_load(data):
    rows = load_nli_triplets(data.nli)
    assert len(rows) == SIZES.nli_rows and all(len(e.negatives) == 1 for e in rows)
    assert all(e.query.text != e.positive.text != e.negatives[0].text for e in rows)
    spec = json.loads(data.teacher_spec.read_text())
    assert spec == {"nli_for_simcse": {"path": data.nli.name, "teacher": data.teacher.name}}


def test_nli_heldout_is_unseen(data):
    """E5-V's held-out triplets: the training CSV's layout, distinct premises, and no sentence of any row
    in the training CSV (in any column)."""
    held_out = load_nli_triplets(data.nli_heldout)
    assert len(held_out) == SIZES.nli_heldout_rows
    assert len({e.query.text for e in held_out}) == len(held_out)
    seen = {side.text for e in load_nli_triplets(data.nli) for side in (e.query, e.positive, *e.negatives)}
    assert not seen & {side.text for e in held_out for side in (e.query, e.positive, *e.negatives)}


def test_mmeb_eval_parquet(data):
    manifest = json.loads(data.mmeb_eval_subsets.read_text())
    assert set(manifest) == set(EVAL_SUBSETS)
    for task in ("classification", "vqa", "retrieval", "grounding"):
        splits = {m["in_distribution"] for m in manifest.values() if m["meta_task"] == task}
        assert splits == {True, False}, task
    for name, info in manifest.items():
        assert (info["train_subset"] in TRAIN_SUBSETS) == info["in_distribution"]
        assert info["split"] == ("ind" if info["in_distribution"] else "ood")
        table = pq.read_table(data.mmeb_eval / name / "test-00000-of-00001.parquet")
        texts, lists = ["qry_text", "qry_img_path"], ["tgt_text", "tgt_img_path"]
        assert table.schema == pa.schema(
            [(c, pa.string()) for c in texts] + [(c, pa.list_(pa.string())) for c in lists]
        )
        assert table.num_rows == SIZES.eval_rows
        for row in table.to_pylist():
            candidates = list(zip(row["tgt_text"], row["tgt_img_path"], strict=True))
            assert 2 <= len(candidates) <= SIZES.eval_candidates
            assert len(set(candidates)) == len(candidates), (name, row)  # the truth is there once
            for text, image in [(row["qry_text"], row["qry_img_path"]), *candidates]:
                assert ("<|image_1|>" in text) == bool(image)
                assert not image or (data.mmeb_eval_images / image).is_file()


def test_flickr_and_urban(data):
    table = pq.read_table(data.flickr)
    assert table.schema == pa.schema([("image", pa.string()), ("text", pa.list_(pa.string()))])
    rows = table.to_pylist()
    assert len(rows) == SIZES.flickr_images
    assert all(len(r["text"]) == 5 == len(set(r["text"])) and (data.flickr.parent / r["image"]).is_file() for r in rows)
    captions = [c for r in rows for c in r["text"]]
    assert len(set(captions)) == len(captions)
    ids = sorted(int(p.stem) for p in (data.urban1k / "caption").glob("*.txt"))
    assert ids == list(range(1, SIZES.urban_pairs + 1))
    assert sorted(int(p.stem) for p in (data.urban1k / "image").glob("*.jpg")) == ids
    assert all((data.urban1k / "caption" / f"{i}.txt").read_text().count("\n") == 1 for i in ids)


def test_sugarcrepe(data):
    for kind in SUGARCREPE:
        items = json.loads((data.sugarcrepe / f"{kind}.json").read_text())
        assert list(items) == [str(i) for i in range(SIZES.sugarcrepe_rows)]
        for item in items.values():
            assert set(item) == {"filename", "caption", "negative_caption"}
            assert item["caption"] != item["negative_caption"]
            assert (data.sugarcrepe / "images" / item["filename"]).is_file()


def _length_only_accuracy(items, length) -> float:
    """A blind scorer that calls the shorter caption right (a tie is half right), in %."""
    wins = [1.0 if length(p) < length(n) else 0.5 if length(p) == length(n) else 0.0 for p, n in items]
    return 100 * sum(wins) / len(wins)


def test_sugarcrepe_files_have_no_length_shortcut():
    """On every file of the embedded default (40 pairs each; the tiny sizes' 4 are too few to measure),
    a length-only scorer, in characters or in words, stays within 50 ± 15%: with the add_* positives
    bare, "the shorter caption" scored 100% on both."""
    folder = default_data().sugarcrepe
    for kind in SUGARCREPE:
        items = json.loads((folder / f"{kind}.json").read_text()).values()
        pairs = [(item["caption"], item["negative_caption"]) for item in items]
        for unit, length in (("characters", len), ("words", lambda text: len(text.split()))):
            accuracy = _length_only_accuracy(pairs, length)
            assert 35 <= accuracy <= 65, (kind, unit, accuracy)


def _blind_precision(scores: list[list[float]]) -> float:
    """P@1 in % of a blind scorer's scores per MMEB-eval row (truth at index 0; a tie counts as 1/number tied)."""
    return 100 * sum(1 / row.count(max(row)) for row in scores if row[0] == max(row)) / len(scores)


def test_mmeb_eval_candidates_have_no_blind_shortcut():
    """On every MMEB-eval subset of the default (100 rows, 20 candidates: chance 5%), scorers that never
    look at the query stay near chance: the shortest or the longest candidate text, and the candidate
    (text and image) seen most or least often across the subset's candidate lists."""
    from collections import Counter

    root = default_data().mmeb_eval
    for subset in EVAL_SUBSETS:
        rows = pq.read_table(root / subset / "test-00000-of-00001.parquet").to_pylist()
        candidates = [list(zip(row["tgt_text"], row["tgt_img_path"], strict=True)) for row in rows]
        seen = Counter(candidate for row in candidates for candidate in row)
        lengths = [[len(text) for text, _ in row] for row in candidates]
        counts = [[seen[candidate] for candidate in row] for row in candidates]
        scorers = {
            "shortest": [[-n for n in row] for row in lengths],
            "longest": lengths,
            "most often": counts,
            "least often": [[-n for n in row] for row in counts],
        }
        for name, scores in scorers.items():
            assert _blind_precision(scores) <= 15, (subset, name)


def test_nli_heldout_has_no_length_shortcut():
    """The entailment and the contradiction of the default's 200 held-out triplets: a length-only scorer, in
    characters or in words, stays within 50 ± 15% (as SugarCrepe's files)."""
    with open(default_data().nli_heldout, newline="", encoding="utf-8") as f:
        pairs = [(row["sent1"], row["hard_neg"]) for row in csv.DictReader(f)]
    assert len(pairs) == Sizes().nli_heldout_rows
    for unit, length in (("characters", len), ("words", lambda text: len(text.split()))):
        assert 35 <= _length_only_accuracy(pairs, length) <= 65, unit


def test_video(data):
    with open(data.video_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == SIZES.videos and list(rows[0]) == ["key", "vid_key", "video_id", "sentence"]
    assert len({r["sentence"] for r in rows}) == len(rows)
    for r in rows:
        frames = sorted(p.name for p in (data.video_frames / r["video_id"]).iterdir())
        assert frames == [f"{i:03d}.jpg" for i in range(SIZES.video_frames)]
    # The same videos in MMEB-V2's layout (HF VLM2Vec/MSR-VTT: video_id, video, caption).
    v2 = pq.read_table(data.video_v2).to_pylist()
    assert [(row["video_id"], row["caption"]) for row in v2] == [(r["video_id"], r["sentence"]) for r in rows]
    assert all(row["video"] == row["video_id"] + ".mp4" for row in v2)


def test_every_image_decodes_and_held_out_renders_are_fresh(data):
    images = sorted(data.root.rglob("*.jpg"))
    assert all(load_image(p).size == (64, 64) for p in images)
    train = {hashlib.sha256(p.read_bytes()).digest() for p in (data.root / "images").rglob("*.jpg")}
    held_out = [p for p in images if not p.is_relative_to(data.root / "images")]
    assert held_out and not any(hashlib.sha256(p.read_bytes()).digest() in train for p in held_out)


def test_captions_identify_their_picture():
    """Every paraphrase names exactly the shape, colour and quadrant of its picture, so the 256 pictures
    (8 shapes x 8 colours x 4 quadrants) are told apart by any of their captions."""
    rng = world.np.random.default_rng(0)
    seen = {}
    for single in world.ALL_SINGLES:
        for template in range(len(world.SINGLE_TEMPLATES)):
            for _ in range(3):
                caption = world.single_caption(single, rng, template)
                words = re.findall(r"[a-z]+", caption)
                assert [w for w in words if w in world.SHAPES] == [single.shape]
                assert [w for w in words if w in world.COLOUR_NAMES] == [single.colour]
                vertical = {"upper": "top", "lower": "bottom"}
                place = [vertical.get(w, w) for w in words if w in ("top", "upper", "bottom", "lower", "left", "right")]
                assert " ".join(place) == single.quadrant, caption
                assert seen.setdefault(caption, single) == single
    assert len(world.ALL_SINGLES) == 256 and Sizes().flickr_images >= 200
    assert "an orange" in world.articles("a orange star") and world.articles("A orange") == "An orange"


def test_default_data_generates_once(tmp_path):
    root = tmp_path / "cache"
    first = default_data(root, sizes=SIZES)
    stamp = first.manifest.stat().st_mtime_ns
    assert default_data(root, sizes=SIZES).manifest.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".cache.tmp-*"))
    with pytest.raises(FileExistsError, match="no matching manifest"):
        default_data(root, sizes=dataclasses.replace(SIZES, videos=2))
    with pytest.raises(FileExistsError, match="not an empty folder"):
        generate(root)


def test_default_data_uses_mmfast_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFAST_HOME", str(tmp_path))
    data = default_data(sizes=SIZES)
    assert data.root.parent == tmp_path and data.root.name.startswith("default-data-v")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Sizes.videos must be an int >= 1"):
        Sizes(videos=0)
    with pytest.raises(ValueError, match="only 256 distinct pictures"):
        Sizes(flickr_images=300)
    with pytest.raises(ValueError, match="eval_candidates"):
        Sizes(eval_candidates=1)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "x", image_size=8, sizes=SIZES)
    with pytest.raises(ValueError, match="seed"):
        generate(tmp_path / "x", seed=-1, sizes=SIZES)
    with pytest.raises(TypeError, match="Sizes"):
        generate(tmp_path / "x", sizes={"videos": 1})

"""MMEB-train as VLM2Vec reads it (issue 19): one instruction split per subset, the first-N-rows cap,
and the error for images that are not beside the data when --image_dir is omitted.

The data is written in the published HF layout, with both splits present:
    MMEB-train/<Subset>/original-00000-of-00001.parquet
    MMEB-train/<Subset>/diverse_instruction-00000-of-00001.parquet
    MMEB-train/images/<Subset>/Train/<i>.jpg           (the unzipped images_zip/<Subset>.zip)
Both splits hold the same rows; only the instruction's wording differs, as on the hub.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfast.train.arguments import parse_arguments
from mmfast.train.data import load_mmeb_train
from mmfast.train.data_report import DataReport
from mmfast.train.data_spec import load_data, parse_data_spec, split_of
from mmfast.train.run import load_training_data

INSTRUCTIONS = {
    "original": "Represent the given image for classification",
    "diverse_instruction": "Classify the object shown in this picture",
}
SUBSETS = {"ImageNet_1K": 7, "N24News": 5}  # rows per subset (odd sizes)


def write_mmeb_train(root, *, shards=1, row_group_size=None):
    """The HF folder layout with both splits; `shards` files per split, as `original-0000i-of-0000n`."""
    for subset, rows in SUBSETS.items():
        images = root / "images" / subset / "Train"
        images.mkdir(parents=True)
        (root / subset).mkdir()
        for i in range(rows):
            Image.new("RGB", (5 + i, 7), (i * 30 % 255, 40, 90)).save(images / f"image_{i}.jpg")
        for split, instruction in INSTRUCTIONS.items():
            records = [
                {
                    "qry": f"<|image_1|>\n{instruction}\n",
                    "qry_image_path": f"images/{subset}/Train/image_{i}.jpg",
                    "pos_text": f"{subset} label {i}",
                    "pos_image_path": "",
                    "neg_text": "",
                    "neg_image_path": "",
                }
                for i in range(rows)
            ]
            size = -(-rows // shards)
            for shard in range(shards):
                table = pa.Table.from_pylist(records[shard * size : (shard + 1) * size])
                name = f"{split}-{shard:05d}-of-{shards:05d}.parquet"
                pq.write_table(table, root / subset / name, row_group_size=row_group_size)
    return root


@pytest.fixture
def mmeb_train(tmp_path):
    return write_mmeb_train(tmp_path / "MMEB-train")


def instructions_of(data) -> set[str]:
    return {example.query.text.split("\n")[1] for example in data.dataset}


def test_split_of_file_names():
    assert split_of(Path("original-00000-of-00001.parquet")) == "original"
    assert split_of(Path("diverse_instruction.jsonl")) == "diverse_instruction"
    assert split_of(Path("ImageNet_1K.jsonl")) is None
    assert split_of(Path("original_extra.parquet")) is None


@pytest.mark.parametrize("split", ["original", "diverse_instruction"])
def test_a_folder_with_both_splits_trains_on_one(mmeb_train, split):
    report = DataReport()
    data = load_data([mmeb_train], image_dir=mmeb_train, mmeb_split=split, report=report)
    assert data.mixture.names == tuple(SUBSETS) and data.mixture.sizes == tuple(SUBSETS.values())
    assert all(len(s.paths) == 1 and split_of(s.paths[0]) == split for s in data.sources)
    assert instructions_of(data) == {INSTRUCTIONS[split]}
    assert report.total == 0


def test_the_default_split_is_original(mmeb_train):
    data = load_data([mmeb_train / "ImageNet_1K"], image_dir=mmeb_train)
    assert data.mixture.sizes == (7,) and instructions_of(data) == {INSTRUCTIONS["original"]}


def test_explicit_files_of_both_splits_are_not_merged(mmeb_train):
    files = sorted((mmeb_train / "N24News").glob("*.parquet"))
    data = load_data(files, image_dir=mmeb_train, mmeb_split="diverse_instruction")
    assert data.mixture.sizes == (5,) and instructions_of(data) == {INSTRUCTIONS["diverse_instruction"]}


def test_a_subset_without_the_chosen_split_is_an_error(mmeb_train):
    for file in (mmeb_train / "N24News").glob("original-*"):
        file.unlink()
    with pytest.raises(ValueError, match="subset 'N24News' has diverse_instruction files but no original file") as e:
        parse_data_spec([mmeb_train], image_dir=mmeb_train)
    assert "--mmeb_split" in str(e.value)
    with pytest.raises(ValueError, match="--mmeb_split: mmeb_split must be one of original, diverse_instruction"):
        parse_data_spec([mmeb_train], image_dir=mmeb_train, mmeb_split="train")


def test_sharded_splits_keep_every_shard_of_the_chosen_split(tmp_path):
    root = write_mmeb_train(tmp_path / "MMEB-train", shards=3)
    data = load_data([root], image_dir=root, mmeb_split="diverse_instruction")
    assert [len(s.paths) for s in data.sources] == [3, 3] and data.mixture.sizes == (7, 5)
    assert instructions_of(data) == {INSTRUCTIONS["diverse_instruction"]}


def test_spec_picks_the_split_and_the_cap_per_subset(mmeb_train, tmp_path):
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        "ImageNet_1K:\n  path: MMEB-train/ImageNet_1K\n  mmeb_split: diverse_instruction\n  num_sample_per_subset: 3\n"
        "N24News:\n  path: MMEB-train/N24News\n"
    )
    data = load_data(spec, image_dir=mmeb_train, num_sample_per_subset=4)
    assert data.mixture.sizes == (3, 4)
    by_subset = {name: {e.query.text.split("\n")[1] for e in data.dataset if e.subset == name} for name in SUBSETS}
    assert by_subset == {"ImageNet_1K": {INSTRUCTIONS["diverse_instruction"]}, "N24News": {INSTRUCTIONS["original"]}}
    for text, error in [
        ("A:\n  path: MMEB-train/N24News\n  mmeb_split: both\n", "mmeb_split must be one of"),
        ("A:\n  path: MMEB-train/N24News\n  num_sample_per_subset: 0\n", "num_sample_per_subset must be a whole"),
        ("A:\n  path: MMEB-train/N24News\n  num_sample_per_subset: 2.5\n", "num_sample_per_subset must be a whole"),
    ]:
        spec.write_text(text)
        with pytest.raises(ValueError, match=error) as e:
            parse_data_spec(spec)
        assert f"{spec}, subset 'A'" in str(e.value)


@pytest.mark.parametrize("shards, row_group_size", [(1, None), (3, None), (1, 2)])
def test_num_sample_per_subset_is_the_first_rows(tmp_path, shards, row_group_size):
    root = write_mmeb_train(tmp_path / "MMEB-train", shards=shards, row_group_size=row_group_size)
    for cap in (1, 4, 6, 100):
        report = DataReport()
        data = load_data([root], image_dir=root, num_sample_per_subset=cap, report=report)
        assert data.mixture.sizes == tuple(min(cap, rows) for rows in SUBSETS.values())
        for subset, rows in SUBSETS.items():
            labels = [e.positive.text for e in data.dataset if e.subset == subset]
            assert labels == [f"{subset} label {i}" for i in range(min(cap, rows))]
        assert report.rows_read == sum(min(cap, rows) for rows in SUBSETS.values())


def test_the_cap_counts_bad_rows_among_the_first(mmeb_train):
    (mmeb_train / "images" / "N24News" / "Train" / "image_1.jpg").unlink()
    report = DataReport()
    data = load_data([mmeb_train / "N24News"], image_dir=mmeb_train, num_sample_per_subset=3, report=report)
    assert data.mixture.sizes == (2,) and report.counts == {"missing image": 1}
    assert [e.row for e in data.dataset] == [0, 2]


def test_train_arguments_reach_the_data(mmeb_train, tmp_path):
    argv = ["--recipe", "vlm2vec", "--data", str(mmeb_train), "--image_dir", str(mmeb_train),
            "--output_dir", str(tmp_path / "out"), "--mmeb_split", "diverse_instruction",
            "--num_sample_per_subset", "2"]  # fmt: skip
    run = parse_arguments(argv)
    data_args = run.data
    assert data_args.mmeb_split == "diverse_instruction" and data_args.num_sample_per_subset == 2
    data = load_training_data(data_args, run.recipe, DataReport())
    assert data.mixture.sizes == (2, 2) and instructions_of(data) == {INSTRUCTIONS["diverse_instruction"]}
    data_args = parse_arguments(argv[:-4]).data
    assert data_args.mmeb_split == "original" and data_args.num_sample_per_subset is None


def test_without_image_dir_images_not_beside_the_data_are_an_error(mmeb_train):
    parquet = mmeb_train / "ImageNet_1K" / "original-00000-of-00001.parquet"
    tried = mmeb_train / "ImageNet_1K" / "images" / "ImageNet_1K" / "Train" / "image_0.jpg"
    for strict in (False, True):
        with pytest.raises(ValueError, match="--image_dir") as e:
            load_mmeb_train(parquet, None, strict=strict)
        assert str(parquet) in str(e.value) and f"tried {tried}" in str(e.value)
    with pytest.raises(ValueError, match="no image found beside the data file"):
        load_data([mmeb_train])
    # With --image_dir the same files load; an image missing among found ones is a counted bad row.
    (mmeb_train / "images" / "ImageNet_1K" / "Train" / "image_3.jpg").unlink()
    assert len(load_mmeb_train(parquet, mmeb_train)) == 6


def test_without_image_dir_images_beside_the_data_still_load(mmeb_train):
    """The old meaning of no --image_dir stays: paths relative to the data file's folder, and a missing one
    among found ones is counted, not an error."""
    subset = mmeb_train / "ImageNet_1K"
    (subset / "images").symlink_to(mmeb_train / "images", target_is_directory=True)
    (mmeb_train / "images" / "ImageNet_1K" / "Train" / "image_2.jpg").unlink()
    report = DataReport()
    examples = load_mmeb_train(subset / "original-00000-of-00001.parquet", None, report=report)
    assert len(examples) == 6 and report.counts == {"missing image": 1}

"""Rows read through Hugging Face `datasets` (issue 22, "data that scales"): JSONL, parquet and the HF
folder layout become memory-mapped Arrow in the datasets cache; a stream gives the same rows and the same
bad-row report; the cache follows the file; the dry run reads its sample through the run's own loader."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfast.train import data as data_module
from mmfast.train.arguments import parse_arguments
from mmfast.train.data import FileRows, load_mmeb_train, load_nli_triplets
from mmfast.train.data_report import BadRowError, DataReport
from mmfast.train.data_spec import load_data
from mmfast.train.records import open_records
from mmfast.train.run import load_training_data
from mmfast.train.sampling import Concatenation, mixture

dry_run_module = importlib.import_module("mmfast.train.dry_run")  # the package's `dry_run` is the function


def mmeb_row(i, qry_image="", pos_image="", **extra):
    query = f"<|image_1|>\nRepresent image {i}" if qry_image else f"query {i}"
    return {"qry": query, "qry_image_path": qry_image, "pos_text": f"positive {i}", "pos_image_path": pos_image,
            **extra}  # fmt: skip


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (6, 5), (10, 200, 30)).save(folder / name)
    return folder


def rows_with_every_problem():
    """Good rows mixed with one of each kind of bad row (and several hard negatives), 13 rows."""
    return [
        mmeb_row(0, qry_image="a.jpg", neg_text=["n0", "<|image_1|>"], neg_image_path=["", "b.jpg"]),
        mmeb_row(1, neg_text="a negative", neg_image_path=""),
        {**mmeb_row(2), "qry": "  "},
        mmeb_row(3, qry_image="gone.jpg"),
        {**mmeb_row(4), "pos_text": "<|image_1|> no image"},
        mmeb_row(5, neg_text=["x", "y"], neg_image_path=["a.jpg", "b.jpg", "a.jpg"]),
        {**mmeb_row(6, qry_image="a.jpg"), "qry": "<|image_1|> <|image_1|>"},
        mmeb_row(7, neg_text=["", ""], neg_image_path=["", "gone.jpg"]),
        mmeb_row(8, pos_image="b.jpg"),
        mmeb_row(9),
        {**mmeb_row(10), "pos_text": "", "pos_image_path": ""},
        mmeb_row(11, neg_text=["<|image_1|>"], neg_image_path=[""]),
        mmeb_row(12),
    ]


EXPECTED_SKIPS = {
    "empty query": [2],
    "missing image": [3, 7],
    "<|image_1|> without an image": [4, 11],
    "ragged negatives": [5],
    "several <|image_1|> in one query": [6],
    "empty positive": [10],
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def as_tuples(examples):
    return [(e.query, e.positive, e.negatives, e.subset, e.row) for e in examples]


def skipped_rows(report):
    return {reason: [b.row for b in kept] for reason, kept in report.offenders.items()}


def test_jsonl_rows_are_memory_mapped_arrow_in_the_datasets_cache(tmp_path, images):
    path = write_jsonl(tmp_path / "Sub.jsonl", rows_with_every_problem())
    report = DataReport()
    examples = load_mmeb_train(path, images, report=report)
    assert isinstance(examples, FileRows)
    cache = os.environ["HF_DATASETS_CACHE"]
    records = open_records(path, required=data_module.MMEB_REQUIRED, lists=data_module.MMEB_NEGATIVES)
    assert records.cache_files and all(f["filename"].startswith(cache) for f in records.cache_files)
    assert [e.row for e in examples] == [0, 1, 8, 9, 12]
    assert skipped_rows(report) == EXPECTED_SKIPS and report.rows == {str(path): 13}
    first, second = examples[0], examples[1]
    assert first.query.image == str(images / "a.jpg")
    assert [(n.text, n.image) for n in first.negatives] == [("n0", None), ("<|image_1|>", str(images / "b.jpg"))]
    assert [n.text for n in second.negatives] == ["a negative"] and examples.negatives.tolist() == [2, 1, 0, 0, 0]
    assert examples.images and examples[2].positive.image == str(images / "b.jpg")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_stream_gives_the_rows_and_the_report_of_the_converted_file(tmp_path, images, fmt):
    rows = rows_with_every_problem()
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "Sub.jsonl", rows)
    else:  # parquet needs one type per column: every negative column a list
        for row in rows:
            for column in ("neg_text", "neg_image_path"):
                row[column] = row.get(column) if isinstance(row.get(column), list) else [row.get(column) or ""]
        path = write_parquet(tmp_path / "Sub" / "original-00000-of-00001.parquet", rows)
    converted, streamed = DataReport(), DataReport()
    expected = as_tuples(load_mmeb_train(path, images, report=converted))
    assert as_tuples(load_mmeb_train(path, images, report=streamed, streaming=True)) == expected
    assert streamed == converted and skipped_rows(streamed) == EXPECTED_SKIPS
    for streaming in (False, True):  # a row found bad as it is read comes first, as in a line-by-line reader
        with pytest.raises(BadRowError, match=re.escape(f"{path}, row 5: ragged negatives")):
            load_mmeb_train(path, images, strict=True, streaming=streaming)
    first = DataReport()
    assert as_tuples(load_mmeb_train(path, images, report=first, limit=4, streaming=True)) == expected[:2]
    assert first.rows == {str(path): 4} and skipped_rows(first) == {"empty query": [2], "missing image": [3]}


def test_nli_triplets_stream_as_they_convert(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\na,b,c\n"x, y",z,\n,q,r\ns,,t\nu,v,w\n')
    converted, streamed = DataReport(), DataReport()
    expected = as_tuples(load_nli_triplets(path, report=converted))
    assert [row for *_, row in expected] == [0, 1, 4]
    assert as_tuples(load_nli_triplets(path, report=streamed, streaming=True)) == expected
    assert streamed == converted and converted.counts == {"empty query": 1, "empty positive": 1}


def test_the_hf_folder_layout_reads_like_its_jsonl(tmp_path, images):
    rows = [mmeb_row(i, qry_image="a.jpg") for i in range(7)]
    folder = tmp_path / "MMEB-train"
    for subset in ("ImageNet_1K", "N24News"):
        write_parquet(folder / subset / "original-00000-of-00001.parquet", rows)
        write_parquet(folder / subset / "diverse_instruction-00000-of-00001.parquet", rows[:2])
    write_jsonl(tmp_path / "ImageNet_1K.jsonl", rows)
    data = load_data([folder], image_dir=images)
    assert data.mixture.names == ("ImageNet_1K", "N24News") and data.mixture.sizes == (7, 7)
    assert isinstance(data.mixture.items, Concatenation)  # the subsets are not copied into one list
    from_jsonl = load_mmeb_train(tmp_path / "ImageNet_1K.jsonl", images)
    assert as_tuples(data.mixture.items.parts[0]) == as_tuples(from_jsonl)
    assert data.subsets_with_images() == ["ImageNet_1K", "N24News"] and data.negatives_per_row().tolist() == [0] * 14


def test_the_cache_follows_the_file(tmp_path, images):
    """A file changed on disk is read again (the datasets cache is keyed on its size and modification
    time), by both readers: pyarrow's and, for a file it refuses, the line reader."""
    path = write_jsonl(tmp_path / "S.jsonl", [mmeb_row(i) for i in range(3)])
    assert [e.positive.text for e in load_mmeb_train(path, images)] == [f"positive {i}" for i in range(3)]
    write_jsonl(path, [mmeb_row(i) for i in range(5, 9)])
    assert [e.positive.text for e in load_mmeb_train(path, images)] == [f"positive {i}" for i in range(5, 9)]
    mixed = [mmeb_row(0, neg_text="one"), mmeb_row(1, neg_text=["two", "three"], neg_image_path=["", ""])]
    write_jsonl(path, mixed)  # a column that is a string in one row and a list in another: the line reader
    assert [len(e.negatives) for e in load_mmeb_train(path, images)] == [1, 2]
    write_jsonl(path, [mixed[1], mixed[0], mmeb_row(2)])
    assert [len(e.negatives) for e in load_mmeb_train(path, images)] == [2, 1, 0]


def test_a_null_and_a_missing_column_are_told_apart(tmp_path, images):
    path = write_jsonl(tmp_path / "S.jsonl", [mmeb_row(0), {**mmeb_row(1), "pos_image_path": None}])
    assert [e.positive.image for e in load_mmeb_train(path, images)] == [None, None]
    row = mmeb_row(2)
    del row["pos_image_path"]
    write_jsonl(path, [mmeb_row(0), row])
    with pytest.raises(ValueError, match=r"S\.jsonl: row 1 has no column 'pos_image_path'"):
        load_mmeb_train(path, images)


def test_the_dry_run_reads_its_sample_through_the_run_s_loader(tmp_path, images, monkeypatch):
    path = write_jsonl(tmp_path / "Rows.jsonl", [mmeb_row(i) for i in range(40)] + [{**mmeb_row(40), "qry": ""}])
    calls = []
    real = data_module.open_records

    def spy(file, **kwargs):
        calls.append((str(file), kwargs.get("streaming", False)))
        return real(file, **kwargs)

    monkeypatch.setattr(data_module, "open_records", spy)
    argv = ["--recipe", "vlm2vec", "--data", str(path), "--image_dir", str(images), "--output_dir",
            str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--report_to", "none"]  # fmt: skip
    monkeypatch.setattr(dry_run_module, "SAMPLE_ROWS", 12)
    plan = dry_run_module.dry_run(argv)
    assert plan.ok, plan.errors
    assert calls == [(str(path), True)]  # streamed: nothing converted for a dry run
    assert "Rows: 1 mmeb file(s); 12 row(s) read (the first 12 of each file: a sample), 12 usable" in plan.format()
    monkeypatch.setattr(dry_run_module, "SAMPLE_ROWS", 100)
    plan = dry_run_module.dry_run(argv)
    assert "41 row(s) read, 40 usable" in plan.format() and "empty query: 1" in plan.format()
    calls.clear()
    run = parse_arguments(argv)
    report = DataReport()
    data = load_training_data(run.data, run.recipe, report)  # what build_trainer reads the data with
    assert calls == [(str(path), False)] and data.mixture.sizes == (40,) and report.counts == {"empty query": 1}


def sees_an_image(example, max_negatives):
    """The definition, row by row: a side the loss sees (query, positive, the first max_negatives
    negatives) has an image."""
    kept = example.negatives if max_negatives is None else example.negatives[:max_negatives]
    return any(side.image is not None for side in (example.query, example.positive, *kept))


@pytest.mark.parametrize("max_negatives, expected", [(None, True), (3, True), (2, True), (1, False), (0, False)])
def test_every_row_has_image_is_read_by_column_as_the_rows_tell_it(tmp_path, images, max_negatives, expected):
    with_images = [
        mmeb_row(0, qry_image="a.jpg"),
        mmeb_row(1, pos_image="b.jpg", neg_text="text only", neg_image_path=""),
        mmeb_row(2, neg_text=["x", "<|image_1|>"], neg_image_path=["", "a.jpg"]),  # its second negative
        mmeb_row(3, neg_text=["<|image_1|>"], neg_image_path=["b.jpg"]),
        mmeb_row(4, neg_text=["", "y", "<|image_1|>"], neg_image_path=["", "", "a.jpg"]),  # the first is dropped
    ]
    files = [write_jsonl(tmp_path / "A.jsonl", with_images[:3]), write_parquet(tmp_path / "B.parquet", with_images[3:])]
    data = load_data(files, image_dir=images)
    assert data.every_row_has_image(max_negatives) == expected
    assert expected == all(sees_an_image(e, max_negatives) for e in data.mixture)
    in_memory = dataclasses.replace(data, mixture=mixture({"rows": list(data.mixture)}))  # rows one by one
    assert in_memory.every_row_has_image(max_negatives) == expected
    text_only = load_data([*files, write_jsonl(tmp_path / "C.jsonl", [mmeb_row(5)])], image_dir=images)
    assert not text_only.every_row_has_image(max_negatives)
    mixed = load_data([write_jsonl(tmp_path / "Sub.jsonl", rows_with_every_problem())], image_dir=images)
    assert mixed.every_row_has_image(max_negatives) == all(sees_an_image(e, max_negatives) for e in mixed.mixture)


def test_slices_read_rows_by_chunk_as_indexing_reads_them(tmp_path, images, monkeypatch):
    monkeypatch.setattr(data_module, "SLICE_ROWS", 2)  # several chunks in a slice
    first = load_mmeb_train(write_jsonl(tmp_path / "Sub.jsonl", rows_with_every_problem()), images)
    second = load_mmeb_train(write_jsonl(tmp_path / "Two.jsonl", [mmeb_row(i) for i in range(4)]), images)
    assert as_tuples(first[1:5]) == as_tuples([first[i] for i in range(1, 5)])
    both = Concatenation([first, [second[0], second[1]], second])
    for cut in (slice(None), slice(3, 8), slice(4, 6), slice(6, 7), slice(0, 11, 3), slice(9, 2, -2)):
        assert as_tuples(both[cut]) == as_tuples([both[i] for i in range(*cut.indices(len(both)))]), cut

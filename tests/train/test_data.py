"""The data layer: loaders and their error paths, bad-row accounting, teacher files, the data spec."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmfast.train.data import EmbeddingDataset, load_image, load_mmeb_train, load_nli_triplets, subset_name
from mmfast.train.data_report import BadImageError, BadRowError, DataReport
from mmfast.train.data_spec import load_data, parse_data_spec
from mmfast.train.teacher_file import load_teacher, save_teacher


def mmeb_row(qry="<|image_1|>\nRepresent the given image\n", qry_image="a.jpg", pos="cat", pos_image="", **extra):
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image, **extra}


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mmeb_jsonl_rows_negatives_and_paths(tmp_path, image_dir):
    several = {"neg_text": ["<|image_1|>", "x"], "neg_image_path": ["a.jpg", ""]}
    rows = [
        mmeb_row(),
        mmeb_row(neg_text="dog", neg_image_path=""),
        mmeb_row(qry="Find the image: a cat", qry_image="", pos="<|image_1|>", pos_image="b.jpg", **several),
        mmeb_row(neg_text="", neg_image_path=""),
    ]
    path = write_jsonl(tmp_path / "Sub.jsonl", rows)
    report = DataReport()
    examples = load_mmeb_train(path, image_dir, report=report)
    assert [e.row for e in examples] == [0, 1, 2, 3] and {e.subset for e in examples} == {"Sub"}
    assert examples[0].query.image == str(image_dir / "a.jpg") and examples[0].positive.image is None
    assert examples[0].negatives == () and examples[3].negatives == ()
    assert [n.text for n in examples[1].negatives] == ["dog"]
    assert [(n.text, n.image) for n in examples[2].negatives] == [
        ("<|image_1|>", str(image_dir / "a.jpg")),
        ("x", None),
    ]
    assert report.rows == {str(path): 4} and report.total == 0


def test_mmeb_parquet_matches_jsonl(tmp_path, image_dir):
    rows = [mmeb_row(neg_text="dog", neg_image_path=""), mmeb_row(pos="bird")]
    jsonl = write_jsonl(tmp_path / "A.jsonl", rows)
    folder = tmp_path / "A"
    folder.mkdir()
    parquet = folder / "original-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    from_parquet = load_mmeb_train(parquet, image_dir)
    assert subset_name(parquet) == "A" == subset_name(jsonl)
    assert [(e.query, e.positive, e.negatives) for e in from_parquet] == [
        (e.query, e.positive, e.negatives) for e in load_mmeb_train(jsonl, image_dir)
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_mmeb_missing_column_names_file_and_column(tmp_path, image_dir, fmt):
    row = mmeb_row()
    del row["pos_text"]
    path = tmp_path / f"S.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [mmeb_row(), row])
    else:
        pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(ValueError, match="pos_text") as err:
        load_mmeb_train(path, image_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_mmeb_wrong_type_names_column(tmp_path, image_dir, fmt):
    path = tmp_path / f"S.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [mmeb_row(pos=7)])
    else:
        pq.write_table(pa.Table.from_pylist([mmeb_row(pos=7)]), path)
    with pytest.raises(ValueError, match=r"pos_text.*(int|string)") as err:
        load_mmeb_train(path, image_dir)
    assert str(path) in str(err.value)


def test_mmeb_not_json_names_line(tmp_path, image_dir):
    path = tmp_path / "S.jsonl"
    path.write_text(json.dumps(mmeb_row()) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"line 3 \(row 1\) is not valid JSON"):
        load_mmeb_train(path, image_dir)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not an object"):
        load_mmeb_train(path, image_dir)


def test_mmeb_non_utf8_line_is_a_bad_row_named_by_file_and_row(tmp_path, image_dir):
    path = tmp_path / "S.jsonl"
    good = json.dumps(mmeb_row()).encode()
    latin1 = json.dumps(mmeb_row(pos="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(good + b"\n\n" + latin1 + b"\n" + good + b"\n")
    report = DataReport()
    examples = load_mmeb_train(path, image_dir, report=report)
    assert [e.row for e in examples] == [0, 2]
    assert report.counts == {"not UTF-8 text": 1} and report.rows == {str(path): 3}
    assert report.offenders["not UTF-8 text"][0].row == 1
    with pytest.raises(BadRowError, match=r"S\.jsonl, row 1: not UTF-8 text"):
        load_mmeb_train(path, image_dir, strict=True)


def test_mmeb_bad_file_arguments(tmp_path, image_dir):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mmeb_train(tmp_path / "nope.jsonl", image_dir)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        load_mmeb_train(tmp_path / "x.txt", image_dir)
    with pytest.raises(ValueError, match="no data files"):
        load_mmeb_train([], image_dir)


BAD_ROWS = [
    (mmeb_row(qry="  ", qry_image=""), "empty query", None),
    (mmeb_row(pos="", pos_image=""), "empty positive", None),
    (mmeb_row(qry_image="gone.jpg"), "missing image", "gone.jpg"),
    (mmeb_row(pos="x", neg_text="<|image_1|>", neg_image_path="gone.jpg"), "missing image", "gone.jpg"),
    (mmeb_row(qry="<|image_1|> what", qry_image=""), "<|image_1|> without an image", None),
    (mmeb_row(neg_text=["a", "b"], neg_image_path=["a.jpg", "b.jpg", "a.jpg"]), "ragged negatives", None),
    (mmeb_row(qry="<|image_1|> and <|image_1|>"), "several <|image_1|> in one query", None),
    (mmeb_row(pos="<|image_1|><|image_1|> a cat", pos_image="b.jpg"), "several <|image_1|> in one positive", None),
]


@pytest.mark.parametrize("row, reason, path", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_ROWS)])
def test_mmeb_bad_rows_are_counted_or_strict_errors(tmp_path, image_dir, row, reason, path):
    file = write_jsonl(tmp_path / "S.jsonl", [mmeb_row(), row, mmeb_row()])
    report = DataReport()
    examples = load_mmeb_train(file, image_dir, report=report)
    assert [e.row for e in examples] == [0, 2]
    assert report.counts == {reason: 1} and report.rows == {str(file): 3}
    (offender,) = report.offenders[reason]
    assert (offender.source, offender.row) == (str(file), 1)
    assert offender.path == (str(image_dir / path) if path else None)
    with pytest.raises(BadRowError, match=rf"S\.jsonl, row 1: {re.escape(reason)}") as err:
        load_mmeb_train(file, image_dir, strict=True)
    assert (err.value.source, err.value.row, err.value.reason) == (str(file), 1, reason)
    if path:
        assert path in str(err.value)
    with pytest.raises(BadRowError):  # a strict report is strict too
        load_mmeb_train(file, image_dir, report=DataReport(strict=True))


def test_image_dir_none_is_the_files_folder(tmp_path, image_dir):
    file = write_jsonl(image_dir / "S.jsonl", [mmeb_row()])
    (example,) = load_mmeb_train(file, None)
    assert example.query.image == str(image_dir / "a.jpg")


def test_load_image(image_dir):
    image = load_image(image_dir / "a.jpg")
    assert image.mode == "RGB" and image.size == (8, 8)
    Image.new("L", (4, 4)).save(image_dir / "grey.png")
    assert load_image(image_dir / "grey.png").mode == "RGB"
    with pytest.raises(BadImageError, match="missing image") as err:
        load_image(image_dir / "gone.jpg")
    assert err.value.reason == "missing image" and err.value.path.endswith("gone.jpg")
    with pytest.raises(BadImageError, match="corrupt image") as err:
        load_image(image_dir / "corrupt.jpg")
    assert err.value.reason == "corrupt image" and err.value.detail
    assert pickle.loads(pickle.dumps(err.value)).path == err.value.path


def write_csv(path, text):
    path.write_text(text)
    return path


def test_nli_triplets(tmp_path):
    path = write_csv(tmp_path / "nli.csv", 'sent0,sent1,hard_neg\na,b,c\n"x, y",z,\n,q,r\ns,,t\n')
    report = DataReport()
    examples = load_nli_triplets(path, report=report)
    assert [(e.query.text, e.positive.text, [n.text for n in e.negatives], e.row) for e in examples] == [
        ("a", "b", ["c"], 0),
        ("x, y", "z", [], 1),
    ]
    assert examples[0].subset == "nli" and examples[0].query.image is None
    assert report.counts == {"empty query": 1, "empty positive": 1} and report.rows == {str(path): 4}
    with pytest.raises(BadRowError, match=r"nli\.csv, row 2: empty query"):
        load_nli_triplets(path, strict=True)


def test_nli_malformed(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['hard_neg'\]"):
        load_nli_triplets(write_csv(tmp_path / "a.csv", "sent0,sent1\na,b\n"))
    with pytest.raises(ValueError, match="row 1 does not have the header's 3 fields"):
        load_nli_triplets(write_csv(tmp_path / "b.csv", "sent0,sent1,hard_neg\na,b,c\na,b\n"))
    with pytest.raises(ValueError, match="row 0 does not have"):
        load_nli_triplets(write_csv(tmp_path / "c.csv", "sent0,sent1,hard_neg\na,b,c,d\n"))


def test_report_counts_keeps_first_offenders_and_merges():
    report = DataReport(keep=2)
    for row in range(4):
        report.skip("f.jsonl", row, "missing image", f"/img/{row}.jpg")
    report.skip("g.csv", 9, "empty query")
    report.read("f.jsonl", 100)
    assert report.counts == {"missing image": 4, "empty query": 1} and report.total == 5
    assert [b.row for b in report.offenders["missing image"]] == [0, 1]
    other = DataReport(keep=2)
    other.skip("h.jsonl", 3, "missing image", "/img/x.jpg")
    other.skip("h.jsonl", 4, "corrupt image", "/img/y.jpg")
    other.read("h.jsonl", 10)
    report.merge(other)
    assert report.counts == {"missing image": 5, "empty query": 1, "corrupt image": 1}
    assert [b.row for b in report.offenders["missing image"]] == [0, 1]  # still the first two
    assert report.rows == {"f.jsonl": 100, "h.jsonl": 10} and report.rows_read == 110
    summary = report.summary()
    assert "110 rows read from 2 files, 7 skipped (6.36%)" in summary
    assert "missing image: 5, first: f.jsonl row 0 (/img/0.jpg); f.jsonl row 1 (/img/1.jpg)" in summary
    assert "corrupt image: 1" in summary and "empty query: 1" in summary
    restored = DataReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert restored == report and pickle.loads(pickle.dumps(report)) == report
    merged = DataReport(keep=2)
    merged.merge(report.to_dict())  # a dict, as all_gather_object hands back
    assert merged.counts == report.counts
    assert DataReport().summary() == "data: 0 rows read from 0 files, none skipped"


def test_report_strict_skip_raises():
    with pytest.raises(BadRowError, match="f, row 3: missing image: /x.jpg"):
        DataReport(strict=True).skip("f", 3, "missing image", "/x.jpg")
    report = DataReport()
    with pytest.raises(BadRowError):
        report.skip("f", 3, "empty query", strict=True)
    assert report.total == 0


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_teacher_round_trip(tmp_path, suffix):
    query, positive = torch.randn(5, 3), torch.randn(5, 3)
    path = save_teacher(tmp_path / f"t{suffix}", query, positive)
    teacher = load_teacher(path, 5)
    assert len(teacher) == 5 and teacher.dim == 3
    assert torch.equal(teacher.query, query) and torch.equal(teacher.positive, positive)
    with pytest.raises(ValueError, match=rf"t{suffix}.*n = 4 rows"):
        load_teacher(path, 4)


def test_teacher_layout_errors(tmp_path):
    from safetensors.torch import save_file

    np.save(tmp_path / "flat.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"flat\.npy.*\[n, 2, Dt\].*\(4, 3\)"):
        load_teacher(tmp_path / "flat.npy", 4)
    np.save(tmp_path / "int.npy", np.zeros((4, 2, 3), np.int64))
    with pytest.raises(ValueError, match="floating point"):
        load_teacher(tmp_path / "int.npy", 4)
    bad = np.zeros((4, 2, 3), np.float32)
    bad[2, 1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="non-finite teacher embedding at row 2"):
        load_teacher(tmp_path / "nan.npy", 4)
    save_file({"embeddings": torch.zeros(4, 3)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ValueError, match=r"keys\.safetensors.*'query' and 'positive'.*embeddings"):
        load_teacher(tmp_path / "keys.safetensors", 4)
    save_file({"query": torch.zeros(4, 3), "positive": torch.zeros(4, 2)}, str(tmp_path / "dims.safetensors"))
    with pytest.raises(ValueError, match=r"dims\.safetensors.*\(4, 3\) and \(4, 2\)"):
        load_teacher(tmp_path / "dims.safetensors", 4)
    with pytest.raises(FileNotFoundError, match="gone.npy"):
        load_teacher(tmp_path / "gone.npy", 4)
    (tmp_path / "t.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors or \.npy"):
        load_teacher(tmp_path / "t.pt", 4)
    with pytest.raises(ValueError, match=r"\[n, Dt\]"):
        save_teacher(tmp_path / "x.npy", torch.zeros(3), torch.zeros(3))


def test_teacher_rows_follow_data_rows_through_skips(tmp_path):
    csv = write_csv(tmp_path / "nli.csv", "sent0,sent1,hard_neg\na,b,c\n,skipped,x\nd,e,f\n")
    save_teacher(tmp_path / "t.safetensors", torch.arange(3.0)[:, None] * torch.ones(1, 2), -torch.ones(3, 2))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"nli": {"path": "nli.csv", "teacher": "t.safetensors"}}))
    report = DataReport()
    data = load_data(spec, report=report)
    assert [e.teacher for e in data.dataset] == [0, 2] and report.counts == {"empty query": 1}
    query, positive = data.dataset.teacher.rows(list(data.dataset))
    assert query[:, 0].tolist() == [0.0, 2.0] and positive.shape == (2, 2)
    with pytest.raises(ValueError, match="no teacher row"):
        data.dataset.teacher.rows([data.dataset[0].__class__(**{**data.dataset[0].__dict__, "teacher": None})])
    with pytest.raises(ValueError, match="teacher row None"):
        EmbeddingDataset(load_nli_triplets(csv), data.dataset.teacher)
    save_teacher(tmp_path / "t.safetensors", torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="n = 3 rows"):
        load_data(spec)


def test_data_spec_list_folder_and_file(tmp_path, image_dir):
    write_jsonl(tmp_path / "A.jsonl", [mmeb_row(), mmeb_row(qry_image="gone.jpg")])
    (tmp_path / "B").mkdir()
    pq.write_table(pa.Table.from_pylist([mmeb_row()] * 3), tmp_path / "B" / "original-00000-of-00001.parquet")
    pq.write_table(
        pa.Table.from_pylist([mmeb_row()] * 2), tmp_path / "B" / "diverse_instruction-00000-of-00001.parquet"
    )
    write_csv(tmp_path / "nli.csv", "sent0,sent1,hard_neg\na,b,c\n")
    sources = parse_data_spec([tmp_path / "A.jsonl", tmp_path / "B", tmp_path / "nli.csv"], image_dir=image_dir)
    # B's two instruction splits are never merged: the original split only (issue 19).
    assert [(s.name, len(s.paths), s.format, s.weight) for s in sources] == [
        ("A", 1, "mmeb", None),
        ("B", 1, "mmeb", None),
        ("nli", 1, "nli", None),
    ]
    report = DataReport()
    data = load_data(sources, report=report)
    assert data.mixture.names == ("A", "B", "nli") and data.mixture.sizes == (1, 3, 1)
    assert data.mixture.weights is None and report.counts == {"missing image": 1}
    assert data.dataset.teacher is None and len(data.dataset) == 5
    assert [data.mixture[i].subset for i in range(5)] == ["A"] + ["B"] * 3 + ["nli"]


def test_data_spec_yaml_weights_and_errors(tmp_path, image_dir):
    write_jsonl(image_dir / "A.jsonl", [mmeb_row()] * 4)
    write_jsonl(image_dir / "B.jsonl", [mmeb_row()] * 2)
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        f"first:\n  path: {image_dir.name}/A.jsonl\n  weight: 3\n  image_dir: {image_dir.name}\nsecond: img/B.jsonl\n"
    )
    sources = parse_data_spec(spec, image_dir=image_dir)
    assert [(s.name, s.weight, s.image_dir) for s in sources] == [
        ("first", 3.0, image_dir),
        ("second", None, image_dir),
    ]
    data = load_data(spec, image_dir=image_dir)
    assert data.mixture.names == ("first", "second") and data.mixture.weights == (0.75, 0.25)
    for text, error in [
        ("a:\n  path: img/A.jsonl\n  wieght: 2\n", "unknown key"),
        ("a:\n  weight: 2\n", "needs a 'path'"),
        ("a:\n  path: img/A.jsonl\n  weight: -1\n", "'weight' must be a number"),
        ("a:\n  path: img/A.txt\n", "not a data file"),
        ("[1, 2]\n", "non-empty mapping"),
        ("\n", "non-empty mapping"),
        ("a: [img/A.jsonl\n", "is not valid YAML"),
    ]:
        spec.write_text(text)
        with pytest.raises(ValueError, match=error) as err:
            parse_data_spec(spec)
        assert str(spec) in str(err.value) or error == "not a data file"
    broken_json = tmp_path / "mix.json"
    broken_json.write_text('{"a": "img/A.jsonl",}')
    with pytest.raises(ValueError, match="mix.json is not valid JSON"):
        parse_data_spec(broken_json)
    spec.write_text("a: img/A.jsonl\n")
    with pytest.raises(ValueError, match="given alone"):
        parse_data_spec([spec, image_dir / "A.jsonl"])
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        parse_data_spec(tmp_path / "nothing.jsonl")
    with pytest.raises(ValueError, match="exactly one subset"):
        parse_data_spec([image_dir / "A.jsonl", image_dir / "B.jsonl"], teacher=tmp_path / "t.npy")
    write_jsonl(image_dir / "C.jsonl", [mmeb_row(qry_image="gone.jpg")])
    with pytest.raises(ValueError, match="'C' has no usable row\ndata: 1 rows read from 1 file, 1 skipped"):
        load_data([image_dir / "C.jsonl"], image_dir=image_dir)

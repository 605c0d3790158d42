"""The `<|image_1|>` rule, written once in `mmfast.train.placeholder`: the training loader (by column, and
its negatives row by row), the MMEB evaluator and `placeholder_problem` name the same reason for a text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmfast.train.data import load_mmeb_train
from mmfast.train.data_report import DataReport
from mmfast.train.evaluate import evaluate_mmeb
from mmfast.train.placeholder import placeholder_problem, placeholder_problems
from tests.train.evaluate_helpers import FakeEncoder, write_parquet

SEVERAL, WITHOUT = "several <|image_1|> in one {what}", "<|image_1|> without an image"
CASES = [  # (text, has_image, the reason or None)
    ("<|image_1|> and <|image_1|> a cat", False, SEVERAL),
    ("<|image_1|><|image_1|><|image_1|>", False, SEVERAL),
    ("<|image_1|> and <|image_1|> a cat", True, SEVERAL),
    ("<|image_1|> a cat", False, WITHOUT),
    ("a cat <|image_1|>", False, WITHOUT),
    ("a cat", True, None),
    ("<|image_1|> a cat", True, None),
    ("a cat", False, None),
    ("<|image_1 a cat", False, None),
]
IDS = ["two-no-image", "three-no-image", "two-with-image", "one-no-image", "one-at-end-no-image", "none-with-image",
       "one-with-image", "none-no-image", "broken-marker"]  # fmt: skip


def expected(reason: str | None, what: str) -> str | None:
    return None if reason is None else reason.format(what=what)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "q.jpg")
    return folder


def loader_reason(tmp_path, images, row: dict) -> str | None:
    file = tmp_path / "train.jsonl"
    file.write_text(json.dumps(row) + "\n")
    report = DataReport()
    load_mmeb_train(file, images, report=report)
    assert sum(report.counts.values()) <= 1
    return next(iter(report.counts), None)


def evaluator_reason(tmp_path, images, text: str, has_image: bool) -> str | None:
    row = {"qry_text": text, "qry_img_path": "q.jpg" if has_image else "", "tgt_text": ["a", "b"],
           "tgt_img_path": ["", ""]}  # fmt: skip
    write_parquet(tmp_path / "mmeb" / "Custom" / "test-00000-of-00001.parquet", [row])
    scores = evaluate_mmeb(FakeEncoder(), tmp_path / "mmeb", images, show_progress=False)
    malformed = scores["mmeb"]["datasets"]["Custom"]["num_malformed_rows"]
    try:
        evaluate_mmeb(FakeEncoder(), tmp_path / "mmeb", images, strict=True, show_progress=False)
    except ValueError as error:
        prefix = "MMEB dataset Custom row 0: "
        assert str(error).startswith(prefix) and malformed == 1
        return str(error).removeprefix(prefix)
    assert malformed == 0
    return None


@pytest.mark.parametrize("text, has_image, reason", CASES, ids=IDS)
def test_loader_evaluator_and_rule_agree_on_the_query(tmp_path, images, text, has_image, reason):
    row = {"qry": text, "qry_image_path": "q.jpg" if has_image else "", "pos_text": "cat", "pos_image_path": ""}
    named = {
        "placeholder_problem": placeholder_problem(text, has_image, "query"),
        "training loader": loader_reason(tmp_path, images, row),
        "evaluator": evaluator_reason(tmp_path, images, text, has_image),
    }
    assert named == dict.fromkeys(named, expected(reason, "query"))


@pytest.mark.parametrize("text, has_image, reason", CASES, ids=IDS)
def test_loader_positive_and_negative_follow_the_rule(tmp_path, images, text, has_image, reason):
    """The positive is checked by column, the negatives row by row: both as the rule says."""
    image = "q.jpg" if has_image else ""
    plain = {"qry": "a query", "qry_image_path": "", "pos_text": "cat", "pos_image_path": ""}
    positive = {**plain, "pos_text": text, "pos_image_path": image}
    negative = {**plain, "neg_text": ["fine", text], "neg_image_path": ["", image]}
    assert loader_reason(tmp_path, images, positive) == placeholder_problem(text, has_image, "positive")
    assert loader_reason(tmp_path, images, negative) == placeholder_problem(text, has_image, "negative")
    assert placeholder_problem(text, has_image, "positive") == expected(reason, "positive")


def test_by_column_matches_one_text_at_a_time():
    texts, has_image = [t for t, _, _ in CASES], np.array([h for _, h, _ in CASES])
    count = np.array([t.count("<|image_1|>") for t in texts])
    named = [None] * len(texts)
    for rows, reason in placeholder_problems(count, has_image, "query"):
        for i in np.flatnonzero(rows):
            assert named[i] is None  # each row under one reason
            named[i] = reason
    assert named == [placeholder_problem(t, h, "query") for t, h in zip(texts, has_image, strict=True)]
    assert named == [expected(r, "query") for _, _, r in CASES]

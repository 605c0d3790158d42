"""MMEB-V2 (issue 19): V2's ranking metrics, its score files beside V1's, and its image-task text
(`qry_inst`/`tgt_inst`, the prompt assembled per dataset as VLM2Vec V2 does), with a fake encoder.

The V2 files are written in the published layout of `ziyjiang/MMEB_Test_Instruct`:
`<root>/<Dataset>/test-00000-of-00001.parquet` with qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text,
tgt_img_path. Images are identified by their width (see evaluate_helpers).
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from mmfast.train.evaluate import evaluate_mmeb
from mmfast.train.evaluate.mmeb_v2_metrics import KS, METRICS, mean_metrics, query_metrics
from mmfast.train.evaluate.mmeb_v2_prompts import DATASET_RULES, assemble
from tests.train.evaluate_helpers import FakeEncoder, axis, make_image, unit, write_mmeb, write_parquet

QUIET = {"show_progress": False}
V2_KEYS = [f"{metric}@{k}" for metric in METRICS for k in KS] + ["num_pred", "num_data"]


# ------------------------------------------------------------------------------------------ metrics


def test_query_metrics_single_answer_by_hand():
    scores = query_metrics(["a", "b", "c", "d"], ["b"])
    assert scores["hit@1"] == 0 and scores["hit@5"] == 1 and scores["precision@5"] == pytest.approx(0.2)
    assert scores["recall@1"] == 0 and scores["recall@5"] == 1 and scores["f1@5"] == pytest.approx(1 / 3)
    assert scores["ndcg_linear@5"] == pytest.approx(1 / math.log2(3)) == scores["ndcg_exponential@5"]
    assert scores["map@5"] == scores["mrr@5"] == 0.5 and scores["map@1"] == scores["mrr@1"] == 0
    assert scores["precision@10"] == pytest.approx(0.1)  # over k, even with 4 candidates, as V2 divides


def test_query_metrics_graded_and_several_answers():
    scores = query_metrics(["x", "y", "z"], {"y": 2, "z": 1})
    ideal = 2 + 1 / math.log2(3)
    assert scores["ndcg_linear@5"] == pytest.approx((2 / math.log2(3) + 1 / 2) / ideal)
    ideal_exp = 3 + 1 / math.log2(3)
    assert scores["ndcg_exponential@5"] == pytest.approx((3 / math.log2(3) + 1 / 2) / ideal_exp)
    assert scores["recall@1"] == 0 and scores["recall@5"] == 1 and scores["precision@5"] == pytest.approx(0.4)
    assert scores["map@5"] == pytest.approx((1 / 2 + 2 / 3) / 2) and scores["mrr@5"] == 0.5
    assert scores["map@1"] == 0


def test_query_metrics_unranked_query_scores_zero_and_duplicates_count_as_v2():
    assert all(value == 0 for value in query_metrics([], ["a"]).values())
    doubled = query_metrics(["a", "a", "b"], ["a"])  # one item listed twice counts twice in DCG and AP
    assert doubled["precision@5"] == pytest.approx(0.2) and doubled["ndcg_linear@5"] > 1 and doubled["map@5"] == 2
    body = mean_metrics([query_metrics(["a"], ["a"]), query_metrics([], ["a"])], 2)
    assert list(body) == V2_KEYS and body["hit@1"] == 0.5 and body["num_pred"] == body["num_data"] == 2


# ------------------------------------------------------------------------------------ prompt rules

INST = {
    "ImageNet-1K": ("<|image_1|>\nRepresent the given image for classification", ""),
    "OK-VQA": ("<|image_1|>\nRepresent the given image with the following question:", ""),
    "VisDial": ("", "<|image_1|>\nRepresent the given image."),
    "WebQA": ("", "<|image_1|>\nRepresent the given Wikipedia image with related text information:"),
    "CIRR": ("<|image_1|>\nGiven an image, find a similar everyday image with the described changes:",
             "<|image_1|>\nRepresent the given image."),
    "MSCOCO_i2t": ("<|image_1|>\nFind an image caption describing the given everyday image.", ""),
}  # fmt: skip


def test_each_rule_builds_v2s_text():
    def row(dataset, qry_text, tgt_text, tgt_img_path, qry_inst=None, qry_img="q10.jpg"):
        qry, tgt = INST[dataset]
        return {"qry_inst": qry if qry_inst is None else qry_inst, "qry_text": qry_text, "qry_img_path": qry_img,
                "tgt_inst": tgt, "tgt_text": tgt_text, "tgt_img_path": tgt_img_path}  # fmt: skip

    marker = "<|image_1|>"
    query, targets = assemble("image_cls", row("ImageNet-1K", "", ["cat", "dog"], ["", ""]), "ImageNet-1K")
    assert query == (f"{marker}\nRepresent the given image for classification\n", "q10.jpg")
    assert targets == [("cat", None), ("dog", None)]
    query, _ = assemble("image_qa", row("OK-VQA", "What is it?", ["a"], [""]), "OK-VQA")
    assert query[0] == f"{marker}\nRepresent the given image with the following question: What is it?\n"
    dialogue = "Represent the given dialogue about an image, which is used for image retrieval:"
    visdial = row("VisDial", "Q: a A: b", ["", ""], ["i1.jpg", "i2.jpg"], qry_inst=dialogue)
    query, targets = assemble("image_t2i", visdial, "VisDial")
    assert query == (
        "Represent the given dialogue about an image, which is used for image retrieval: Q: a A: b\n\n",
        None,
    )
    assert targets == [
        (f"{marker}\nRepresent the given image.\n", "i1.jpg"),
        (f"{marker}\nRepresent the given image.\n", "i2.jpg"),
    ]
    webqa = row("WebQA", "who?", ["cap a", "cap b"], ["i1.jpg", "i2.jpg"], qry_inst="Find a Wikipedia image:")
    query, targets = assemble("image_t2i", webqa, "WebQA")
    assert query == ("Find a Wikipedia image: who?\n", None)
    info = "Represent the given Wikipedia image with related text information:"
    assert targets == [(f"{marker}\n{info} cap a\n", "i1.jpg"), (f"{marker}\n{info} cap b\n", "i2.jpg")]
    query, targets = assemble("image_i2i_vg", row("CIRR", "make it red", ["", ""], ["i1.jpg", "i2.jpg"]), "CIRR")
    assert (
        query[0] == f"{marker}\nGiven an image, find a similar everyday image with the described changes: make it red\n"
    )
    assert targets[0] == (f"{marker}\nRepresent the given image.", "i1.jpg")  # no closing newline, as V2
    query, _ = assemble("image_i2t", row("MSCOCO_i2t", "", ["a cat"], [""]), "MSCOCO_i2t")
    assert query[0] == f"{marker}\nFind an image caption describing the given everyday image.\n"
    assert len(DATASET_RULES) == 36


# ------------------------------------------------------------------------------------- end to end


def write_v2(root):
    """Three V2 datasets in MMEB_Test_Instruct's layout; returns the fake encoder's vector table."""
    images = root / "images"
    for width in (10, 11, 12, 20, 21):
        make_image(images / f"q{width}.jpg", width)
    cls = [
        {"qry_inst": INST["ImageNet-1K"][0], "qry_text": "", "qry_img_path": f"q{w}.jpg", "tgt_inst": "",
         "tgt_text": ["cat", "dog", "fish"], "tgt_img_path": ["", "", ""], "answer": "cat"}
        for w in (10, 11, 12)
    ]  # fmt: skip
    write_parquet(root / "ImageNet-1K" / "test-00000-of-00001.parquet", cls)
    visdial = [
        {"qry_inst": "Represent the dialogue:", "qry_text": f"dialogue {i}", "qry_img_path": "",
         "tgt_inst": INST["VisDial"][1], "tgt_text": ["", ""], "tgt_img_path": [f"q{20 + i}.jpg", f"q{21 - i}.jpg"]}
        for i in (0, 1)
    ]  # fmt: skip
    write_parquet(root / "VisDial" / "test-00000-of-00001.parquet", visdial)
    own = [{"qry_inst": "<|image_1|>\nWhat is it?", "qry_text": "", "qry_img_path": "q10.jpg", "tgt_inst": "",
            "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}]  # fmt: skip
    write_parquet(root / "MyQA" / "test-00000-of-00001.parquet", own)
    (root / "mmeb_subsets.json").write_text('{"MyQA": {"meta_task": "vqa", "split": "ood", "v2_prompt": "image_qa"}}')
    return {
        # ImageNet-1K: the ground truth "cat" ranks 1st, 2nd and 3rd.
        ("image", 10): axis(0), ("image", 11): axis(1), ("image", 12): unit(-1, 0, 1, 0, 0, 0),
        "cat": axis(0), "dog": axis(1), "fish": axis(2),
        # VisDial: both dialogues find their first candidate.
        "Represent the dialogue: dialogue 0\n\n": axis(3), "Represent the dialogue: dialogue 1\n\n": axis(4),
        ("image", 20): axis(3), ("image", 21): axis(4),
    }  # fmt: skip


def test_v2_layout_scores_and_score_files(tmp_path, caplog):
    vectors = write_v2(tmp_path / "v2")
    encoder = FakeEncoder(vectors)
    out = tmp_path / "exp"
    with caplog.at_level(logging.WARNING):
        mmeb = evaluate_mmeb(encoder, tmp_path / "v2", tmp_path / "v2" / "images", output_dir=out, **QUIET)["mmeb"]
    imagenet, visdial = mmeb["datasets"]["ImageNet-1K"], mmeb["datasets"]["VisDial"]
    assert imagenet["layout"] == visdial["layout"] == "v2"
    assert imagenet["acc"] == pytest.approx(100 / 3) and visdial["acc"] == 100.0
    # The texts the encoder saw are V2's, the candidates' images are read for VisDial only.
    seen = set(encoder.inputs)
    assert ("<|image_1|>\nRepresent the given image for classification\n", 10) in seen
    assert ("<|image_1|>\nRepresent the given image.\n", 20) in seen and ("cat", None) in seen
    assert ("<|image_1|>\nWhat is it?\n", 10) in seen  # MyQA under the sidecar's image_qa rule
    # The unused "answer" column is named, in the results and in a warning.
    assert imagenet["columns_not_read"] == ["answer"] and visdial["columns_not_read"] == []
    assert "ImageNet-1K: column(s) answer not read" in caplog.text

    # V2's file, where report_score_v2.py looks (<exp>/image/<Dataset>_score.json), with V1's keys too.
    v2 = json.loads((out / "image" / "ImageNet-1K_score.json").read_text())
    assert list(v2) == [*V2_KEYS, "acc", "num_correct"]
    expected = {
        "hit@1": 1 / 3, "hit@5": 1.0, "hit@10": 1.0, "precision@1": 1 / 3, "precision@5": 0.2, "precision@10": 0.1,
        "recall@1": 1 / 3, "recall@5": 1.0, "ndcg_linear@1": 1 / 3, "f1@1": 1 / 3, "f1@5": 1 / 3,
        "ndcg_linear@5": (1 + 1 / math.log2(3) + 1 / 2) / 3, "map@5": (1 + 1 / 2 + 1 / 3) / 3,
        "mrr@10": (1 + 1 / 2 + 1 / 3) / 3, "num_pred": 3, "num_data": 3, "acc": 1 / 3, "num_correct": 1,
    }  # fmt: skip
    assert {key: v2[key] for key in expected} == pytest.approx(expected)
    assert v2["ndcg_exponential@5"] == pytest.approx(v2["ndcg_linear@5"])  # binary relevance: the same gains
    visdial_v2 = json.loads((out / "image" / "VisDial_score.json").read_text())
    assert visdial_v2["hit@1"] == 1.0 and visdial_v2["acc"] == 1.0
    # V1's file stays as it was, where report_score.py looks.
    assert json.loads((out / "ImageNet-1K_score.json").read_text()) == {"acc": 1 / 3, "num_correct": 1, "num_pred": 3}
    assert v2["hit@1"] == v2["acc"]  # hit@1 is V1's accuracy: the ground truth wins ties in both


def test_v1_layout_also_gets_v2_files_with_equal_hit_at_1(tmp_path):
    vectors = write_mmeb(tmp_path / "mmeb")
    evaluate_mmeb(FakeEncoder(vectors), tmp_path / "mmeb", tmp_path / "mmeb" / "images", output_dir=tmp_path / "o",
                  **QUIET)  # fmt: skip
    for name in ("ImageNet-1K", "MyRetrieval", "Mystery"):
        v2 = json.loads((tmp_path / "o" / "image" / f"{name}_score.json").read_text())
        assert v2["hit@1"] == v2["acc"] and v2["num_pred"] == v2["num_data"]
    assert json.loads((tmp_path / "o" / "image" / "ImageNet-1K_score.json").read_text())["hit@1"] == 0.75


def test_missing_image_rows_are_misses_in_v2_scores(tmp_path):
    vectors = write_v2(tmp_path / "v2")
    (tmp_path / "v2" / "images" / "q10.jpg").unlink()
    evaluate_mmeb(FakeEncoder(vectors), tmp_path / "v2", tmp_path / "v2" / "images", output_dir=tmp_path / "o",
                  subsets=["ImageNet-1K"], **QUIET)  # fmt: skip
    v2 = json.loads((tmp_path / "o" / "image" / "ImageNet-1K_score.json").read_text())
    assert v2["hit@1"] == 0 and v2["hit@5"] == pytest.approx(2 / 3) and v2["num_pred"] == 3


def test_v2_errors_name_the_dataset(tmp_path):
    write_v2(tmp_path / "v2")
    (tmp_path / "v2" / "mmeb_subsets.json").write_text('{"MyQA": {"meta_task": "vqa", "split": "ood"}}')
    with pytest.raises(ValueError, match="MMEB dataset MyQA: a V2 file .* give its prompt rule as 'v2_prompt'"):
        evaluate_mmeb(FakeEncoder(), tmp_path / "v2", tmp_path / "v2" / "images", **QUIET)
    (tmp_path / "v2" / "mmeb_subsets.json").write_text('{"MyQA": {"meta_task": "vqa", "v2_prompt": "qa"}}')
    with pytest.raises(ValueError, match="subset 'MyQA' v2_prompt must be one of"):
        evaluate_mmeb(FakeEncoder(), tmp_path / "v2", tmp_path / "v2" / "images", **QUIET)
    rows = [{"qry_inst": "x", "qry_text": "", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": ["q20.jpg"]}]
    write_parquet(tmp_path / "v3" / "VisDial" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(ValueError, match="VisDial: V2's image_t2i rule needs the column tgt_inst"):
        evaluate_mmeb(FakeEncoder(), tmp_path / "v3", tmp_path / "v2" / "images", **QUIET)

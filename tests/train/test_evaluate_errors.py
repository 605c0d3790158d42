"""Every bad-input path of the evaluators: counted and reported, or an error naming file, row, column."""

from __future__ import annotations

import json

import pytest

from mmfast.train.evaluate import evaluate_mmeb, evaluate_retrieval, evaluate_sugarcrepe, evaluate_video
from mmfast.train.evaluate import video as video_module
from tests.train.evaluate_helpers import (
    PLAIN,
    FakeEncoder,
    caption_records,
    make_image,
    write_mmeb,
    write_msrvtt,
    write_parquet,
    write_sugarcrepe,
)

QUIET = {"show_progress": False}
ROW = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}


def mmeb_subset(tmp_path, rows, name="Custom"):
    write_parquet(tmp_path / name / "test-00000-of-00001.parquet", rows)
    return tmp_path


def test_mmeb_missing_image_is_a_counted_miss_or_strict_error(tmp_path):
    encoder = FakeEncoder(write_mmeb(tmp_path))
    (tmp_path / "images" / "q10.jpg").unlink()  # ImageNet-1K row 0's query image (a correct row)
    (tmp_path / "images" / "q15.jpg").write_bytes(b"not an image")  # a candidate of both MyRetrieval rows
    result = evaluate_mmeb(encoder, tmp_path, tmp_path / "images", **QUIET)["mmeb"]["datasets"]
    imagenet, custom = result["ImageNet-1K"], result["MyRetrieval"]
    assert (imagenet["num_pred"], imagenet["num_missing_image_rows"], imagenet["num_missing_images"]) == (4, 1, 1)
    assert "q10.jpg (is missing)" in imagenet["missing_image_examples"][0]
    assert (custom["num_pred"], custom["num_correct"], custom["num_missing_image_rows"]) == (2, 0, 2)
    assert "q15.jpg (is unreadable" in custom["missing_image_examples"][0]
    with pytest.raises(FileNotFoundError, match="MMEB dataset ImageNet-1K row 0: image .*q10.jpg is missing"):
        evaluate_mmeb(encoder, tmp_path, tmp_path / "images", strict=True, **QUIET)


@pytest.mark.parametrize(
    "row, message",
    [
        ({**ROW, "tgt_text": [], "tgt_img_path": []}, "MMEB dataset Custom row 1: empty candidate list"),
        ({**ROW, "tgt_img_path": [""]}, "MMEB dataset Custom row 1: ragged candidates: 2 tgt_text but 1 tgt_img_path"),
        ({**ROW, "qry_text": None}, "MMEB dataset Custom row 1: qry_text must be a string"),
        ({**ROW, "tgt_text": ["a", None]}, "MMEB dataset Custom row 1: tgt_text entries must be strings"),
    ],
    ids=["empty", "ragged", "null-query", "null-candidate"],
)
def test_mmeb_bad_rows_name_dataset_and_row(tmp_path, row, message):
    root = mmeb_subset(tmp_path, [ROW, row])
    with pytest.raises(ValueError, match=message):
        evaluate_mmeb(FakeEncoder(), root, **QUIET)


def test_mmeb_bad_files_name_file_and_column(tmp_path):
    path = write_parquet(tmp_path / "A" / "test-00000-of-00001.parquet", [{"qry_text": "q", "qry_img_path": ""}])
    with pytest.raises(ValueError, match=f"{path}: missing column 'tgt_text'"):
        evaluate_mmeb(FakeEncoder(), tmp_path, **QUIET)
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=f"{path}: not a readable parquet file"):
        evaluate_mmeb(FakeEncoder(), tmp_path, **QUIET)
    with pytest.raises(FileNotFoundError, match="MMEB subset 'B': no test-\\*.parquet"):
        evaluate_mmeb(FakeEncoder(), tmp_path, subsets=["B"], **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <Subset>/test-\\*.parquet under MMEB root"):
        evaluate_mmeb(FakeEncoder(), tmp_path / "empty", **QUIET)


def test_mmeb_subset_metadata_errors(tmp_path):
    root = mmeb_subset(tmp_path, [ROW])
    with pytest.raises(ValueError, match="subset_info: subset 'Custom' needs meta_task"):
        evaluate_mmeb(FakeEncoder(), root, subset_info={"Custom": {"meta_task": "ranking"}}, **QUIET)
    (root / "mmeb_subsets.json").write_text('{"Custom": {"meta_task": "vqa", "split": "test"}}')
    with pytest.raises(ValueError, match="mmeb_subsets.json: subset 'Custom' split must be"):
        evaluate_mmeb(FakeEncoder(), root, **QUIET)
    (root / "mmeb_subsets.json").write_text("{not json")
    with pytest.raises(ValueError, match="mmeb_subsets.json: the file is not valid JSON"):
        evaluate_mmeb(FakeEncoder(), root, **QUIET)
    # The parameter wins over the sidecar.
    (root / "mmeb_subsets.json").write_text('{"Custom": {"meta_task": "vqa", "split": "ood"}}')
    result = evaluate_mmeb(FakeEncoder(), root, subset_info={"Custom": {"meta_task": "grounding"}}, **QUIET)["mmeb"]
    assert result["datasets"]["Custom"]["meta_task"] == "grounding" and "ood" not in result


def write_records(tmp_path, records, name="set.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "record, message",
    [
        ({"caption": ["x"]}, "row 1: no image column"),
        ({"image": "a.jpg"}, "row 1: no caption column"),
        ({"image": "a.jpg", "caption": []}, "row 1: column 'caption' holds an empty caption list"),
        ({"image": "a.jpg", "text": ["x", 3]}, "row 1: column 'text' must be a string or a list of strings"),
        ({"image": "", "caption": "x"}, "row 1: column 'image' is empty"),
        ({"image": "a.jpg", "conversations": [{"value": "hi"}]}, "row 1: column 'conversations' needs a second turn"),
    ],
    ids=["no-image", "no-caption", "empty-captions", "bad-caption", "empty-image", "sharegpt4v"],
)
def test_retrieval_bad_records_name_file_row_column(tmp_path, record, message):
    path = write_records(tmp_path, [{"image": "a.jpg", "caption": "fine"}, record])
    with pytest.raises(ValueError, match=f"{path} {message}"):
        evaluate_retrieval(FakeEncoder(), path, **QUIET)


def test_retrieval_bad_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        evaluate_retrieval(FakeEncoder(), tmp_path / "bad.jsonl", **QUIET)
    (tmp_path / "set.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        evaluate_retrieval(FakeEncoder(), tmp_path / "set.csv", **QUIET)
    with pytest.raises(FileNotFoundError, match="retrieval data .*nothing does not exist"):
        evaluate_retrieval(FakeEncoder(), tmp_path / "nothing", **QUIET)
    (tmp_path / "Urban1k" / "caption").mkdir(parents=True)
    (tmp_path / "Urban1k" / "image").mkdir()
    (tmp_path / "Urban1k" / "caption" / "x.txt").write_text("\nsecond line\n")
    with pytest.raises(ValueError, match="x.txt: the first line \\(the caption\\) is empty"):
        evaluate_retrieval(FakeEncoder(), tmp_path / "Urban1k", **QUIET)


def test_retrieval_missing_image_counted_or_strict(tmp_path):
    records, vectors = caption_records()
    for width in (20, 21):  # image 22 is missing
        make_image(tmp_path / "imgs" / f"{width}.jpg", width)
    path = write_records(tmp_path, records)
    metrics = evaluate_retrieval(FakeEncoder(vectors), path, text_prompt=PLAIN, **QUIET)["retrieval"]["set"]
    assert (metrics["num_images"], metrics["num_captions"], metrics["num_missing_images"]) == (3, 15, 1)
    assert metrics["t2i_R@10"] == pytest.approx(100 * 10 / 15) and metrics["i2t_R@10"] == pytest.approx(200 / 3)
    with pytest.raises(FileNotFoundError, match=f"{path} row 2: image .*22.jpg is missing"):
        evaluate_retrieval(FakeEncoder(vectors), path, strict=True, **QUIET)


def test_retrieval_unreadable_inline_image_is_counted(tmp_path):
    records, vectors = caption_records()
    good = make_image(tmp_path / "good.jpg", 20).read_bytes()
    rows = [
        {"image": {"bytes": good if i else b"broken", "path": f"{i}.jpg"}, "text": r["caption"]}
        for i, r in enumerate(records)
    ]
    path = write_parquet(tmp_path / "hf.parquet", rows)
    metrics = evaluate_retrieval(FakeEncoder(vectors), path, text_prompt=PLAIN, **QUIET)["retrieval"]["hf"]
    assert metrics["num_missing_images"] == 1 and "0.jpg" in metrics["missing_image_examples"][0]
    with pytest.raises(FileNotFoundError, match="row 0 column 'image'.* is unreadable"):
        evaluate_retrieval(FakeEncoder(vectors), path, strict=True, **QUIET)


def test_sugarcrepe_bad_inputs(tmp_path):
    vectors = write_sugarcrepe(tmp_path)
    folder, coco = tmp_path / "sugarcrepe", tmp_path / "coco"
    with pytest.raises(FileNotFoundError, match="coco/33.jpg is missing"):
        evaluate_sugarcrepe(FakeEncoder(vectors), folder, coco, files=("add_obj",), strict=True, **QUIET)
    with pytest.raises(FileNotFoundError, match="add_att.json, replace_obj.json.* not found"):
        evaluate_sugarcrepe(FakeEncoder(vectors), folder, coco, strict=True, **QUIET)
    with pytest.raises(FileNotFoundError, match="replace_rel.json not found"):
        evaluate_sugarcrepe(FakeEncoder(vectors), folder, coco, files=("add_obj", "replace_rel"), **QUIET)
    (folder / "add_obj.json").write_text(json.dumps({"0": {"filename": "30.jpg", "caption": "pos 0"}}))
    with pytest.raises(
        ValueError, match="add_obj.json entry '0': column 'negative_caption' must be a string, is missing"
    ):
        evaluate_sugarcrepe(FakeEncoder(vectors), folder, coco, **QUIET)
    (folder / "add_obj.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="add_obj.json: expected an object of entries"):
        evaluate_sugarcrepe(FakeEncoder(vectors), folder, coco, **QUIET)


def test_video_bad_inputs(tmp_path, monkeypatch):
    vectors = write_msrvtt(tmp_path)
    csv_path, videos = tmp_path / "MSRVTT_JSFUSION_test.csv", tmp_path / "videos"
    with pytest.raises(FileNotFoundError, match="video 'video2': neither a frame folder"):
        evaluate_video(FakeEncoder(vectors), csv_path, videos, strict=True, **QUIET)
    (videos / "video1" / "0001.png").write_bytes(b"broken")
    with pytest.raises(FileNotFoundError, match="video video1: image .*0001.png is unreadable"):
        evaluate_video(FakeEncoder(vectors), csv_path, videos, strict=True, **QUIET)
    metrics = evaluate_video(FakeEncoder(vectors), csv_path, videos, **QUIET)["video"]["MSRVTT_JSFUSION_test"]
    assert metrics["num_missing_videos"] == 2 and metrics["num_videos"] == 3
    (videos / "video2").mkdir()
    metrics = evaluate_video(FakeEncoder(vectors), csv_path, videos, **QUIET)["video"]["MSRVTT_JSFUSION_test"]
    assert any("holds no .jpg/.jpeg/.png frames" in m for m in metrics["missing_video_examples"])
    (videos / "video2").rmdir()
    (videos / "video2.mp4").write_bytes(b"not a video")
    if video_module.video_decoder() is not None:  # a damaged file is a counted missing video
        metrics = evaluate_video(FakeEncoder(vectors), csv_path, videos, **QUIET)["video"]["MSRVTT_JSFUSION_test"]
        assert any("video2.mp4 cannot be read with" in m for m in metrics["missing_video_examples"])
    monkeypatch.setattr(video_module, "video_decoder", lambda: None)
    with pytest.raises(RuntimeError, match="video2.mp4: reading video files needs decord or PyAV"):
        evaluate_video(FakeEncoder(vectors), csv_path, videos, **QUIET)
    bad = tmp_path / "bad.csv"
    bad.write_text("key,video_id,caption\nr0,video0,x\n")
    with pytest.raises(ValueError, match="bad.csv: missing column 'sentence'"):
        evaluate_video(FakeEncoder(vectors), bad, videos, **QUIET)
    bad.write_text("key,video_id,sentence\nr0,video0,x\nr1,video1,\n")
    with pytest.raises(ValueError, match="bad.csv line 3: column 'sentence' is empty"):
        evaluate_video(FakeEncoder(vectors), bad, videos, **QUIET)
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        evaluate_video(FakeEncoder(vectors), csv_path, videos, max_frames=0, **QUIET)


def test_mmeb_malformed_rows_are_counted_misses_or_strict_errors(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "q.jpg")
    two = {**ROW, "qry_text": "<|image_1|> <|image_1|> what is it", "qry_img_path": "q.jpg"}
    alone = {**ROW, "tgt_text": ["<|image_1|> a", "b"]}  # a placeholder without an image
    root = mmeb_subset(tmp_path, [ROW, two, alone])
    encoder = FakeEncoder()
    custom = evaluate_mmeb(encoder, root, tmp_path / "images", **QUIET)["mmeb"]["datasets"]["Custom"]
    assert (custom["num_pred"], custom["num_malformed_rows"], custom["num_missing_image_rows"]) == (3, 2, 0)
    assert custom["num_correct"] <= 1
    assert not any("<|image_1|>" in text for text, _ in encoder.inputs)  # never embedded
    with pytest.raises(ValueError, match=r"MMEB dataset Custom row 1: several <\|image_1\|> in one query"):
        evaluate_mmeb(encoder, root, tmp_path / "images", strict=True, **QUIET)


def test_retrieval_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="set.jsonl: line 2 is not UTF-8 text"):
        evaluate_retrieval(FakeEncoder(), path, **QUIET)

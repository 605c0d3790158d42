"""Each evaluation task end to end on tiny hand-written files, with a fake encoder."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from mmfast.train.evaluate import (
    evaluate,
    evaluate_mmeb,
    evaluate_retrieval,
    evaluate_sugarcrepe,
    evaluate_video,
    format_table,
    merge_results,
    write_results,
)
from mmfast.train.evaluate.inputs import CAPTION_PROMPT
from tests.train.evaluate_helpers import (
    PLAIN,
    FakeConfig,
    FakeEncoder,
    axis,
    caption_records,
    make_image,
    write_mmeb,
    write_msrvtt,
    write_parquet,
    write_sugarcrepe,
)

QUIET = {"show_progress": False}


def test_mmeb_end_to_end(tmp_path):
    encoder = FakeEncoder(write_mmeb(tmp_path / "mmeb"))
    part = evaluate_mmeb(encoder, tmp_path / "mmeb", tmp_path / "mmeb" / "images", output_dir=tmp_path / "out", **QUIET)
    mmeb = part["mmeb"]
    imagenet, custom, mystery = (mmeb["datasets"][name] for name in ("ImageNet-1K", "MyRetrieval", "Mystery"))
    assert (imagenet["acc"], imagenet["num_correct"], imagenet["num_pred"]) == (75.0, 3, 4)
    assert (imagenet["meta_task"], imagenet["split"]) == ("classification", "ind")
    assert (custom["acc"], custom["num_pred"], custom["meta_task"], custom["split"]) == (50.0, 2, "retrieval", "ood")
    assert mystery["meta_task"] is None and mmeb["unassigned"] == ["Mystery"]
    assert mmeb["meta_tasks"] == {
        "classification": {"acc": 75.0, "num_datasets": 1},
        "retrieval": {"acc": 50.0, "num_datasets": 1},
    }
    assert mmeb["overall"]["acc"] == pytest.approx((75 + 50 + mystery["acc"]) / 3)
    assert mmeb["ind"]["acc"] == 75.0 and mmeb["ood"]["acc"] == 50.0
    # VLM2Vec's own file: acc as a fraction.
    score = json.loads((tmp_path / "out" / "ImageNet-1K_score.json").read_text())
    assert score == {"acc": 0.75, "num_correct": 3, "num_pred": 4}
    # Each unique (text, image) input embedded once: "cat" is in three rows, embedded once.
    assert len(encoder.inputs) == len(set(encoder.inputs)) and ("cat", None) in encoder.inputs


def test_mmeb_second_run_embeds_nothing(tmp_path):
    vectors = write_mmeb(tmp_path / "mmeb")
    first = evaluate_mmeb(
        FakeEncoder(vectors), tmp_path / "mmeb", tmp_path / "mmeb/images", cache=tmp_path / "c", **QUIET
    )
    again = FakeEncoder(vectors)
    second = evaluate_mmeb(again, tmp_path / "mmeb", tmp_path / "mmeb/images", cache=tmp_path / "c", **QUIET)
    assert again.calls == 0 and second == first


def write_caption_set(tmp_path, fmt: str):
    records, vectors = caption_records()
    for width in (20, 21, 22):
        make_image(tmp_path / "imgs" / f"{width}.jpg", width)
    if fmt == "jsonl":
        path = tmp_path / "flickr30k_test.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:  # HF layout: `text` column, images inline as {"bytes", "path"}
        rows = [
            {"image": {"bytes": (tmp_path / r["image"]).read_bytes(), "path": r["image"]}, "text": r["caption"]}
            for r in records
        ]
        path = write_parquet(tmp_path / "hf" / "test-00000-of-00001.parquet", rows).parent
    return path, vectors


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_retrieval_five_captions(tmp_path, fmt):
    data, vectors = write_caption_set(tmp_path, fmt)
    part = evaluate_retrieval(FakeEncoder(vectors), data, name="flickr", text_prompt=PLAIN, **QUIET)
    metrics = part["retrieval"]["flickr"]
    # Caption 4 of image 2 ranks its image second; every image finds one of its captions first.
    assert metrics["t2i_R@1"] == pytest.approx(100 * 14 / 15) and metrics["t2i_R@5"] == 100.0
    assert (metrics["i2t_R@1"], metrics["i2t_R@10"], metrics["i2t_MnR"]) == (100.0, 100.0, 1.0)
    assert (metrics["num_images"], metrics["num_captions"], metrics["num_missing_images"]) == (3, 15, 0)


def test_retrieval_caption_limits_and_sharegpt4v(tmp_path):
    for width in (20, 21, 22):
        make_image(tmp_path / f"{width}.jpg", width)
    records = [
        {"image": "20.jpg", "captions": [f"c{j}" for j in range(7)]},  # COCO: some images have more than 5
        {"image": "21.jpg", "conversations": [{"from": "human", "value": "describe"}, {"value": "a long caption"}]},
        {"image": "22.jpg", "caption": "beyond the limit"},
    ]
    (tmp_path / "set.json").write_text(json.dumps(records))
    encoder = FakeEncoder()
    metrics = evaluate_retrieval(encoder, tmp_path / "set.json", text_prompt=PLAIN, limit=2, **QUIET)["retrieval"][
        "set"
    ]
    assert (metrics["num_images"], metrics["num_captions"]) == (2, 6)
    assert sorted(text for text, width in encoder.inputs if width is None) == [
        "a long caption",
        "c0",
        "c1",
        "c2",
        "c3",
        "c4",
    ]


def test_retrieval_urban1k_folder_with_a_missing_image(tmp_path):
    folder = tmp_path / "Urban1k"
    captions = {"a": "a red bus", "b": "a green tree", "c": "a blue sea"}
    for index, (key, caption) in enumerate(captions.items()):
        (folder / "caption").mkdir(parents=True, exist_ok=True)
        (folder / "caption" / f"{key}.txt").write_text(caption + "\nsecond line is ignored\n")
        if key != "c":
            make_image(folder / "image" / f"{key}.jpg", 60 + index)
    make_image(folder / "image" / "orphan.jpg", 70)
    vectors = {("image", 60): axis(0), ("image", 61): axis(1), "a red bus": axis(0), "a green tree": axis(1)}
    vectors["a blue sea"] = axis(0)  # its image is missing: a miss whatever it scores
    encoder = FakeEncoder(vectors)
    metrics = evaluate_retrieval(encoder, folder, text_prompt=PLAIN, **QUIET)["retrieval"]["Urban1k"]
    # text→image ranks [1, 1, 4 (missing: gallery + 1)]; image→text ranks [1, 1, 4]
    assert metrics["t2i_R@1"] == pytest.approx(200 / 3) and metrics["t2i_MnR"] == 2.0 and metrics["t2i_MdR"] == 1.0
    assert metrics["i2t_R@10"] == pytest.approx(200 / 3) and metrics["i2t_MnR"] == 2.0
    assert (metrics["num_images"], metrics["num_missing_images"], metrics["num_unpaired_images"]) == (3, 1, 1)
    assert "c.jpg (is missing)" in metrics["missing_image_examples"][0]
    # The default image prompt, MMEB's convention for where the image goes.
    assert ("<|image_1|>\nRepresent the given image.", 60) in encoder.inputs


def test_sugarcrepe_end_to_end(tmp_path):
    encoder = FakeEncoder(write_sugarcrepe(tmp_path))
    part = evaluate_sugarcrepe(encoder, tmp_path / "sugarcrepe", tmp_path / "coco", text_prompt=PLAIN, **QUIET)
    results = part["sugarcrepe"]["sugarcrepe"]
    assert results["add_obj"] == {
        "acc": 25.0, "num_correct": 1, "num_pred": 4, "num_missing_images": 1, "length_only_acc": 50.0,
        "missing_image_examples": [f"{tmp_path / 'coco' / '33.jpg'} (is missing)"],
    }  # fmt: skip
    assert (results["swap_att"]["acc"], results["swap_att"]["num_pred"]) == (100.0, 2)
    assert results["overall"] == {"acc": 50.0, "num_correct": 3, "num_pred": 6, "length_only_acc": 50.0}
    assert results["mean"] == {"acc": 62.5, "num_files": 2}
    assert results["files_not_found"] == ["add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj"]


def test_sugarcrepe_reports_a_blind_length_only_baseline(tmp_path):
    """The shorter caption called right (a tie half right), per file and pooled, in the table and the
    before/after comparison: where negatives are longer by construction it scores far above chance."""
    from mmfast.train.evaluate.compare import format_comparison
    from mmfast.train.evaluate.report import format_table

    encoder = FakeEncoder(write_sugarcrepe(tmp_path))
    folder = tmp_path / "sugarcrepe"
    longer = {"filename": "30.jpg", "caption": "a cat", "negative_caption": "a cat and a dog"}
    entries = {str(i): longer for i in range(3)}
    entries["3"] = {"filename": "30.jpg", "caption": "a cat on a mat", "negative_caption": "a dog"}
    (folder / "add_obj.json").write_text(json.dumps(entries))
    results = evaluate_sugarcrepe(encoder, folder, tmp_path / "coco", text_prompt=PLAIN, **QUIET)
    files = results["sugarcrepe"]["sugarcrepe"]
    assert files["add_obj"]["length_only_acc"] == 75.0 and files["swap_att"]["length_only_acc"] == 50.0
    assert files["overall"]["length_only_acc"] == pytest.approx(100 * (3 + 1) / 6)
    table = format_table(results)
    assert "length-only (blind)" in table and "75.00" in table
    assert "blind length-only 66.67" in format_comparison({"before": results, "after": results})


def test_video_frame_folders(tmp_path):
    encoder = FakeEncoder(write_msrvtt(tmp_path))
    csv_path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    metrics = evaluate_video(encoder, csv_path, tmp_path / "videos", name="msrvtt", max_frames=3, **QUIET)["video"][
        "msrvtt"
    ]
    # Three of video0's five frames, spread evenly (40, 42, 44), and all three of video1's.
    frames = sorted(width for text, width in encoder.inputs if text == "<|image_1|>\nRepresent the given video.")
    assert frames == [40, 42, 44, 50, 51, 52]
    # t2v ranks [1, 1, 4 (video2 missing)]; v2t ranks [1, 1, 4]
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_R@1"] == pytest.approx(200 / 3) and metrics[f"{direction}_R@10"] == pytest.approx(
            200 / 3
        )
        assert (metrics[f"{direction}_MdR"], metrics[f"{direction}_MnR"]) == (1.0, 2.0)
    assert (metrics["num_videos"], metrics["num_captions"], metrics["num_missing_videos"]) == (3, 3, 1)
    assert metrics["missing_video_examples"][0].startswith("video2: neither a frame folder")


def test_video_mean_of_frames_is_renormalised(tmp_path):
    vectors = write_msrvtt(tmp_path)
    # With every frame (max_frames 32): video0 = unit(2, 2, 0, 0, 0, 1) scores 1/3 with "a car drives",
    # above video1 (0) and the missing video2: the car sentence's own video is missing, so still a miss.
    vectors["Find me an video that matches the given caption: a man cooks"] = axis(5)
    metrics = evaluate_video(FakeEncoder(vectors), tmp_path / "MSRVTT_JSFUSION_test.csv", tmp_path / "videos", **QUIET)
    metrics = metrics["video"]["MSRVTT_JSFUSION_test"]
    # t2v: "a man cooks" (axis 5) scores video0 at 1/3 > video1's 0: rank 1. v2t for video0: its
    # sentence scores 1/3, equal to "a car drives" (a tie goes to the target): rank 1.
    assert metrics["t2v_R@1"] == pytest.approx(200 / 3) and metrics["v2t_R@1"] == pytest.approx(200 / 3)


def write_video_file(path, frames: int, width: int = 64):
    av = pytest.importorskip("av", reason="PyAV is not installed: the video-file path is not tested")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, 48, "yuv420p"
        for index in range(frames):
            image = torch.full((48, width, 3), 20 * index, dtype=torch.uint8).numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_video_files_with_pyav(tmp_path, monkeypatch):
    write_video_file(tmp_path / "videos" / "clip0.mp4", frames=12)
    write_video_file(tmp_path / "videos" / "clip1.mp4", frames=3, width=80)
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("key,vid_key,video_id,sentence\nr0,m0,clip0,first clip\nr1,m1,clip1,second clip\n")
    query = "Find me an video that matches the given caption: "
    vectors = {
        ("image", 64): axis(0),
        ("image", 80): axis(1),
        query + "first clip": axis(0),
        query + "second clip": axis(1),
    }
    encoder = FakeEncoder(vectors)
    from mmfast.train.evaluate import video

    monkeypatch.setattr(video, "video_decoder", lambda: "av")
    run = {"max_frames": 4, "cache": tmp_path / "cache", **QUIET}
    metrics = evaluate_video(encoder, csv_path, tmp_path / "videos", **run)["video"]["test"]
    assert [width for _, width in encoder.inputs].count(64) == 4 and [w for _, w in encoder.inputs].count(80) == 3
    assert metrics["t2v_R@1"] == 100.0 and metrics["v2t_R@1"] == 100.0 and metrics["num_missing_videos"] == 0
    # A second run reads the frame counts but decodes and embeds nothing.
    decoded = []
    monkeypatch.setattr(video.VideoFile, "_decode", lambda self: decoded.append(self.path))
    again = FakeEncoder(vectors)
    assert evaluate_video(again, csv_path, tmp_path / "videos", **run)["video"]["test"] == metrics
    assert again.calls == 0 and decoded == []


def test_dispatch_and_reports(tmp_path):
    encoder = FakeEncoder({**write_mmeb(tmp_path / "mmeb"), **write_sugarcrepe(tmp_path), **write_msrvtt(tmp_path)})
    data, vectors = write_caption_set(tmp_path, "jsonl")
    encoder.vectors.update({key: torch.tensor(value) for key, value in vectors.items()})
    parts = [
        evaluate(
            encoder,
            "mmeb",
            tmp_path / "mmeb",
            image_root=tmp_path / "mmeb/images",
            output_dir=tmp_path / "out",
            **QUIET,
        ),
        evaluate(encoder, "retrieval", data, text_prompt=PLAIN, **QUIET),
        evaluate(encoder, "video", tmp_path / "MSRVTT_JSFUSION_test.csv", image_root=tmp_path / "videos", **QUIET),
        evaluate(
            encoder, "sugarcrepe", tmp_path / "sugarcrepe", image_root=tmp_path / "coco", text_prompt=PLAIN, **QUIET
        ),
    ]
    results = merge_results(*parts)
    paths = write_results(results, tmp_path / "out")
    written = json.loads(paths["json"].read_text())
    assert written["retrieval"]["flickr30k_test"]["t2i_R@1"] == pytest.approx(100 * 14 / 15)
    assert written["mmeb"]["datasets"]["ImageNet-1K"]["num_pred"] == 4
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert {"task": "mmeb", "set": "datasets/ImageNet-1K", "metric": "acc", "value": "75.0"} in rows
    assert {"task": "retrieval", "set": "flickr30k_test", "metric": "i2t_R@1", "value": "100.0"} in rows
    assert {"task": "sugarcrepe", "set": "sugarcrepe/add_obj", "metric": "num_pred", "value": "4"} in rows
    table = format_table(results)
    assert written["video"]["MSRVTT_JSFUSION_test"]["num_missing_videos"] == 1
    for shown in (
        "ImageNet-1K",
        "3/4",
        "Mystery",
        "flickr30k_test",
        "MSRVTT_JSFUSION_test",
        "1/4",
        "not found: add_att",
    ):
        assert shown in table
    with pytest.raises(ValueError, match="retrieval set 'flickr30k_test' appears twice"):
        merge_results(parts[1], parts[1])
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate(encoder, "mteb", data)


def test_caption_prompt_is_not_nested_in_an_encoders_own_template(tmp_path):
    """The VLM2Vec-style caption instruction goes to encoders that take texts as they are; one with
    its own template (E5-V's one-word prompt) gets the bare caption, and a given prompt always wins."""
    data, vectors = write_caption_set(tmp_path, "jsonl")
    one_word = FakeEncoder(vectors)
    one_word.encoder_config = FakeConfig(text_prompt="{text}\nSummary above sentence in one word:")
    plain = FakeEncoder(vectors)
    chosen = FakeEncoder(vectors)
    evaluate_retrieval(one_word, data, **QUIET)
    evaluate_retrieval(plain, data, **QUIET)
    evaluate_retrieval(chosen, data, text_prompt="caption: {text}", **QUIET)
    bare = FakeEncoder(vectors)
    evaluate_retrieval(bare, data, text_prompt=PLAIN, **QUIET)
    captions = [text for text, width in bare.inputs if width is None]
    assert captions and [t for t, w in one_word.inputs if w is None] == captions
    assert [t for t, w in plain.inputs if w is None] == [CAPTION_PROMPT.format(text=t) for t in captions]
    assert [t for t, w in chosen.inputs if w is None] == [f"caption: {t}" for t in captions]
    with pytest.raises(ValueError, match="text_prompt must hold"):
        evaluate_retrieval(plain, data, text_prompt="no slot", **QUIET)


def _write_nli(path, rows, header=("sent0", "sent1", "hard_neg")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_nli_premise_to_entailment(tmp_path):
    """Each premise against every entailment and contradiction of the file: R@K and ranks, entailment over
    contradiction, and the blind length-only baseline, in the results, the table and the comparison."""
    from mmfast.train.evaluate.compare import format_comparison

    rows = [("p0", "e0", "c0 longer"), ("p1", "e1 longer", "c1"), ("p2", "e2", "c2")]
    path = _write_nli(tmp_path / "heldout.csv", rows)
    vectors = {"p0": axis(0), "e0": axis(0), "c0 longer": axis(1),  # found at rank 1, beats its contradiction
               "p1": axis(2), "c1": axis(2), "e1 longer": axis(3),  # its contradiction ranks first
               "p2": axis(4), "e2": [0.6, 0, 0, 0, 0.8, 0], "c2": [0, 0, 0, 0, 0.6, 0.8]}  # fmt: skip
    encoder = FakeEncoder(vectors)
    results = evaluate(encoder, "nli", path, **QUIET)
    m = results["nli"]["heldout"]
    assert m["p2e_R@1"] == pytest.approx(200 / 3) and m["p2e_R@5"] == 100.0 and m["p2e_MnR"] == pytest.approx(4 / 3)
    assert (m["acc"], m["num_correct"], m["num_pred"]) == (pytest.approx(200 / 3), 2, 3)
    assert m["length_only_acc"] == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert (m["num_rows"], m["num_candidates"]) == (3, 6)
    assert "NLI premise -> entailment" in format_table(results)
    compared = format_comparison({"before": results, "after": results})
    assert "heldout premise->entailment R@1" in compared and "blind length-only 50.00" in compared
    assert merge_results(results)["nli"]["heldout"] == m


def test_nli_errors_name_the_file_and_row(tmp_path):
    encoder = FakeEncoder()
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        evaluate(encoder, "nli", tmp_path / "absent.csv", **QUIET)
    bad = _write_nli(tmp_path / "bad.csv", [("a", "b")], header=("sent0", "sent1"))
    with pytest.raises(ValueError, match="bad.csv: no column hard_neg"):
        evaluate(encoder, "nli", bad, **QUIET)
    empty = _write_nli(tmp_path / "empty.csv", [("a", "b", "c"), ("d", "", "f")])
    with pytest.raises(ValueError, match="empty.csv line 3: an empty sent1"):
        evaluate(encoder, "nli", empty, **QUIET)

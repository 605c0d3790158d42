"""MMEB-V2's video QA and classification (evaluate.video_choice): V2's query strings per layout, each
query ranking its own options or the set's labels, checked against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.train.encoder import Encoder
from mmfast.train.evaluate import evaluate, evaluate_video_choice, format_table
from mmfast.train.evaluate.video_choice import QA_INSTRUCTION, qa_frame_indices, read_choice_rows
from mmfast.train.video_inputs import Video

QUIET = {"show_progress": False}
Q = "<|image_1|> Given a video and a question, select the most accurate answer from the provided candidates. "
Q += "Return only the exact text of your chosen answer. Question:  "  # V2's prompt, its space, then a space


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_v2_query_strings_of_every_layout(tmp_path):
    assert QA_INSTRUCTION.endswith("Question: ")
    cases = {
        "Video-MME": (
            {"videoID": "v1", "question": "What is red?", "options": ["A. a ball.", "B. a box"], "answer": "B"},
            ("v1", Q + "What is red?\nA. a ball.\nB. a box", ["a ball", "a box"], 1),
        ),
        "NExTQA": (
            {"video": 42, "question": "why", "a0": "x", "a1": "y", "a2": "z", "a3": "w", "a4": "v", "answer": 3},
            ("42", Q + "why\nOptions:\n(A) x\n(B) y\n(C) z\n(D) w\n(E) v", ["x", "y", "z", "w", "v"], 3),
        ),
        "EgoSchema": (  # V2 joins the question and the options without a separator
            {"video_idx": "e1", "question": "who?", "option": ["A. me", "B. you"], "answer": "0"},
            ("e1", Q + "who?A. me B. you", ["me", "you"], 0),
        ),
        "MVBench": (
            {
                "subset": "action_count",
                "question": "how many",
                "video": "c.mp4",
                "candidates": ["1", "2"],
                "answer": "2",
            },
            ("action_count/c.mp4", Q + "how many\nOptions:\n(A) 1\n(B) 2", ["(A) 1", "(B) 2"], 1),
        ),
        "ActivityNetQA": (
            {"video_name": "abc", "question": "is it day", "answer": "no"},
            ("v_abc", Q + "is it day? (A) yes; (B) no.", ["yes", "no"], 1),
        ),
    }
    for name, (row, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        assert read_choice_rows(path, name) == ([(0, *expected)], None), name
    bad = write_jsonl(tmp_path / "ActivityNetQA.jsonl", [{"video_name": "a", "question": "q", "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"ActivityNetQA.jsonl row 0: not a ActivityNetQA row"):
        read_choice_rows(bad, "ActivityNetQA")
    bad = write_jsonl(tmp_path / "NExTQA.jsonl", [{**cases["NExTQA"][0], "answer": 7}])
    with pytest.raises(ValueError, match="row 0: its answer is not one of its 5 options"):
        read_choice_rows(bad, "NExTQA")


def test_qa_frames_follow_v2s_extraction():
    # V2 saves every max(1, n // 64)-th frame (at most 64), then takes linspace(0, 63, 8) of those.
    assert qa_frame_indices(200, 8) == [3 * i for i in (0, 9, 18, 27, 36, 45, 54, 63)]
    assert qa_frame_indices(30, 8) == [0, 4, 8, 12, 16, 20, 24, 29]


def test_scores_equal_a_float64_reference(tiny_dirs, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))
    rng = np.random.default_rng(0)
    videos = {}
    for index in range(3):
        folder = tmp_path / "frames" / f"v_clip{index}"
        folder.mkdir(parents=True)
        for frame in range(4 + index):
            array = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / f"{frame:04d}.jpeg")
        videos[f"v_clip{index}"] = Video(tuple(sorted(folder.iterdir())))
    questions = ["is it red", "is it round", "does it move", "is it big", "is it gone"]
    rows = [
        {"video_name": f"clip{i % 4}", "question": q, "answer": "yes" if i % 2 else "no"}
        for i, q in enumerate(questions)
    ]
    path = write_jsonl(tmp_path / "ActivityNetQA" / "test.jsonl", rows)  # clip3 has no frames
    out = evaluate(encoder, "video", path, image_root=tmp_path / "frames", output_dir=tmp_path / "out", **QUIET)
    metrics = out["video"]["ActivityNetQA"]
    options = encoder.encode(["yes", "no"], **QUIET).double()
    kept = [row for row in rows if row["video_name"] != "clip3"]
    queries = encoder.encode(
        [f"{Q}{row['question']}? (A) yes; (B) no." for row in kept],
        [videos[f"v_{row['video_name']}"] for row in kept],
        **QUIET,
    ).double()
    picked = [["yes", "no"][int(torch.argmax(options @ query))] for query in queries]
    correct = [answer == row["answer"] for answer, row in zip(picked, kept, strict=True)]
    # A query without its video cannot be asked: it is left out of the mean and counted (num_pred < num_data).
    assert metrics["hit@1"] == pytest.approx(100 * sum(correct) / len(kept))
    assert (metrics["num_queries"], metrics["num_videos"], metrics["num_missing_videos"]) == (4, 3, 1)
    score = json.loads((tmp_path / "out" / "video" / "ActivityNetQA_score.json").read_text())
    assert (score["num_pred"], score["num_data"]) == (4, 5)
    assert "ActivityNetQA" in format_table(out)
    with pytest.raises(FileNotFoundError, match=r"row 3: video 'v_clip3'"):
        evaluate_video_choice(encoder, path, tmp_path / "frames", strict=True, **QUIET)


def test_classification_layouts_and_their_labels(tmp_path):
    ssv2 = write_jsonl(tmp_path / "SmthSmthV2.jsonl", [{"video_id": 7, "pos_text": "b", "neg_text": ["a", "b", "c"]}])
    instruction = "What actions or object interactions are being performed by the person in the video?"
    assert read_choice_rows(ssv2, "SmthSmthV2") == ([(0, "7", f"<|image_1|> {instruction}", ["a", "b", "c"], 1)], None)
    rows = [
        {"video_id": "x", "pos_text": "tea"},
        {"video_id": "y", "pos_text": "milk"},
        {"video_id": "z", "pos_text": "tea"},
    ]
    breakfast = write_jsonl(tmp_path / "Breakfast" / "test.jsonl", rows)
    query = "<|image_1|> Recognize the breakfast type that the person is cooking in the video. "  # V2's trailing space
    got, source = read_choice_rows(breakfast, "Breakfast")
    assert [(r[2], r[3], r[4]) for r in got] == [
        (query, ["tea", "milk"], 0),
        (query, ["tea", "milk"], 1),
        (query, ["tea", "milk"], 0),
    ]
    assert source == "the data's pos_text values"
    (tmp_path / "Breakfast" / "labels.txt").write_text("pancake\nmilk\ntea\n")
    got, source = read_choice_rows(breakfast, "Breakfast")
    assert [r[4] for r in got] == [2, 1, 2] and source.endswith("labels.txt")
    (tmp_path / "Breakfast" / "labels.txt").write_text("pancake\n")
    with pytest.raises(
        ValueError, match=r"test.jsonl row 0: not a Breakfast row .*'tea' is not among its 1 candidates"
    ):
        read_choice_rows(breakfast, "Breakfast")


def test_a_global_set_ranks_every_label(tiny_dirs, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))
    rng = np.random.default_rng(1)
    for video in ("x", "y"):
        (tmp_path / "frames" / video).mkdir(parents=True)
        for frame in range(3):
            array = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "frames" / video / f"{frame}.jpg")
    path = write_jsonl(
        tmp_path / "UCF101.jsonl", [{"video_id": "x", "pos_text": "Rowing"}, {"video_id": "y", "pos_text": "Typing"}]
    )
    (tmp_path / "labels.txt").write_text("Typing\nRowing\nDiving\n")
    metrics = evaluate(encoder, "video", path, image_root=tmp_path / "frames", **QUIET)["video"]["UCF101"]
    labels = encoder.encode(["Typing", "Rowing", "Diving"], **QUIET).double()
    instruction = "<|image_1|> What activities or sports are being performed by the person in the video?"
    clips = [Video(tuple(sorted((tmp_path / "frames" / v).iterdir()))) for v in ("x", "y")]
    queries = encoder.encode([instruction] * 2, clips, **QUIET).double()
    ranks = [int((labels @ q > labels[answer] @ q).sum()) for q, answer in zip(queries, (1, 0), strict=True)]
    assert metrics["hit@1"] == pytest.approx(50 * sum(rank == 0 for rank in ranks))
    assert metrics["hit@5"] == 100.0 and metrics["labels_from"].endswith("labels.txt")

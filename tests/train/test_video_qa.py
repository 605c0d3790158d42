"""MMEB-V2's video question answering (evaluate.video_qa): V2's query strings per layout, local ranking
over each query's own options, checked against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.train.encoder import Encoder
from mmfast.train.evaluate import evaluate, evaluate_video_qa, format_table
from mmfast.train.evaluate.video_qa import QA_INSTRUCTION, qa_frame_indices, read_qa_rows
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
        "ActivityNetQA": (
            {"video_name": "abc", "question": "is it day", "answer": "no"},
            ("v_abc", Q + "is it day? (A) yes; (B) no.", ["yes", "no"], 1),
        ),
    }
    for name, (row, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        assert read_qa_rows(path, name) == [(0, *expected)], name
    bad = write_jsonl(tmp_path / "ActivityNetQA.jsonl", [{"video_name": "a", "question": "q", "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"ActivityNetQA.jsonl row 0: not a ActivityNetQA row"):
        read_qa_rows(bad, "ActivityNetQA")
    bad = write_jsonl(tmp_path / "NExTQA.jsonl", [{**cases["NExTQA"][0], "answer": 7}])
    with pytest.raises(ValueError, match="row 0: answer 7 is not one of its 5 options"):
        read_qa_rows(bad, "NExTQA")


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
        evaluate_video_qa(encoder, path, tmp_path / "frames", strict=True, **QUIET)

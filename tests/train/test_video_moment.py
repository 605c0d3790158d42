"""MMEB-V2's moment retrieval (evaluate.video_moment): a video and a scene description rank the video's
clips, checked against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.train.encoder import Encoder
from mmfast.train.evaluate import evaluate, evaluate_video_moment
from mmfast.train.video_inputs import Video

QUIET = {"show_progress": False}


def write_clip(folder, count: int, rng) -> Video:
    folder.mkdir(parents=True)
    for frame in range(count):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(folder / f"frame_{frame:04d}.jpg")
    return Video(tuple(sorted(folder.iterdir())))


def test_moments_rank_their_videos_clips(tiny_dirs, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))
    rng = np.random.default_rng(2)
    clips = {}
    for video in ("a", "b"):
        clips[video] = {"query": write_clip(tmp_path / "frames" / video / "query", 10, rng)}
        for clip in ("negative_0", "negative_1", "positive"):
            clips[video][clip] = write_clip(tmp_path / "frames" / video / clip, 3, rng)
    rows = [{"query": "a man sits", "video_path": "x/a.mp4"}, {"query": "a dog runs", "video_path": "b.mp4"}]
    rows.append({"query": "lost", "video_path": "c.mp4"})
    path = tmp_path / "Charades-STA.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = evaluate(encoder, "video", path, image_root=tmp_path / "frames", output_dir=tmp_path / "out", **QUIET)
    metrics = out["video"]["Charades-STA"]
    instruction = "<|image_1|> Find the clip that corresponds to the described scene in the given video:"
    hits = []
    for row in rows[:2]:
        video = row["video_path"][-5]
        query = encoder.encode([f"{instruction} {row['query']}"], [clips[video]["query"]], **QUIET).double()[0]
        names = ["negative_0", "negative_1", "positive"]
        candidates = encoder.encode(["<|image_1|> Understand the content of the provided video."] * 3,
                                    [clips[video][n] for n in names], **QUIET).double()  # fmt: skip
        hits.append(int(torch.argmax(candidates @ query)) == 2)
    assert metrics["hit@1"] == pytest.approx(50 * sum(hits))
    assert (metrics["num_queries"], metrics["num_clips"], metrics["num_missing_videos"]) == (2, 6, 1)
    assert json.loads((tmp_path / "out" / "video" / "Charades-STA_score.json").read_text())["num_data"] == 3
    with pytest.raises(FileNotFoundError, match=r"Charades-STA.jsonl row 2: video 'c': no frame folder"):
        evaluate_video_moment(encoder, path, tmp_path / "frames", strict=True, **QUIET)
    (tmp_path / "frames" / "a" / "positive").rename(tmp_path / "frames" / "a" / "other")
    with pytest.raises(FileNotFoundError, match="holds no positive"):
        evaluate_video_moment(encoder, path, tmp_path / "frames", strict=True, **QUIET)


def test_momentseeker_takes_video_image_and_text_queries(tiny_dirs, tmp_path):
    encoder = Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))
    rng = np.random.default_rng(3)
    frames = tmp_path / "frames"
    clip_videos = {name: write_clip(frames / "video_frames" / name, 8, rng) for name in ("m_p1", "m_p2", "m_n1", "m_q")}
    Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(frames / "query_still.jpg")
    clips = {"positive_frames": [{"output_path": "m/p1.mp4"}, {"output_path": "m/p2.mp4"}],
             "negative_frames": [{"output_path": "m/n1.mp4"}]}  # fmt: skip
    rows = [
        {"query": "a jump", "input_frames": "m/q.mp4", **clips},
        {"query": "a jump", "input_frames": "still.jpg", **clips},
        {"query": "a jump", "input_frames": "", **clips},
    ]
    path = tmp_path / "MomentSeeker.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = evaluate_video_moment(encoder, path, frames, **QUIET)["video"]["MomentSeeker"]
    queries = encoder.encode(
        [
            "<|image_1|> Find the clip that corresponds to the given sentence and video segment: a jump",
            "<|image_1|> Select the video clip that aligns with the given text and image: a jump",
            "Find the clip that corresponds to the given text: a jump",
        ],
        [clip_videos["m_q"], frames / "query_still.jpg", None],
        **QUIET,
    ).double()
    candidates = encoder.encode(
        ["<|image_1|> Understand the content of the provided video clip."] * 3,
        [clip_videos[name] for name in ("m_p1", "m_p2", "m_n1")],
        **QUIET,
    ).double()
    top = torch.argmax(queries @ candidates.T, dim=1)
    assert metrics["hit@1"] == pytest.approx(100 * float((top < 2).double().mean()))  # either positive is right
    assert metrics["recall@5"] == 100.0 and (metrics["num_queries"], metrics["num_clips"]) == (3, 9)
    rows[0]["positive_frames"] = []
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="MomentSeeker.jsonl row 0: positive_frames is empty"):
        evaluate_video_moment(encoder, path, frames, **QUIET)

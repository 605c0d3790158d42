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

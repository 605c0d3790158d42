"""MMEB-V2's text→video retrieval (evaluate.video_v2): the published layouts, V2's frames and score
files, checked against a float64 ranking of the encoder's own embeddings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmfast.train.encoder import Encoder
from mmfast.train.evaluate import evaluate, evaluate_video_v2, format_table
from mmfast.train.evaluate.compare import headlines
from mmfast.train.evaluate.video_v2 import V2_VIDEO_RETRIEVAL, read_retrieval_rows, v2_frame_indices
from mmfast.train.video_inputs import Video

QUIET = {"show_progress": False}
VIDEO_TEXT = "<|image_1|> Understand the content of the provided video."


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    return Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))


def write_frames(folder, count: int, seed: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        paths.append(folder / f"frame_{index + 1}.jpg")  # natural order: frame_2 before frame_10
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def write_msrvtt_v2(root, counts=(12, 3, 5, 9)):
    """Four videos (frame folders), one without frames, and five captions (video1 has two)."""
    frames = {f"video{i}": write_frames(root / "frames" / f"video{i}", n, seed=i) for i, n in enumerate(counts)}
    captions = ["a red ball", "a blue box", "the blue box again", "green leaves", "a yellow sun", "a lost video"]
    ids = ["video0", "video1", "video1", "video2", "video3", "video9"]
    path = root / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"video_id": ids, "video": [f"{i}.mp4" for i in ids], "caption": captions}), path)
    return path, frames, ids, captions


def test_scores_equal_a_float64_ranking(qwen, tmp_path):
    path, frames, ids, captions = write_msrvtt_v2(tmp_path)
    result = evaluate_video_v2(qwen, path, tmp_path / "frames", output_dir=tmp_path / "out", **QUIET)
    metrics = result["video"]["MSR-VTT"]  # the name from the HF folder layout
    # The reference: V2's frames (linspace over the natural order), V2's prompts, a float64 ranking.
    videos = [
        Video(tuple(files[i] for i in np.linspace(0, len(files) - 1, min(8, len(files)), dtype=int)))
        for files in frames.values()
    ]
    queries = qwen.encode([f"{V2_VIDEO_RETRIEVAL['MSR-VTT'].instruction} {c}" for c in captions], **QUIET).double()
    gallery = qwen.encode([VIDEO_TEXT] * len(videos), videos, **QUIET).double()
    order = torch.argsort(queries @ gallery.T, dim=1, descending=True, stable=True)
    names = list(frames)
    hits = {k: [ids[q] in [names[i] for i in order[q, :k]] for q in range(len(ids))] for k in (1, 5)}
    assert metrics["hit@1"] == pytest.approx(100 * np.mean(hits[1]))
    assert metrics["hit@5"] == pytest.approx(100 * np.mean(hits[5]))
    assert (metrics["num_queries"], metrics["num_videos"], metrics["num_missing_videos"]) == (6, 4, 1)
    assert metrics["missing_video_examples"][0].startswith("video9: neither a frame folder")
    score = json.loads((tmp_path / "out" / "video" / "MSR-VTT_score.json").read_text())
    assert score["hit@1"] == pytest.approx(metrics["hit@1"] / 100) and score["num_data"] == 6
    assert "hit@1" in format_table(result) and headlines(result)["MSR-VTT hit@1"][0] == metrics["hit@1"]


def test_strict_names_the_row_and_dispatch_by_suffix(qwen, tmp_path):
    path, *_ = write_msrvtt_v2(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"row 5: video 'video9'"):
        evaluate_video_v2(qwen, path, tmp_path / "frames", strict=True, **QUIET)
    # evaluate(task="video") takes a V2 file by its suffix (a .csv stays LLaVE's JSFUSION protocol).
    out = evaluate(qwen, "video", path, image_root=tmp_path / "frames", output_dir=tmp_path / "o", **QUIET)
    assert out["video"]["MSR-VTT"]["num_videos"] == 4 and (tmp_path / "o" / "video" / "MSR-VTT_score.json").is_file()


def test_every_published_layout(tmp_path):
    tables = {
        "MSR-VTT": {"video_id": ["v1"], "video": ["v1.mp4"], "caption": ["a cat"]},
        "MSVD": {"video_id": ["v1"], "video": ["v1.avi"], "caption": [["a cat", "one cat"]]},
        "DiDeMo": {"video": ["sub/v1.mp4"], "caption": ["a cat"]},
        "VATEX": {"videoID": ["v1"], "enCap": [["a cat", "the cat"]]},
        "YouCook2": {"id": ["v1"], "video_path": ["val/v1.mp4"], "sentence": ["a cat"]},
    }
    assert set(tables) == set(V2_VIDEO_RETRIEVAL)
    for name, table in tables.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(table), path)
        ids, captions, _ = read_retrieval_rows(path, V2_VIDEO_RETRIEVAL[name])
        assert (ids, captions) == (["v1"], ["a cat"]), name
    bad = tmp_path / "MSVD.jsonl"
    bad.write_text(json.dumps({"video_id": "v1", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"MSVD.jsonl row 0: missing column\(s\) \['video'\]"):
        read_retrieval_rows(bad, V2_VIDEO_RETRIEVAL["MSVD"])
    with pytest.raises(ValueError, match="name must be one of MMEB-V2's video retrieval sets"):
        evaluate_video_v2(None, tmp_path / "clips.parquet", **QUIET)


def test_v2_reads_a_video_file_through_its_64_saved_frames():
    # V2 saves floor(i * 200 / 64) for i < 64, then takes linspace(0, 63, 8) of those.
    saved = [int(np.floor(i * 200 / 64)) for i in range(64)]
    assert v2_frame_indices(200, 8) == [saved[i] for i in (0, 9, 18, 27, 36, 45, 54, 63)]
    assert v2_frame_indices(6, 8) == [0, 1, 2, 3, 4, 5]


def test_video_files_are_decoded_when_no_frame_folder_exists(qwen, tmp_path):
    av = pytest.importorskip("av")  # a declared dependency (pyproject), installed in CI
    clips = tmp_path / "clips"
    clips.mkdir()
    for index, width in enumerate((64, 80)):
        with av.open(str(clips / f"c{index}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = width, 48, "yuv420p"
            for frame in range(12):
                image = np.full((48, width, 3), (20 * frame + 90 * index) % 256, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    path = tmp_path / "MSR-VTT.jsonl"
    rows = [{"video_id": f"c{i}", "video": f"c{i}.mp4", "caption": f"clip {i}"} for i in range(2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    metrics = evaluate_video_v2(qwen, path, clips, cache=tmp_path / "cache", **QUIET)["video"]["MSR-VTT"]
    assert (metrics["num_videos"], metrics["num_missing_videos"]) == (2, 0)

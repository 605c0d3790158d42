"""MMEB-V2's moment retrieval (QVHighlight, Charades-STA, MomentSeeker), as VLM2Vec V2 scores it: a
description of a scene (with its video, an image, or alone) is one query, which ranks its own candidate
clips (V2's `eval_type: local`).

Layout (V2's `moment_retrieval` sets; the HF file as .parquet, .jsonl or .json, the frames as V2
saves them under its `frame_root`):

    rows                                  query, video_path
    <frame_root>/<video>/query/*.jpg      the whole video's frames (<video>: the stem of video_path)
    <frame_root>/<video>/<clip>/*.jpg     one folder per candidate clip; the one named positive… is right

The query is "<video> Find the clip that corresponds to the described scene in the given video:
{query}", a clip "<video> Understand the content of the provided video."; each is one video input of 8
frames (`video_inputs.sample_frame_positions`). V2 lists the clip folders in the file system's order and
takes the last `positive…` one as the answer; mmfast sorts them by name first, so runs are repeatable.
Frames must already be saved (V2's public configs ship them: `video_root: ""`).

MomentSeeker (V2's `momentseeker` parser): rows hold query, input_frames, positive_frames and
negative_frames (lists of {"output_path": clip}). A clip's frames are in
`<frame_root>/video_frames/<its path, "/" as "_", without .mp4>/`, every saved frame used (V2 saves 8).
The query is, by `input_frames`: a video ("….mp4", its frames found the same way) with "Find the clip
that corresponds to the given sentence and video segment: {query}"; an image ("….jpg", the file
`<frame_root>/query_<input_frames>`) with "Select the video clip that aligns with the given text and
image: {query}"; else the text alone after "Find the clip that corresponds to the given text:". A clip
is "<video> Understand the content of the provided video clip."; every positive clip is right.

Scores: V2's metrics (hit@1 is its leaderboard's), in % in the results and as fractions in
`<output_dir>/video/<name>_score.json`. A query whose video or clips cannot be read is left out and
counted; with strict it is an error naming the file and row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..records import read_rows
from ..video_inputs import V2_NUM_FRAMES
from .cache import as_cache
from .inputs import MISSING_EXAMPLES, ImageChecker, string_field
from .mmeb_v2_metrics import query_metrics, v2_results
from .video_v2 import V2_SCORE_FOLDER, v2_set_name, video_input

QUERY_INSTRUCTION = "Find the clip that corresponds to the described scene in the given video:"
CLIP_TEXT = "<|image_1|> Understand the content of the provided video."
V2_MOMENT_SETS = ("QVHighlight", "Charades-STA", "MomentSeeker")
SEEKER_TEXT_INSTRUCTION = "Find the clip that corresponds to the given text:"
SEEKER_IMAGE_INSTRUCTION = "Select the video clip that aligns with the given text and image:"
SEEKER_VIDEO_INSTRUCTION = "Find the clip that corresponds to the given sentence and video segment:"
SEEKER_CLIP_TEXT = "<|image_1|> Understand the content of the provided video clip."
ALL_FRAMES = 2**31 - 1  # MomentSeeker reads every saved frame (V2 saves 8 a clip)


def moment_query(frame_root: Path, video: str, num_frames: int, checker: ImageChecker):
    """(query video, clips, index of the answer, None), or (None, None, None, reason)."""
    folder = frame_root / video
    if not folder.is_dir():
        return None, None, None, f"no frame folder {folder}"
    whole, problem = video_input(folder, "query", None, num_frames, checker)
    if problem is not None:
        return None, None, None, problem
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "query")
    positives = [index for index, name in enumerate(names) if name.startswith("positive")]
    if not positives:
        return None, None, None, f"{folder} holds no positive… clip folder"
    clips = []
    for name in names:
        clip, problem = video_input(folder, name, None, num_frames, checker)
        if problem is not None:
            return None, None, None, problem
        clips.append(clip)
    return whole, clips, positives[-1], None


def momentseeker_query(record: Mapping, frame_root: Path, where: str, checker: ImageChecker):
    """(query text, query input, clips, indices of the right clips, None), or (…, reason)."""
    text, source = string_field(record, "query", where), string_field(record, "input_frames", where)
    clips, problem = [], None
    for column in ("positive_frames", "negative_frames"):
        entries = record.get(column)
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "output_path" in e for e in entries):
            raise ValueError(f"{where}: column {column!r} must be a list of {{'output_path': …}}")
        clips.append([str(entry["output_path"]) for entry in entries])
    positives, negatives = clips
    if not positives:
        raise ValueError(f"{where}: positive_frames is empty")
    inputs = []
    for clip in positives + negatives:
        video, problem = video_input(frame_root / "video_frames", _clip_folder(clip), None, ALL_FRAMES, checker)
        if problem is not None:
            return None, None, None, None, problem
        inputs.append(video)
    if source.endswith(".mp4"):
        query_input, problem = video_input(frame_root / "video_frames", _clip_folder(source), None, ALL_FRAMES, checker)
        query = f"<|image_1|> {SEEKER_VIDEO_INSTRUCTION} {text}"
    elif source.endswith(".jpg"):
        query_input = frame_root / f"query_{source}"
        problem = None if checker.usable(query_input, where) else f"query image {query_input} is missing or unreadable"
        query = f"<|image_1|> {SEEKER_IMAGE_INSTRUCTION} {text}"
    else:
        query_input, query = None, f"{SEEKER_TEXT_INSTRUCTION} {text}"
    if problem is not None:
        return None, None, None, None, problem
    return query, query_input, inputs, list(range(len(positives))), None


def _clip_folder(path: str) -> str:
    return path.replace("/", "_").split(".mp4")[0]


def evaluate_video_moment(
    encoder,
    data: str | os.PathLike,
    frame_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    num_frames: int = V2_NUM_FRAMES,
    output_dir: str | os.PathLike | None = None,
    strict: bool = False,
    cache=None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """{"video": {name: {V2's metrics in %, "num_queries", "num_clips", "num_missing_videos", ...}}};
    `name` as in `evaluate_video_v2`."""
    path = Path(data)
    name = v2_set_name(path, name, V2_MOMENT_SETS, "moment retrieval")
    frame_root = path.parent if frame_root is None else Path(frame_root)
    checker, asked, missing, rows = ImageChecker(strict), [], [], 0
    for number, record in read_rows(path):
        where = f"{path} row {number}"
        rows += 1
        if name == "MomentSeeker":
            query, query_input, clips, right, problem = momentseeker_query(record, frame_root, where, checker)
            label = string_field(record, "input_frames", where) or f"row {number}"
        else:
            label = Path(string_field(record, "video_path", where)).stem
            query_input, clips, answer, problem = moment_query(frame_root, label, num_frames, checker)
            query, right = f"<|image_1|> {QUERY_INSTRUCTION} {string_field(record, 'query', where)}", [answer]
        if problem is not None:
            if strict:
                raise FileNotFoundError(f"{where}: video {label!r}: {problem}")
            missing.append(f"{label}: {problem}")
            continue
        asked.append((query, query_input, clips, right, label))

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    queries = embeddings.embed([query for query, *_ in asked], [query_input for _, query_input, *_ in asked])
    every_clip = [clip for _, _, clips, _, _ in asked for clip in clips]
    clip_text = SEEKER_CLIP_TEXT if name == "MomentSeeker" else CLIP_TEXT
    clip_vectors, start, per_query = embeddings.embed([clip_text] * len(every_clip), every_clip), 0, []
    for vector, (_, _, clips, right, _) in zip(queries, asked, strict=True):
        scores = clip_vectors[start : start + len(clips)] @ vector
        start += len(clips)
        ranked = torch.argsort(scores, descending=True, stable=True).tolist()
        per_query.append(query_metrics(ranked, right))
    result = v2_results(per_query, rows, output_dir, V2_SCORE_FOLDER, name)
    result.update(
        num_queries=len(asked), num_videos=len({label for *_, label in asked}), num_clips=len(every_clip),
        num_missing_videos=len(missing), missing_video_examples=missing[:MISSING_EXAMPLES], **checker.report(),
    )  # fmt: skip
    return {"video": {name: result}}


__all__ = ["V2_MOMENT_SETS", "evaluate_video_moment"]

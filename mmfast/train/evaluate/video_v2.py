"""MMEB-V2's text→video retrieval (MSR-VTT, MSVD, DiDeMo, VATEX, YouCook2), as VLM2Vec V2 scores it.

Layouts: the HF test sets VLM2Vec V2 reads (`VLM2Vec/MSR-VTT` and the others), as a .parquet, .jsonl
or .json file; each row is one caption and its video:

    MSR-VTT   video_id, video, caption           MSVD      video_id, video, caption (a list: the first)
    DiDeMo    video, caption (id: the file stem)  VATEX     videoID, enCap (a list: the first)
    YouCook2  id, video_path, sentence

V2's protocol: the query is the dataset's instruction and the caption ("Find a video that contains
the following visual content: {caption}" for MSR-VTT); a video is "<|image_1|> Understand the content
of the provided video." with the video as ONE input through the backbone's video path
(`mmfast.train.video_inputs`): 8 frames spread evenly over the frames of `<frame_root>/<id>/`
(V2's `frame_root`; natural sort order), or decoded from the row's video file under `frame_root` when
that folder is absent. Every caption ranks every video of the set (V2's `eval_type: global`), through
`mmfast.similarity_topk`, never a captions × videos matrix.

Scores: V2's metrics (`mmeb_v2_metrics`; its leaderboard reads hit@1) in % in the results, as
fractions in `<output_dir>/video/<name>_score.json`. A video that is missing or unreadable is left out
of the candidates and counted; its captions still count as queries (a miss), as in V2, where such a
run fails instead. With strict it is an error naming the file and row.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mmfast

from ..records import read_rows
from ..video_inputs import V2_NUM_FRAMES, Video, sample_frame_positions
from .cache import as_cache
from .inputs import MISSING_EXAMPLES, ImageChecker
from .mmeb_v2_metrics import KS, query_metrics, v2_results
from .video import FRAME_SUFFIXES, VIDEO_SUFFIXES, VideoFile, VideoFrame, video_decoder

V2_SCORE_FOLDER = "video"
V2_SAVED_FRAMES = 64  # V2's max_frames_saved
VIDEO_TEXT = "<|image_1|> Understand the content of the provided video."


@dataclass(frozen=True)
class RetrievalLayout:
    """How one V2 video-retrieval set names its columns, and its query instruction."""

    id_column: str | None  # None: the id is the video file's stem
    video_column: str | None  # None: the video file is <id>.mp4
    caption_column: str
    instruction: str


V2_VIDEO_RETRIEVAL = {
    "MSR-VTT": RetrievalLayout("video_id", "video", "caption",
                               "Find a video that contains the following visual content:"),
    "MSVD": RetrievalLayout("video_id", "video", "caption",
                            "Find the video snippet that corresponds to the given summary:"),
    "DiDeMo": RetrievalLayout(None, "video", "caption", "Find a video that includes the following described scenes:"),
    "VATEX": RetrievalLayout("videoID", None, "enCap", "Select a video that fits the description provided:"),
    "YouCook2": RetrievalLayout("id", "video_path", "sentence",
                                "Find a video that demonstrates the following action while making a recipe:"),
}  # fmt: skip


def _natural(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def v2_set_name(path: Path, name: str | None, known, kind: str) -> str:
    """The V2 set a file holds: `name`, else the file's stem or the nearest folder above it named like
    one (the HF layout keeps the name above the file: MSR-VTT/test_1k/test-….parquet)."""
    name = name or next((p.stem for p in (path, *path.parents) if p.stem in known), path.stem)
    if name not in known:
        raise ValueError(f"{path}: name must be one of MMEB-V2's {kind} sets ({', '.join(known)}), got {name!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    return name


def read_retrieval_rows(path: Path, layout: RetrievalLayout) -> tuple[list[str], list[str], list[str | None]]:
    """(video ids, captions, video files) of a set, one per row; errors name the file and row."""
    ids, captions, files = [], [], []
    for number, record in read_rows(path):
        where = f"{path} row {number}"
        needed = [c for c in (layout.id_column, layout.video_column, layout.caption_column) if c is not None]
        missing = [c for c in needed if c not in record]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing} (has {', '.join(record)})")
        caption = record[layout.caption_column]
        if isinstance(caption, list):  # MSVD and VATEX keep several captions; V2 asks with the first
            caption = caption[0] if caption else ""
        video = record[layout.video_column] if layout.video_column else None
        video_id = record[layout.id_column] if layout.id_column else Path(str(video or "")).stem
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: {layout.caption_column!r} must be a non-empty string, got {caption!r}")
        if not isinstance(video_id, (str, int)) or not str(video_id).strip():
            raise ValueError(f"{where}: the video id must be a non-empty string, got {video_id!r}")
        ids.append(str(video_id).strip())
        captions.append(caption.strip())
        files.append(None if video is None else str(video))
    return ids, captions, files


def v2_frame_indices(total: int, num_frames: int) -> list[int]:
    """The frames V2 reads from a video file: it saves at most 64 (`floor(i · total / 64)`), then
    samples `num_frames` of those (`sample_frame_positions`)."""
    saved = list(range(total)) if total <= V2_SAVED_FRAMES else [
        math.floor(i * total / V2_SAVED_FRAMES) for i in range(V2_SAVED_FRAMES)
    ]  # fmt: skip
    return [saved[i] for i in sample_frame_positions(len(saved), num_frames)]


def video_input(
    frame_root: Path, video_id: str, file: str | None, num_frames: int, checker: ImageChecker, *, frame_indices=None
):
    """(Video, None) of one video, or (None, reason) when it cannot be read. frame_indices(count,
    num_frames): the frames a video file is read at (default: V2's retrieval rule, `v2_frame_indices`)."""
    folder = frame_root / video_id
    if folder.is_dir():
        frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not frames:
            return None, f"{folder} holds no {'/'.join(FRAME_SUFFIXES)} frames"
        sampled = [frames[i] for i in sample_frame_positions(len(frames), num_frames)]
        if not all([checker.usable(frame, f"video {video_id}") for frame in sampled]):
            return None, f"{folder} has a missing or unreadable frame"
        return Video(tuple(sampled), video_id), None
    candidates = [frame_root / Path(file).name] if file else []
    candidates += [folder.with_suffix(suffix) for suffix in VIDEO_SUFFIXES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None, f"neither a frame folder {folder} nor a video file ({', '.join(c.name for c in candidates)})"
    decoder = video_decoder()
    if decoder is None:
        raise RuntimeError(f"video {found}: reading video files needs decord or PyAV (pip install av)")
    try:
        decoded = VideoFile(found, decoder, num_frames, frame_indices=frame_indices or v2_frame_indices)
    except Exception as error:  # decoders raise their own kinds for a damaged file
        return None, f"{found} cannot be read with {decoder} ({error})"
    if not decoded.indices:
        return None, f"{found} has no frames"
    return Video(tuple(VideoFrame(decoded, position) for position in range(len(decoded.indices))), video_id), None


def evaluate_video_v2(
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
    """{"video": {name: {V2's metrics in %, "num_queries", "num_videos", "num_missing_videos", ...}}};
    `name` is one of V2's set names and picks the layout; by default the file's stem or the nearest
    folder above it named like one."""
    path = Path(data)
    name = v2_set_name(path, name, V2_VIDEO_RETRIEVAL, "video retrieval")
    layout = V2_VIDEO_RETRIEVAL[name]
    frame_root = path.parent if frame_root is None else Path(frame_root)
    ids, captions, files = read_retrieval_rows(path, layout)

    checker, videos, video_ids, missing, seen = ImageChecker(strict), [], [], [], set()
    for row, (video_id, file) in enumerate(zip(ids, files, strict=True)):
        if video_id in seen:  # several captions of one video: it is embedded once
            continue
        seen.add(video_id)
        video, problem = video_input(frame_root, video_id, file, num_frames, checker)
        if problem is not None:
            if strict:
                raise FileNotFoundError(f"{path} row {row}: video {video_id!r}: {problem}")
            missing.append(f"{video_id}: {problem}")
            continue
        videos.append(video)
        video_ids.append(video_id)

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    query_vectors = embeddings.embed([f"{layout.instruction} {caption}" for caption in captions])
    video_vectors = embeddings.embed([VIDEO_TEXT] * len(videos), videos)
    per_query = []
    if video_ids:
        top = mmfast.similarity_topk(query_vectors, video_vectors, min(max(KS), len(video_ids))).indices
        for video_id, best in zip(ids, top.tolist(), strict=True):
            per_query.append(query_metrics([video_ids[i] for i in best], [video_id]))
    else:
        per_query = [query_metrics([], [video_id]) for video_id in ids]
    result = v2_results(per_query, len(ids), output_dir, V2_SCORE_FOLDER, name)
    result.update(
        num_queries=len(ids), num_videos=len(video_ids), num_missing_videos=len(missing),
        missing_video_examples=missing[:MISSING_EXAMPLES], **checker.report(),
    )  # fmt: skip
    return {"video": {name: result}}


__all__ = ["V2_VIDEO_RETRIEVAL", "evaluate_video_v2", "read_retrieval_rows", "v2_set_name", "video_input"]

"""Zero-shot text→video retrieval (LLaVE's protocol): MSR-VTT 1k-A.

Layout: the CSV `MSRVTT_JSFUSION_test.csv` (key, vid_key, video_id, sentence) and, per video_id,
either a folder of frames `<video_root>/<video_id>/*.jpg` (natural sort order: frame2 before
frame10) or a file `<video_root>/<video_id>.mp4` (.webm, .avi, .mkv, .mov), read with decord or
PyAV, whichever is importable. Several sentences per video are allowed (then video→text is a hit
when any of them is found).

Frames: up to `max_frames` (32, as LLaVE), uniformly spread over the clip (rounded linspace over
all frames; LLaVE first resamples to 3 fps, which only matters for clips under ~11 s).

A video with an image encoder that takes one image per input: each sampled frame is embedded with
the video prompt, and the video's embedding is the mean of its frames' embeddings, re-normalised
(the mean-pooling of CLIP4Clip; LLaVE itself feeds all frames to the LLM in one input, which a
one-image encoder cannot). Frames are cached like images, so a second run decodes nothing it
has embedded. A missing video (no folder or file, no frames, an unreadable frame or file) is a miss
in both directions, counted in the totals.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from PIL import Image

from ..placeholder import IMAGE_PLACEHOLDER
from ..records import csv_header, csv_rows
from .cache import as_cache
from .inputs import MISSING_EXAMPLES, ImageChecker
from .metrics import cross_modal_metrics

VIDEO_PROMPT = IMAGE_PLACEHOLDER + "\nRepresent the given video."
VIDEO_QUERY_PROMPT = "Find me an video that matches the given caption: {text}"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")


def video_decoder() -> str | None:
    """ "decord" or "av" (PyAV), the first importable, else None."""
    try:
        import decord  # noqa: F401

        return "decord"
    except ImportError:
        pass
    try:
        import av  # noqa: F401

        return "av"
    except ImportError:
        return None


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """At most max_frames distinct indices spread evenly over 0..num_frames-1, ends included."""
    count = min(num_frames, max_frames)
    if count <= 1:
        return [(num_frames - 1) // 2] if num_frames else []
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


class VideoFile:
    """A video file whose sampled frames are decoded once, on the first frame asked for."""

    def __init__(self, path: Path, decoder: str, max_frames: int, *, frame_indices=sample_frame_indices):
        """frame_indices(count, max_frames): the frames to decode (default: LLaVE's even spread)."""
        self.path, self.decoder = path, decoder
        stat = path.stat()
        rule = "" if frame_indices is sample_frame_indices else f":{frame_indices.__name__}"
        self.identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{decoder}{rule}"
        self.indices = frame_indices(self._count_frames(), max_frames)
        self._frames: dict[int, Image.Image] = {}  # decoded, not yet handed out

    def _count_frames(self) -> int:
        if self.decoder == "decord":
            import decord

            return len(decord.VideoReader(str(self.path)))
        import av

        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)

    def frame(self, position: int) -> Image.Image:
        # Each frame is handed out once and then forgotten, so decoded videos do not pile up in memory;
        # one asked for again (a later run without a cache) decodes the video again.
        if position not in self._frames:
            self._frames = dict(enumerate(self._decode()))
        return self._frames.pop(position)

    def _decode(self) -> list[Image.Image]:
        if self.decoder == "decord":
            import decord

            batch = decord.VideoReader(str(self.path)).get_batch(self.indices).asnumpy()
            return [Image.fromarray(array).convert("RGB") for array in batch]
        import av

        wanted, decoded = set(self.indices), {}
        last = None
        with av.open(str(self.path)) as container:
            for number, frame in enumerate(container.decode(video=0)):
                if number in wanted:
                    decoded[number] = frame.to_image().convert("RGB")
                last = frame
                if number >= self.indices[-1]:
                    break
        if last is None:
            raise ValueError(f"video {self.path}: no frame could be decoded")
        # A packet count can overstate the frames; indices past the end take the last frame.
        tail = last.to_image().convert("RGB")
        return [decoded.get(index, tail) for index in self.indices]


class VideoFrame:
    """One sampled frame of a VideoFile, as an ImageSource for the embedding cache."""

    def __init__(self, video: VideoFile, position: int):
        self.video, self.position = video, position

    def cache_key(self) -> str:
        return f"video:{self.video.identity}:frame {self.video.indices[self.position]}"

    def load(self) -> Image.Image:
        return self.video.frame(self.position)

    def __repr__(self) -> str:
        return f"VideoFrame({self.video.path}, frame {self.video.indices[self.position]})"


def read_msrvtt_csv(path: Path) -> tuple[list[str], list[str], list[int]]:
    """(video ids in first-seen order, sentences, the video index of each sentence)."""
    header = csv_header(path)
    for column in ("video_id", "sentence"):
        if column not in header:
            raise ValueError(f"{path}: missing column {column!r} (has {', '.join(header)})")
    videos: dict[str, int] = {}
    sentences, owners = [], []
    for line, _, record in csv_rows(path):
        video_id, sentence = record["video_id"].strip(), record["sentence"].strip()
        if not video_id or not sentence:
            empty = "video_id" if not video_id else "sentence"
            raise ValueError(f"{path} line {line}: column {empty!r} is empty")
        owners.append(videos.setdefault(video_id, len(videos)))
        sentences.append(sentence)
    if not sentences:
        raise ValueError(f"{path}: no rows")
    return list(videos), sentences, owners


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def video_frames(video_root: Path, video_id: str, max_frames: int, checker: ImageChecker):
    """The sampled frames of one video (paths or VideoFrames), or (None, reason) when it is missing."""
    folder = video_root / video_id
    if folder.is_dir():
        frames = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not frames:
            return None, f"{folder} holds no {'/'.join(FRAME_SUFFIXES)} frames"
        sampled = [frames[i] for i in sample_frame_indices(len(frames), max_frames)]
        # Every sampled frame is checked (no short cut), so each bad one is counted.
        if not all([checker.usable(frame, f"video {video_id}") for frame in sampled]):
            return None, f"{folder} has a missing or unreadable frame"
        return sampled, None
    file = next((folder.with_suffix(s) for s in VIDEO_SUFFIXES if folder.with_suffix(s).is_file()), None)
    if file is None:
        return None, f"neither a frame folder {folder} nor a file {video_id}{{{','.join(VIDEO_SUFFIXES)}}}"
    decoder = video_decoder()
    if decoder is None:
        raise RuntimeError(
            f"video {file}: reading video files needs decord or PyAV (pip install av); neither is importable"
        )
    try:
        video = VideoFile(file, decoder, max_frames)
    except Exception as error:  # decoders raise their own kinds for a damaged file
        return None, f"{file} cannot be read with {decoder} ({error})"
    if not video.indices:
        return None, f"{file} has no frames"
    return [VideoFrame(video, position) for position in range(len(video.indices))], None


def evaluate_video(
    encoder,
    data: str | os.PathLike,
    video_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    max_frames: int = 32,
    strict: bool = False,
    cache=None,
    video_prompt: str = VIDEO_PROMPT,
    query_prompt: str = VIDEO_QUERY_PROMPT,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Returns {"video": {name: {"t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MdR", "t2v_MnR", "v2t_...",
    "num_videos", "num_captions", "num_missing_videos", "missing_video_examples"}}}; `data` is the
    CSV, `video_root` defaults to its folder, `name` to the CSV's stem."""
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
    if "{text}" not in query_prompt:
        raise ValueError(f"query_prompt must hold {{text}} where the caption goes, got {query_prompt!r}")
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"video CSV {path} does not exist")
    root = path.parent if video_root is None else Path(video_root)
    video_ids, sentences, owners = read_msrvtt_csv(path)
    checker = ImageChecker(strict)
    frames, owner_of_frame, missing = [], [], []
    for index, video_id in enumerate(video_ids):
        sampled, problem = video_frames(root, video_id, max_frames, checker)
        if problem is not None:
            if strict:
                raise FileNotFoundError(f"{path}: video {video_id!r}: {problem}")
            missing.append(f"{video_id}: {problem}")
            continue
        frames.extend(sampled)
        owner_of_frame.extend([index] * len(sampled))

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    texts = embeddings.embed([query_prompt.replace("{text}", sentence) for sentence in sentences])
    frame_vectors = embeddings.embed([video_prompt] * len(frames), frames)
    videos = torch.zeros(len(video_ids), texts.shape[1]).index_add_(
        0, torch.tensor(owner_of_frame, dtype=torch.long), frame_vectors
    )
    present = torch.bincount(torch.tensor(owner_of_frame, dtype=torch.long), minlength=len(video_ids)) > 0
    videos[present] = torch.nn.functional.normalize(videos[present], dim=1)
    metrics = cross_modal_metrics(texts, videos, torch.tensor(owners), item_present=present, directions=("t2v", "v2t"))
    counts = {"num_videos": len(video_ids), "num_captions": len(sentences), "num_missing_videos": len(missing)}
    return {"video": {name or path.stem: {**metrics, **counts, "missing_video_examples": missing[:MISSING_EXAMPLES]}}}

"""Every task on the embedded default's held-out sets (fresh renders, never the training files)."""

from __future__ import annotations

import os

from ..default import DefaultData, default_data
from .mmeb import evaluate_mmeb
from .report import merge_results
from .retrieval import evaluate_retrieval
from .sugarcrepe import evaluate_sugarcrepe
from .video import evaluate_video

DEFAULT_TASKS = ("mmeb", "retrieval", "sugarcrepe", "video")


def evaluate_default(
    encoder,
    *,
    tasks=DEFAULT_TASKS,
    data: DefaultData | None = None,
    output_dir: str | os.PathLike | None = None,
    cache=None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict:
    """The results dict of `tasks` on the default held-out sets, in `mmfast-eval`'s shape."""
    unknown = set(tasks) - set(DEFAULT_TASKS)
    if unknown:
        raise ValueError(f"tasks must be among {', '.join(DEFAULT_TASKS)}; got {', '.join(sorted(unknown))}")
    data = default_data() if data is None else data
    common = {"cache": cache, "batch_size": batch_size, "show_progress": show_progress}
    parts = []
    if "mmeb" in tasks:
        parts.append(evaluate_mmeb(encoder, data.mmeb_eval, data.mmeb_eval_images, output_dir=output_dir, **common))
    if "retrieval" in tasks:
        parts.append(evaluate_retrieval(encoder, data.flickr, name="flickr30k", **common))
        parts.append(evaluate_retrieval(encoder, data.urban1k, name="urban1k", **common))
    if "sugarcrepe" in tasks:
        parts.append(evaluate_sugarcrepe(encoder, data.sugarcrepe, data.sugarcrepe / "images", **common))
    if "video" in tasks:
        parts.append(evaluate_video(encoder, data.video_csv, data.video_frames, name="msrvtt", **common))
    return merge_results(*parts)

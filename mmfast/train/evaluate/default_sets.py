"""Every task on the embedded default's held-out sets (fresh renders, never the training files).

The caption and image prompts are the generator's own MMEB instructions, the exact strings the
default trains on (a tiny model pools its last token, so a prompt that ends one token differently,
e.g. without MMEB's closing newline, is an input it has never seen: t2i R@1 2.7% instead of 41%
after 200 steps). Video frames take the image prompt: the default trains no video. The same videos are
also scored by MMEB-V2's protocol (`video_v2`: V2's instructions, one video input per video) when the
backbone has a video input.
"""

from __future__ import annotations

import os

from ..default import MULTI_VECTOR_TASKS, DefaultData, default_data  # what a multi-vector encoder is scored on
from ..default.captions import FIND_IMAGE, IMAGE
from .inputs import BARE_CAPTION, caption_prompt_for
from .mmeb import evaluate_mmeb
from .nli import evaluate_nli
from .report import TASKS, merge_results
from .retrieval import evaluate_retrieval
from .sugarcrepe import evaluate_sugarcrepe
from .video import evaluate_video
from .video_v2 import evaluate_video_v2
from .visdoc import evaluate_visdoc

CAPTION_PROMPT = FIND_IMAGE.format("{text}")
IMAGE_PROMPT = IMAGE


def evaluate_default(
    encoder,
    *,
    tasks=TASKS,
    data: DefaultData | None = None,
    output_dir: str | os.PathLike | None = None,
    cache=None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> dict:
    """The results dict of `tasks` (among `report.TASKS`: the default has a held-out set for every task) on
    the default held-out sets, in `mmfast-eval`'s shape."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks must be among {', '.join(TASKS)}; got {', '.join(sorted(unknown))}")
    config = getattr(encoder, "encoder_config", None)
    single_vector_only = set(tasks) - set(MULTI_VECTOR_TASKS)
    if getattr(config, "multi_vector", False) and single_vector_only:
        raise ValueError(f"a multi-vector encoder is scored on {', '.join(MULTI_VECTOR_TASKS)} only (MaxSim); "
                         f"{', '.join(sorted(single_vector_only))} rank single vectors")  # fmt: skip
    data = default_data() if data is None else data
    common = {"cache": cache, "batch_size": batch_size, "show_progress": show_progress}
    # An encoder with its own text template (E5-V's one-word prompt) gets the bare caption, as everywhere.
    caption = CAPTION_PROMPT if caption_prompt_for(encoder, None) != BARE_CAPTION else BARE_CAPTION
    prompts = {"text_prompt": caption, "image_prompt": IMAGE_PROMPT}
    parts = []
    if "mmeb" in tasks:
        parts.append(evaluate_mmeb(encoder, data.mmeb_eval, data.mmeb_eval_images, output_dir=output_dir, **common))
    if "retrieval" in tasks:
        parts.append(evaluate_retrieval(encoder, data.flickr, name="flickr30k", **prompts, **common))
        parts.append(evaluate_retrieval(encoder, data.urban1k, name="urban1k", **prompts, **common))
    if "sugarcrepe" in tasks:
        parts.append(evaluate_sugarcrepe(encoder, data.sugarcrepe, data.sugarcrepe / "images", **prompts, **common))
    if "video" in tasks:
        video = {"query_prompt": caption, "video_prompt": IMAGE_PROMPT}
        parts.append(evaluate_video(encoder, data.video_csv, data.video_frames, name="msrvtt", **video, **common))
        if getattr(getattr(encoder, "family", None), "video_token", None):  # V2's protocol: the backbone's video input
            parts.append(evaluate_video_v2(encoder, data.video_v2, data.video_frames, output_dir=output_dir, **common))
    if "visdoc" in tasks:  # V2's own instructions (evaluate.visdoc), which the default never trains on
        parts.append(evaluate_visdoc(encoder, data.visdoc, name="documents", output_dir=output_dir, **common))
    if "nli" in tasks:  # the sentences bare: the default's text-only recipes (E5-V, UniME stage 1) train them so
        parts.append(evaluate_nli(encoder, data.nli_heldout, name="nli", **common))
    return merge_results(*parts)

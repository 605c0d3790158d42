"""Evaluation: MMEB Precision@1, image-text retrieval R@K, SugarCrepe, text-to-video retrieval,
MMEB-V2's visual-document retrieval and text-only NLI retrieval.

Each task has one entry, returning its part of the results dict ({task: ...}); `merge_results`
joins parts, `write_results` writes results.json and a CSV, `format_table` renders them. The encoder
is any object with `encode(texts, images=None, *, batch_size, show_progress) -> [n, D]` unit float32
embeddings; inputs go through an `EmbeddingCache` (`cache=`: None in memory, a directory on disk,
or an EmbeddingCache).
"""

from __future__ import annotations

import os
from pathlib import Path

from .cache import EmbeddingCache, model_fingerprint
from .metrics import (
    cross_modal_metrics,
    first_candidate_ranks,
    mean_rank,
    median_rank,
    precision_at_1,
    recall_at_k,
    retrieval_ranks,
)
from .mmeb import MMEB_SUBSETS, evaluate_mmeb
from .nli import evaluate_nli
from .report import TASKS, format_table, merge_results, print_table, result_rows, write_results
from .retrieval import evaluate_retrieval
from .sugarcrepe import SUGARCREPE_FILES, evaluate_sugarcrepe
from .video import evaluate_video, video_decoder
from .video_choice import V2_VIDEO_CHOICE, evaluate_video_choice
from .video_moment import V2_MOMENT_SETS, evaluate_video_moment
from .video_v2 import V2_VIDEO_RETRIEVAL, evaluate_video_v2, v2_set_name
from .visdoc import evaluate_visdoc


def evaluate(
    encoder,
    task: str,
    data: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    strict: bool = False,
    cache=None,
    **options,
) -> dict:
    """Runs one task on `data` and returns its part of the results.

    task "mmeb": data = the MMEB-eval root, image_root = the images (default data); output_dir gets
    the per-dataset <Subset>_score.json. "retrieval": data = a record file or a folder (image_root
    for relative image paths). "sugarcrepe": data = the folder of the seven JSON files, image_root =
    the COCO val2017 images. "video": data = the MSR-VTT JSFUSION CSV (LLaVE's protocol:
    one embedding per frame, averaged), image_root = the video root; or an MMEB-V2 video retrieval file
    (MSR-VTT, MSVD, DiDeMo, VATEX, YouCook2: one video input per video), question-answering file
    (Video-MME, NExTQA, EgoSchema, ActivityNetQA), classification file (K700, SmthSmthV2, HMDB51,
    UCF101, Breakfast) or moment-retrieval file (QVHighlight, Charades-STA); image_root = V2's
    frame_root; output_dir gets video/<name>_score.json. "visdoc":
    data = a BEIR folder (queries/, corpus/, qrels/), output_dir gets visdoc/<name>_score.json. "nli":
    data = a CSV of (sent0, sent1, hard_neg) triplets, SimCSE's layout (no images).
    options: the task's own keywords (name, batch_size, show_progress, prompts, max_frames, ...).
    """
    common = {"strict": strict, "cache": cache, **options}
    if task == "mmeb":
        return evaluate_mmeb(encoder, data, image_root, output_dir=output_dir, **common)
    if task == "retrieval":
        return evaluate_retrieval(encoder, data, image_root, **common)
    if task == "sugarcrepe":
        return evaluate_sugarcrepe(encoder, data, image_root, **common)
    if task == "video":  # a .csv is MSR-VTT's JSFUSION list (LLaVE's protocol); else an MMEB-V2 set
        if Path(data).suffix.lower() == ".csv":
            return evaluate_video(encoder, data, image_root, **common)
        name = v2_set_name(
            Path(data), options.get("name"), (*V2_VIDEO_RETRIEVAL, *V2_VIDEO_CHOICE, *V2_MOMENT_SETS), "video"
        )
        if name in V2_VIDEO_CHOICE:
            return evaluate_video_choice(encoder, data, image_root, output_dir=output_dir, **common)
        if name in V2_MOMENT_SETS:
            return evaluate_video_moment(encoder, data, image_root, output_dir=output_dir, **common)
        return evaluate_video_v2(encoder, data, image_root, output_dir=output_dir, **common)
    if task == "visdoc":
        return evaluate_visdoc(encoder, data, image_root, output_dir=output_dir, **common)
    if task == "nli":
        return evaluate_nli(encoder, data, image_root, **common)
    raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")


evaluate_task = evaluate

__all__ = [
    "evaluate_task",
    "EmbeddingCache",
    "MMEB_SUBSETS",
    "SUGARCREPE_FILES",
    "TASKS",
    "cross_modal_metrics",
    "evaluate",
    "evaluate_mmeb",
    "evaluate_nli",
    "evaluate_retrieval",
    "evaluate_sugarcrepe",
    "evaluate_video",
    "evaluate_video_choice",
    "evaluate_video_moment",
    "evaluate_video_v2",
    "evaluate_visdoc",
    "first_candidate_ranks",
    "format_table",
    "mean_rank",
    "median_rank",
    "merge_results",
    "model_fingerprint",
    "precision_at_1",
    "print_table",
    "recall_at_k",
    "result_rows",
    "retrieval_ranks",
    "video_decoder",
    "write_results",
]

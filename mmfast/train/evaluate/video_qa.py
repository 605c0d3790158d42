"""MMEB-V2's video question answering (Video-MME, NExT-QA, EgoSchema, ActivityNetQA), as VLM2Vec V2
scores it: the video and the question are one query, and it ranks its own answer options (V2's
`eval_type: local`).

Layouts (the HF sets V2 reads, as .parquet, .jsonl or .json), and how V2 builds each query (`Q` is
V2's shared instruction, "Given a video and a question, select the most accurate answer … Question: "):

    Video-MME      videoID, question, options ("A. …"), answer (a letter)
                   query: "<video> Q {question}\\n{options, one a line}"; an option's text without "A. "
    NExTQA         video, question, a0 … a4, answer (an index)
                   query: "<video> Q {question}\\nOptions:\\n(A) {a0}\\n…"; the options as they are
    EgoSchema      video_idx, question, option (a list), answer (an index)
                   query: "<video> Q {question}{options joined by a space}" (V2 adds no separator after
                   the question); an option's text without its "A. "
    ActivityNetQA  video_name, question, answer ("yes" or "no"); frames in `v_<video_name>/`
                   query: "<video> Q {question}? (A) yes; (B) no."; the options: yes, no

The video is 8 frames of `<frame_root>/<id>/` (V2's sampling, `video_inputs.sample_frame_positions`),
or, without that folder, of `<frame_root>/<id>.mp4` decoded as V2 extracts QA frames (every
`max(1, n // 64)`-th frame, at most 64, then 8 of those). V2 writes `Q` with its trailing space and then
a space, so the query holds two spaces after "Question:"; they are kept. `<video>` is `<|image_1|>`,
which becomes the backbone's video token.

Scores: V2's metrics (hit@1 is its leaderboard's) over the queries, in % in the results and as fractions
in `<output_dir>/video/<name>_score.json`. A query whose video is missing is left out and counted (V2
fails instead); with strict it is an error naming the file and row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..video_inputs import V2_NUM_FRAMES, sample_frame_positions
from .cache import as_cache
from .inputs import MISSING_EXAMPLES, ImageChecker, read_records
from .mmeb_v2_metrics import mean_metrics, query_metrics
from .video_v2 import V2_SCORE_FOLDER, v2_set_name, video_input

QA_INSTRUCTION = (
    "Given a video and a question, select the most accurate answer from the provided candidates. "
    "Return only the exact text of your chosen answer. Question: "
)
LETTERS = "ABCDE"
QA_SAVED_FRAMES = 64


def _option_text(option: str) -> str:
    # V2's `o[o.find('. '):].strip('. ')`: the text after "A. ", without leading or trailing dots and spaces.
    return option[option.find(". ") :].strip(". ")


def _query(body: str) -> str:
    return f"<|image_1|> {QA_INSTRUCTION} {body}"


def _video_mme(row: Mapping):
    options = list(row["options"])
    body = row["question"] + "\n" + "\n".join(options)
    return str(row["videoID"]), _query(body), [_option_text(o) for o in options], LETTERS.index(row["answer"])


def _nextqa(row: Mapping):
    options = [row[f"a{i}"] for i in range(5)]
    body = row["question"] + "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return str(row["video"]), _query(body), options, int(row["answer"])


def _egoschema(row: Mapping):
    options = list(row["option"])
    body = row["question"] + " ".join(options)
    return str(row["video_idx"]), _query(body), [_option_text(o) for o in options], int(row["answer"])


def _activitynetqa(row: Mapping):
    body = row["question"] + "? (A) yes; (B) no."
    return f"v_{row['video_name']}", _query(body), ["yes", "no"], ["yes", "no"].index(row["answer"])


# name: (columns, the row's (video id, query, options, answer index))
V2_VIDEO_QA: dict[str, tuple[tuple[str, ...], Callable]] = {
    "Video-MME": (("videoID", "question", "options", "answer"), _video_mme),
    "NExTQA": (("video", "question", "a0", "a1", "a2", "a3", "a4", "answer"), _nextqa),
    "EgoSchema": (("video_idx", "question", "option", "answer"), _egoschema),
    "ActivityNetQA": (("video_name", "question", "answer"), _activitynetqa),
}


def qa_frame_indices(total: int, num_frames: int) -> list[int]:
    """The frames V2 reads from a QA video file: every `max(1, total // 64)`-th frame (at most 64 saved),
    then `num_frames` of those."""
    step = max(1, total // QA_SAVED_FRAMES)
    saved = list(range(0, total, step))[:QA_SAVED_FRAMES]
    return [saved[i] for i in sample_frame_positions(len(saved), num_frames)]


def read_qa_rows(path: Path, name: str) -> list[tuple[int, str, str, list[str], int]]:
    """(row, video id, query, options, answer index) per row; a malformed row is an error naming it."""
    columns, build = V2_VIDEO_QA[name]
    rows = []
    for number, record in read_records(path):
        where = f"{path} row {number}"
        missing = [c for c in columns if c not in record]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing} (has {', '.join(record)})")
        try:
            video_id, query, options, answer = build(record)
        except (ValueError, TypeError, IndexError) as error:
            raise ValueError(f"{where}: not a {name} row ({type(error).__name__}: {error})") from None
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: answer {record['answer']!r} is not one of its {len(options)} options")
        rows.append((number, video_id, query, options, answer))
    return rows


def evaluate_video_qa(
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
    """{"video": {name: {V2's metrics in %, "num_queries", "num_missing_videos", ...}}}; `name` as in
    `evaluate_video_v2`."""
    path = Path(data)
    name = v2_set_name(path, name, V2_VIDEO_QA, "video QA")
    frame_root = path.parent if frame_root is None else Path(frame_root)
    rows = read_qa_rows(path, name)
    checker, videos, missing, asked = ImageChecker(strict), {}, [], []
    for number, video_id, query, options, answer in rows:
        if video_id not in videos:
            videos[video_id], problem = video_input(
                frame_root, video_id, None, num_frames, checker, frame_indices=qa_frame_indices
            )
            if problem is not None:
                if strict:
                    raise FileNotFoundError(f"{path} row {number}: video {video_id!r}: {problem}")
                missing.append(f"{video_id}: {problem}")
        if videos[video_id] is not None:
            asked.append((video_id, query, options, answer))

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    queries = embeddings.embed([query for _, query, _, _ in asked], [videos[v] for v, _, _, _ in asked])
    option_texts = list(dict.fromkeys(option for _, _, options, _ in asked for option in options))
    option_vectors = dict(zip(option_texts, embeddings.embed(option_texts), strict=True))
    per_query = []
    for vector, (_, _, options, answer) in zip(queries, asked, strict=True):
        scores = torch.stack([option_vectors[o] for o in options]) @ vector
        ranked = torch.argsort(scores, descending=True, stable=True).tolist()  # a tie goes to the earlier option
        per_query.append(query_metrics(ranked, [answer]))
    scores = mean_metrics(per_query, len(rows))
    if output_dir is not None:
        folder = Path(output_dir) / V2_SCORE_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}_score.json").write_text(json.dumps(scores, indent=4))
    result = {key: 100.0 * value for key, value in scores.items() if key not in ("num_pred", "num_data")}
    result.update(
        num_queries=len(asked), num_videos=sum(v is not None for v in videos.values()),
        num_missing_videos=len(missing), missing_video_examples=missing[:MISSING_EXAMPLES], **checker.report(),
    )  # fmt: skip
    return {"video": {name: result}}


__all__ = ["V2_VIDEO_QA", "evaluate_video_qa", "qa_frame_indices", "read_qa_rows"]

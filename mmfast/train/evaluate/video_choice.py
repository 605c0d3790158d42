"""MMEB-V2's video tasks where a video query chooses among texts, as VLM2Vec V2 scores them:
question answering (Video-MME, NExT-QA, EgoSchema, ActivityNetQA, MVBench: the video and the question are one
query ranking its own options, V2's `eval_type: local`) and classification (SmthSmthV2 ranks its own
candidates; K700, HMDB51, UCF101 and Breakfast rank every class label, `eval_type: global`).

Layouts (the HF sets V2 reads, as .parquet, .jsonl or .json), and how V2 builds each query (`Q` is
V2's shared QA instruction, "Given a video and a question, select the most accurate answer … Question: "):

    Video-MME      videoID, question, options ("A. …"), answer (a letter)
                   query: "<video> Q {question}\n{options, one a line}"; an option's text without "A. "
    NExTQA         video, question, a0 … a4, answer (an index)
                   query: "<video> Q {question}\nOptions:\n(A) {a0}\n…"; the options as they are
    EgoSchema      video_idx, question, option (a list), answer (an index)
                   query: "<video> Q {question}{options joined by a space}" (V2 adds no separator after
                   the question); an option's text without its "A. "
    ActivityNetQA  video_name, question, answer ("yes" or "no"); frames in `v_<video_name>/`
                   query: "<video> Q {question}? (A) yes; (B) no."; the options: yes, no
    MVBench        subset, question, video, candidates, answer (the right candidate's text); frames in
                   `<subset>/<video>/` (V2 saves them from 20 source sets with time bounds: only its
                   saved frames are read); query: "<video> Q {question}\nOptions:\n(A) {c0}\n…";
                   the options "(A) {c0}", …
    SmthSmthV2     video_id, pos_text, neg_text (the candidates); query: "<video> {the set's instruction}"
    K700, HMDB51, UCF101, Breakfast
                   video_id, pos_text; query as SmthSmthV2; the candidates: every class label

V2 keeps the class lists of the global sets in its code, not in the data. They are read from a
`labels.txt` (one label a line) beside the data file; without one, the distinct `pos_text` values of
the file are the labels (equal to V2's list when every class occurs in the file; the results say which,
as `labels_from`).

The video is 8 frames of `<frame_root>/<id>/` (V2's sampling, `video_inputs.sample_frame_positions`),
or, without that folder, of `<frame_root>/<id>.mp4` decoded as V2 extracts frames (QA: every
`max(1, n // 64)`-th frame, at most 64; classification: ffmpeg's `floor(i · n / 64)`), then 8 of those.
V2 writes `Q` with its trailing space and then a space, so the query holds two spaces after "Question:";
they are kept. `<video>` is `<|image_1|>`, which becomes the backbone's video token.

Scores: V2's metrics (hit@1 is its leaderboard's) over the queries, in % in the results and as fractions
in `<output_dir>/video/<name>_score.json`. A query whose video is missing is left out and counted (V2
fails instead); with strict it is an error naming the file and row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..records import read_rows
from ..video_inputs import V2_NUM_FRAMES, sample_frame_positions
from .cache import as_cache
from .inputs import MISSING_EXAMPLES, ImageChecker
from .mmeb_v2_metrics import query_metrics, v2_results
from .video_v2 import V2_SCORE_FOLDER, v2_frame_indices, v2_set_name, video_input

QA_INSTRUCTION = (
    "Given a video and a question, select the most accurate answer from the provided candidates. "
    "Return only the exact text of your chosen answer. Question: "
)
LETTERS = "ABCDE"
SAVED_FRAMES = 64  # V2's max_frames_saved
LABELS_FILE = "labels.txt"


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


def _mvbench(row: Mapping):
    options = [f"({LETTERS[i]}) {candidate}" for i, candidate in enumerate(row["candidates"])]
    body = row["question"] + "\nOptions:\n" + "\n".join(options)
    answer = options.index(f"({LETTERS[list(row['candidates']).index(row['answer'])]}) {row['answer']}")
    return f"{row['subset']}/{row['video']}", _query(body), options, answer


def _activitynetqa(row: Mapping):
    body = row["question"] + "? (A) yes; (B) no."
    return f"v_{row['video_name']}", _query(body), ["yes", "no"], ["yes", "no"].index(row["answer"])


def _classification(instruction: str):
    def build(row: Mapping, labels: list[str] | None):
        options = list(row["neg_text"]) if labels is None else labels
        if row["pos_text"] not in options:
            raise ValueError(f"pos_text {row['pos_text']!r} is not among its {len(options)} candidates")
        return str(row["video_id"]), f"<|image_1|> {instruction}", options, options.index(row["pos_text"])

    return build


@dataclass(frozen=True)
class ChoiceSet:
    """One V2 set: the columns it needs, its row → (video id, query, options, answer index), and how
    its video files are read."""

    columns: tuple[str, ...]
    build: Callable
    frame_indices: Callable[[int, int], list[int]]
    global_labels: bool = False  # every query ranks the set's class labels


def qa_frame_indices(total: int, num_frames: int) -> list[int]:
    """The frames V2 reads from a QA video file: every `max(1, total // 64)`-th frame (at most 64 saved),
    then `num_frames` of those."""
    step = max(1, total // SAVED_FRAMES)
    saved = list(range(0, total, step))[:SAVED_FRAMES]
    return [saved[i] for i in sample_frame_positions(len(saved), num_frames)]


def _qa(columns: tuple[str, ...], build) -> ChoiceSet:
    return ChoiceSet(columns, lambda row, labels: build(row), qa_frame_indices)


def _classes(instruction: str, global_labels: bool) -> ChoiceSet:
    columns = ("video_id", "pos_text") if global_labels else ("video_id", "pos_text", "neg_text")
    return ChoiceSet(columns, _classification(instruction), v2_frame_indices, global_labels)


V2_VIDEO_CHOICE: dict[str, ChoiceSet] = {
    "Video-MME": _qa(("videoID", "question", "options", "answer"), _video_mme),
    "NExTQA": _qa(("video", "question", "a0", "a1", "a2", "a3", "a4", "answer"), _nextqa),
    "EgoSchema": _qa(("video_idx", "question", "option", "answer"), _egoschema),
    "ActivityNetQA": _qa(("video_name", "question", "answer"), _activitynetqa),
    "MVBench": _qa(("subset", "question", "video", "candidates", "answer"), _mvbench),
    "SmthSmthV2": _classes("What actions or object interactions are being performed by the person in the video?",
                           global_labels=False),
    "K700": _classes("Recognize the category of the video content.", global_labels=True),
    "HMDB51": _classes("What actions or objects interactions are the person in the video doing?", global_labels=True),
    "UCF101": _classes("What activities or sports are being performed by the person in the video?",
                       global_labels=True),
    "Breakfast": _classes("Recognize the breakfast type that the person is cooking in the video. ", global_labels=True),
}  # fmt: skip


def class_labels(path: Path, records: list[dict]) -> tuple[list[str], str]:
    """A global set's class labels and where they came from (see the module note)."""
    file = path.parent / LABELS_FILE
    if file.is_file():
        labels = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not labels:
            raise ValueError(f"{file}: holds no label")
        return labels, str(file)
    return list(dict.fromkeys(str(record.get("pos_text")) for record in records)), "the data's pos_text values"


def read_choice_rows(path: Path, name: str) -> tuple[list[tuple[int, str, str, list[str], int]], str | None]:
    """(row, video id, query, options, answer index) per row, and where a global set's labels came
    from; a malformed row is an error naming the file and row."""
    choice = V2_VIDEO_CHOICE[name]
    records = list(read_rows(path))
    labels, labels_from = class_labels(path, [r for _, r in records]) if choice.global_labels else (None, None)
    rows = []
    for number, record in records:
        where = f"{path} row {number}"
        missing = [c for c in choice.columns if c not in record]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing} (has {', '.join(record)})")
        try:
            video_id, query, options, answer = choice.build(record, labels)
        except (ValueError, TypeError, IndexError) as error:
            raise ValueError(f"{where}: not a {name} row ({type(error).__name__}: {error})") from None
        if not 0 <= answer < len(options):
            raise ValueError(f"{where}: its answer is not one of its {len(options)} options")
        rows.append((number, video_id, query, options, answer))
    return rows, labels_from


def evaluate_video_choice(
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
    name = v2_set_name(path, name, V2_VIDEO_CHOICE, "video QA or classification")
    frame_root = path.parent if frame_root is None else Path(frame_root)
    rows, labels_from = read_choice_rows(path, name)
    frame_indices = V2_VIDEO_CHOICE[name].frame_indices
    checker, videos, missing, asked = ImageChecker(strict), {}, [], []
    for number, video_id, query, options, answer in rows:
        if video_id not in videos:
            videos[video_id], problem = video_input(
                frame_root, video_id, None, num_frames, checker, frame_indices=frame_indices
            )
            if problem is not None:
                if strict:
                    raise FileNotFoundError(f"{path} row {number}: video {video_id!r}: {problem}")
                missing.append(f"{video_id}: {problem}")
        if videos[video_id] is not None:
            asked.append((query, videos[video_id], options, answer))

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    queries = embeddings.embed([query for query, _, _, _ in asked], [video for _, video, _, _ in asked])
    option_texts = list(dict.fromkeys(option for _, _, options, _ in asked for option in options))
    index = {text: position for position, text in enumerate(option_texts)}
    option_vectors = embeddings.embed(option_texts)
    per_query = []
    for vector, (_, _, options, answer) in zip(queries, asked, strict=True):
        scores = option_vectors[[index[o] for o in options]] @ vector
        ranked = torch.argsort(scores, descending=True, stable=True).tolist()  # a tie goes to the earlier option
        per_query.append(query_metrics(ranked, [answer]))
    result = v2_results(per_query, len(rows), output_dir, V2_SCORE_FOLDER, name)
    result.update(
        num_queries=len(asked), num_videos=sum(v is not None for v in videos.values()),
        num_missing_videos=len(missing), missing_video_examples=missing[:MISSING_EXAMPLES], **checker.report(),
    )  # fmt: skip
    if labels_from is not None:
        result["labels_from"] = labels_from
    return {"video": {name: result}}


__all__ = ["V2_VIDEO_CHOICE", "evaluate_video_choice", "qa_frame_indices", "read_choice_rows"]

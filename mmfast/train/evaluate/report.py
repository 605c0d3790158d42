"""The results structure and its writers: results.json, a long-format CSV and a printed table.

results.json merges the evaluators' parts (rates in %):
    {"mmeb": {"datasets": {<Subset>: {"acc", "num_correct", "num_pred", "num_missing_image_rows",
                                      "num_missing_images", "missing_image_examples", "meta_task", "split"}},
              "meta_tasks": {<task>: {"acc", "num_datasets"}}, "overall": {...}, "ind": {...},
              "ood": {...}, "unassigned": [...]},
     "retrieval": {<set>: {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", ..., "t2i_MdR", "t2i_MnR",
                           "i2t_MdR", "i2t_MnR", "num_images", "num_captions", "num_missing_images", ...}},
     "sugarcrepe": {<set>: {<file>: {"acc", "num_correct", "num_pred", ...}, "overall": {...},
                            "mean": {...}, "files_not_found": [...]}},
     "video": {<set>: {"t2v_R@1", ..., "v2t_MnR", "num_videos", "num_captions", "num_missing_videos", ...}}}
The CSV has one row per (task, set, metric) for every number in it; set is the path between the task
and the metric, e.g. ("mmeb", "datasets/ImageNet-1K", "acc") or ("retrieval", "flickr30k", "t2i_R@1").
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path

TASKS = ("mmeb", "retrieval", "sugarcrepe", "video")


def merge_results(*parts: Mapping) -> dict:
    """One results dict from the evaluators' parts. Sets of the same task merge; the same set twice,
    or two MMEB parts (their means would no longer cover every dataset), is an error."""
    merged: dict = {}
    for part in parts:
        for task, value in part.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} in results (tasks: {', '.join(TASKS)})")
            if task == "mmeb":
                if task in merged:
                    raise ValueError("two MMEB results to merge: evaluate every subset in one evaluate_mmeb call")
                merged[task] = dict(value)
                continue
            sets = merged.setdefault(task, {})
            for name, metrics in value.items():
                if name in sets:
                    raise ValueError(f"{task} set {name!r} appears twice; give the evaluations different names")
                sets[name] = metrics
    return merged


def result_rows(results: Mapping) -> list[tuple[str, str, str, float | int]]:
    """(task, set, metric, value) for every number in the results."""
    rows = []

    def walk(task: str, path: list[str], value) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(task, [*path, str(key)], inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((task, "/".join(path[:-1]), path[-1], value))

    for task, value in results.items():
        walk(task, [], value)
    return rows


def write_results(results: Mapping, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `results.json` and `results.csv` into output_dir; returns their paths."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = output / "results.json", output / "results.csv"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("task", "set", "metric", "value"))
        writer.writerows(result_rows(results))
    return {"json": json_path, "csv": csv_path}


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header, *[[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]


def _recall_columns(metrics: Mapping, direction: str, ranks: bool) -> list:
    columns = [metrics[f"{direction}_R@{k}"] for k in (1, 5, 10)]
    return columns + ([metrics[f"{direction}_MdR"], metrics[f"{direction}_MnR"]] if ranks else [])


def format_table(results: Mapping) -> str:
    """A plain-text table of every task in the results, with num_pred (or its counts) for every set."""
    lines: list[str] = []
    if "mmeb" in results:
        mmeb = results["mmeb"]
        rows = [
            [
                name,
                d["meta_task"] or "-",
                d["split"] or "-",
                d["acc"],
                f"{d['num_correct']}/{d['num_pred']}",
                d["num_missing_image_rows"],
            ]
            for name, d in mmeb["datasets"].items()
        ]
        lines += [
            "MMEB (Precision@1, %)",
            *_table(["dataset", "meta-task", "split", "P@1", "correct/num_pred", "missing-image rows"], rows),
        ]
        means = [[f"{task} ({m['num_datasets']})", m["acc"]] for task, m in mmeb["meta_tasks"].items()]
        means += [
            [f"{key} ({mmeb[key]['num_datasets']})", mmeb[key]["acc"]]
            for key in ("overall", "ind", "ood")
            if key in mmeb
        ]
        lines += ["", *_table(["mean over datasets", "P@1"], means)]
        if mmeb.get("unassigned"):
            lines.append("no meta-task known for: " + ", ".join(mmeb["unassigned"]))
    if "retrieval" in results:
        header = ["set", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "images", "captions", "missing"]
        rows = [
            [
                name,
                *_recall_columns(m, "t2i", False),
                *_recall_columns(m, "i2t", False),
                m["num_images"],
                m["num_captions"],
                m["num_missing_images"],
            ]
            for name, m in results["retrieval"].items()
        ]
        lines += ["", "Image-text retrieval (%)", *_table(header, rows)]
    if "video" in results:
        header = [
            "set",
            "t2v R@1",
            "R@5",
            "R@10",
            "MdR",
            "MnR",
            "v2t R@1",
            "R@5",
            "R@10",
            "MdR",
            "MnR",
            "videos",
            "captions",
            "missing",
        ]
        rows = [
            [
                name,
                *_recall_columns(m, "t2v", True),
                *_recall_columns(m, "v2t", True),
                m["num_videos"],
                m["num_captions"],
                m["num_missing_videos"],
            ]
            for name, m in results["video"].items()
        ]
        lines += ["", "Text-video retrieval (%, ranks)", *_table(header, rows)]
    if "sugarcrepe" in results:
        rows, absent = [], []
        for name, files in results["sugarcrepe"].items():
            for stem, m in files.items():
                if isinstance(m, Mapping) and "num_pred" in m:
                    missing = m.get("num_missing_images", "-")
                    rows.append([f"{name}/{stem}", m["acc"], f"{m['num_correct']}/{m['num_pred']}", missing])
            rows.append([f"{name}/mean of files", files["mean"]["acc"], f"{files['mean']['num_files']} files", "-"])
            if files.get("files_not_found"):
                absent.append(f"{name}: not found: {', '.join(files['files_not_found'])}")
        header = ["set/file", "acc", "correct/num_pred", "missing images"]
        lines += ["", "SugarCrepe (accuracy, %)", *_table(header, rows), *absent]
    return "\n".join(lines).strip("\n")


def print_table(results: Mapping) -> None:
    print(format_table(results))

"""The results structure and its writers: results.json, a long-format CSV and a printed table.

results.json merges the evaluators' parts (rates in %):
    {"mmeb": {"datasets": {<Subset>: {"acc", "num_correct", "num_pred", "num_missing_image_rows",
                                      "num_missing_images", "missing_image_examples", "layout" ("v1"/"v2"),
                                      "columns_not_read", "meta_task", "split"}},
              "meta_tasks": {<task>: {"acc", "num_datasets"}}, "overall": {...}, "ind": {...},
              "ood": {...}, "unassigned": [...]},
     "retrieval": {<set>: {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", ..., "t2i_MdR", "t2i_MnR",
                           "i2t_MdR", "i2t_MnR", "num_images", "num_captions", "num_missing_images", ...}},
     "sugarcrepe": {<set>: {<file>: {"acc", "num_correct", "num_pred", ...}, "overall": {...},
                            "mean": {...}, "files_not_found": [...]}},
     "video": {<set>: {"t2v_R@1", ..., "v2t_MnR", "num_videos", "num_captions", "num_missing_videos", ...}
               or, for an MMEB-V2 set, {"hit@1", ..., "mrr@10", "num_queries", "num_videos", ...}},
     "visdoc": {<set>: {"hit@1", ..., "ndcg_linear@5", ..., "mrr@10", "num_queries", "num_pages", ...}},
     "nli": {<set>: {"p2e_R@1", ..., "p2e_MnR", "acc", "length_only_acc", "num_rows", "num_candidates", ...}}}
The CSV has one row per (task, set, metric) for every number in it; set is the path between the task
and the metric, e.g. ("mmeb", "datasets/ImageNet-1K", "acc") or ("retrieval", "flickr30k", "t2i_R@1").
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path

TASKS = ("mmeb", "retrieval", "sugarcrepe", "video", "visdoc", "nli")


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


def table_lines(header: list[str], rows: list[list]) -> list[str]:
    cells = [header, *[[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]


def _mmeb_lines(mmeb: Mapping) -> list[str]:
    rows = [
        [name, d["meta_task"] or "-", d["split"] or "-", d["acc"], f"{d['num_correct']}/{d['num_pred']}"]
        + [d["num_missing_image_rows"]]
        for name, d in mmeb["datasets"].items()
    ]
    header = ["dataset", "meta-task", "split", "P@1", "correct/num_pred", "missing-image rows"]
    means = [[f"{task} ({m['num_datasets']})", m["acc"]] for task, m in mmeb["meta_tasks"].items()]
    means += [
        [f"{key} ({mmeb[key]['num_datasets']})", mmeb[key]["acc"]] for key in ("overall", "ind", "ood") if key in mmeb
    ]
    means_table = table_lines(["mean over datasets", "P@1"], means)
    lines = ["MMEB (Precision@1, %)", *table_lines(header, rows), "", *means_table]
    if mmeb.get("unassigned"):
        lines.append("no meta-task known for: " + ", ".join(mmeb["unassigned"]))
    return lines


def _cross_modal_lines(title: str, sets: Mapping, directions: tuple[str, str], items: str) -> list[str]:
    """Retrieval and video sets: R@1/5/10, MdR, MnR per direction, and the counts behind them."""
    header = ["set"]
    for direction in directions:
        header += [f"{direction} R@1", "R@5", "R@10", "MdR", "MnR"]
    header += [items, "captions", "missing"]
    rows = []
    for name, m in sets.items():
        row = [name]
        for direction in directions:
            row += [m[f"{direction}_{metric}"] for metric in ("R@1", "R@5", "R@10", "MdR", "MnR")]
        rows.append(row + [m[f"num_{items}"], m["num_captions"], m[f"num_missing_{items}"]])
    return [title, *table_lines(header, rows)]


def _sugarcrepe_lines(sets: Mapping) -> list[str]:
    rows, absent = [], []
    for name, files in sets.items():
        for stem, m in files.items():
            if isinstance(m, Mapping) and "num_pred" in m:
                missing = m.get("num_missing_images", "-")
                blind = m.get("length_only_acc", "-")
                rows.append([f"{name}/{stem}", m["acc"], blind, f"{m['num_correct']}/{m['num_pred']}", missing])
        rows.append([f"{name}/mean of files", files["mean"]["acc"], "-", f"{files['mean']['num_files']} files", "-"])
        if files.get("files_not_found"):
            absent.append(f"{name}: not found: {', '.join(files['files_not_found'])}")
    header = ["set/file", "acc", "length-only (blind)", "correct/num_pred", "missing images"]
    return ["SugarCrepe (accuracy, %)", *table_lines(header, rows), *absent]


def _video_v2_lines(sets: Mapping) -> list[str]:
    header = ["set", "hit@1", "hit@5", "NDCG@5", "MRR@10", "queries", "videos", "missing"]
    rows = [[name, m["hit@1"], m["hit@5"], m["ndcg_linear@5"], m["mrr@10"], m["num_queries"], m["num_videos"],
             m["num_missing_videos"]] for name, m in sets.items()]  # fmt: skip
    title = "MMEB-V2 video sets (%, one video input per video; QA sets rank their own options)"
    return [title, *table_lines(header, rows)]


def _visdoc_lines(sets: Mapping) -> list[str]:
    header = ["set", "NDCG@5", "R@5", "hit@1", "queries", "pages", "missing images"]
    rows = [[name, m["ndcg_linear@5"], m["recall@5"], m["hit@1"], m["num_queries"], m["num_pages"],
             m["num_missing_images"]] for name, m in sets.items()]  # fmt: skip
    return ["Visual-document retrieval (%, MMEB-V2's linear NDCG)", *table_lines(header, rows)]


def _nli_lines(sets: Mapping) -> list[str]:
    header = ["set", "p2e R@1", "R@5", "R@10", "MdR", "entailment > contradiction", "length-only (blind)", "rows",
              "candidates"]  # fmt: skip
    rows = [[name, m["p2e_R@1"], m["p2e_R@5"], m["p2e_R@10"], m["p2e_MdR"], m["acc"], m["length_only_acc"],
             m["num_rows"], m["num_candidates"]] for name, m in sets.items()]  # fmt: skip
    return ["NLI premise -> entailment (%, ranks)", *table_lines(header, rows)]


def format_table(results: Mapping) -> str:
    """A plain-text table of every task in the results, with num_pred (or its counts) for every set."""
    sections = []
    if "mmeb" in results:
        sections.append(_mmeb_lines(results["mmeb"]))
    if "retrieval" in results:
        sections.append(
            _cross_modal_lines("Image-text retrieval (%, ranks)", results["retrieval"], ("t2i", "i2t"), "images")
        )
    if "video" in results:
        frame_means = {name: m for name, m in results["video"].items() if "t2v_R@1" in m}
        v2_sets = {name: m for name, m in results["video"].items() if "hit@1" in m}
        if frame_means:
            title = "Text-video retrieval (%, ranks)"
            sections.append(_cross_modal_lines(title, frame_means, ("t2v", "v2t"), "videos"))
        if v2_sets:
            sections.append(_video_v2_lines(v2_sets))
    if "sugarcrepe" in results:
        sections.append(_sugarcrepe_lines(results["sugarcrepe"]))
    if "visdoc" in results:
        sections.append(_visdoc_lines(results["visdoc"]))
    if "nli" in results:
        sections.append(_nli_lines(results["nli"]))
    return "\n\n".join("\n".join(lines) for lines in sections)


def print_table(results: Mapping) -> None:
    print(format_table(results))

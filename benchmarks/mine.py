"""`mmfast-mine` on a generated text training set: wall time and the process's peak memory.

    python benchmarks/mine.py --rows 2000000 --subsets 20 --model MODEL --threads 1 --json benchmarks/results/mine.json

Its own tool, not a mode of benchmarks/train.py: it times a different command (mining, no training
step), and what it varies is the training set's size, not the contrastive batch.

The set: --rows MMEB-train rows of text only (`qry`, `pos_text`), words of the default's world (colours,
shapes, places, numbers), written once under --data-dir, as --subsets files of rows / subsets rows each
(MMEB-train's layout: one file per subset, ~20 subsets; a row's negatives come from its own subset). A
positive is 8 random words; its query is 5 of them and 2 others, so every row has near neighbours. Mined
with --model (default: the default backbone, untrained; D = 64), k = --k, the false-negative ratio at its
default, in a fresh process per run (`python -m mmfast.train.mine`), with the embedding cache in memory
(--cache none: every input is embedded). An untrained model scores nearly every candidate above 0.95 x
the positive, so nearly every row goes to the exact scan; a trained one (the default run's) drops few.
Reported: wall time of the whole command, its phases (from mine_report.json, summed over subsets:
embedding, search, writing), `peak_rss_mib`, the child's ru_maxrss; with --json, the rows are added to
the file's (each row names its machine line).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine  # noqa: E402

WORDS = (
    *("red", "green", "blue", "yellow", "purple", "orange", "white", "black"),
    *("circle", "square", "triangle", "star", "cross", "ring", "heart"),
    *("top", "left", "right", "bottom", "center", "one", "two", "three", "four"),
    *("small", "large", "above", "below", "next", "to", "the", "a"),
)


def write_text_set(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` text-only MMEB-train rows (see the module docstring), written in blocks."""
    if path.is_file() and path.with_suffix(".done").is_file():
        return
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            positive = rng.integers(0, len(words), (n, 8))
            kept = np.argsort(rng.random((n, 8)), axis=1)[:, :5]
            query = np.concatenate([np.take_along_axis(positive, kept, 1), rng.integers(0, len(words), (n, 2))], 1)
            for q, p in zip(words[query], words[positive], strict=True):
                f.write(json.dumps({"qry": "find: " + " ".join(q), "qry_image_path": "", "pos_text": " ".join(p),
                                    "pos_image_path": ""}) + "\n")  # fmt: skip
    os.replace(temporary, path)
    path.with_suffix(".done").touch()


def write_subsets(folder: Path, rows: int, subsets: int) -> Path:
    """`rows` rows as `subsets` files (subset i: seed i); one subset is the single file text-<rows>.jsonl."""
    if subsets == 1:
        write_text_set(folder / f"text-{rows}.jsonl", rows)
        return folder / f"text-{rows}.jsonl"
    if rows % subsets:
        raise SystemExit(f"--rows {rows} is not a multiple of --subsets {subsets}")
    target = folder / f"text-{rows}-in-{subsets}"
    target.mkdir(parents=True, exist_ok=True)
    for i in range(subsets):
        write_text_set(target / f"subset{i:02d}.jsonl", rows // subsets, seed=i)
    return target


def run(rows: int, args) -> dict:
    from mmfast.train.default import default_backbone

    data = write_subsets(args.data_dir, rows, args.subsets)
    model = args.model or default_backbone()
    out = args.data_dir / f"mined-{rows}-in-{args.subsets}-{Path(model).name}"
    command = [sys.executable, "-m", "mmfast.train.mine", "--model", str(model), "--data", str(data),
               "--output_dir", str(out), "--k", str(args.k), "--cache", "none", "--no_progress",
               "--batch_size", str(args.batch_size), "--cpu_threads", str(args.threads)]  # fmt: skip
    if args.batch_order:
        command += ["--batch_order", str(args.batch_order)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mmfast-mine failed:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("note: an earlier child had a higher peak; this run's peak is at most that", file=sys.stderr)
    report = json.loads((out / "mine_report.json").read_text())
    subsets = report["subsets"].values()
    total = {key: sum(s[key] for s in subsets)
             for key in ("distinct_positives", "rows_with_k_negatives", "false_negatives_dropped")}  # fmt: skip
    return {"rows": rows, "subsets": len(report["subsets"]),
            "model": "default backbone, untrained" if args.model is None else str(args.model), "k": args.k,
            "batch_order": args.batch_order, "threads": args.threads, "batch_size": args.batch_size,
            "wall_s": round(seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
            "distinct_positives": total["distinct_positives"], "rows_with_k_negatives": total["rows_with_k_negatives"],
            **{f"{name}_s": value for name, value in report["phases"].items()},
            "false_negatives_dropped": total["false_negatives_dropped"]}  # fmt: skip


def add_rows(path: Path, rows: list[dict]) -> None:
    """The file's rows and these, each row with its machine line (the old file had one for all its rows)."""
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    kept = [{"machine": old.get("machine"), **row} if "machine" not in row else row for row in old["rows"]]
    line = machine()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": line, "rows": kept + [{"machine": line, **row} for row in rows]}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2_000_000])
    p.add_argument("--subsets", type=int, default=1, help="files (subsets) the rows are split into (default: 1)")
    p.add_argument("--model", help="the model that mines (default: the default backbone, untrained)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch_order", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256, help="inputs per forward when embedding")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/mmfast-mine-bench"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # the machine line names the child's threads
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:  # one child per size; sizes in increasing order keep each peak its own
        results.append(run(rows, args))
        print(json.dumps(results[-1]), flush=True)
    print(f"machine: {machine()}")
    if args.json:
        add_rows(args.json, results)


if __name__ == "__main__":
    main()

"""MMEB-eval: Precision@1 per dataset, per meta-task, overall, in- and out-of-distribution.

Layout (TIGER-Lab/MMEB-eval): `<root>/<Subset>/test-00000-of-00001.parquet` with `qry_text` (str),
`qry_img_path` (str, "" for none), `tgt_text` (list[str]) and `tgt_img_path` (list[str]); image
paths relative to `image_root`. Each row's candidates are its own lists, the ground truth first; a
row is correct when the argmax of the query's cosine similarity over them is index 0 (a tie with
index 0 counts as correct, as argmax's first maximal index does).

A row whose query or any candidate image is missing is scored as a miss and still counted in
`num_pred` (`num_missing_image_rows` says how many); with strict it is an error naming the file.

MMEB-V2's text of the same tasks (`ziyjiang/MMEB_Test_Instruct`, same layout) adds `qry_inst` and
`tgt_inst`: a file with `qry_inst` is read as V2 reads it, the prompt assembled per dataset by V2's rule
(`mmeb_v2_prompts`). A column the scoring does not read but that holds content (an unknown column, or
`tgt_img_path` under a rule that takes no candidate image) is named in a warning and in the dataset's
`columns_not_read`.

Subsets outside the 36 public names get their meta-task and split from `subset_info`, or else from
`<root>/mmeb_subsets.json`: {"<Subset>": {"meta_task": "retrieval", "split": "ind" | "ood" | null,
"v2_prompt": one of mmeb_v2_prompts.RULES (needed only for a V2 file)}}. A subset known to neither is
scored and in the overall mean, listed under "unassigned".

Score files (`output_dir`): `<output_dir>/<Subset>_score.json` in V1's shape, read by VLM2Vec's
`report_score.py`, and `<output_dir>/image/<Subset>_score.json` with V2's keys (`mmeb_v2_metrics`) plus
V1's `acc` and `num_correct`, read by `report_score_v2.py` (its `<exp>/image/` folder). In V2's terms a
row's candidates are ranked by score, ties in list order (so the ground truth wins a tie, as above); the
ground truth is the one relevant candidate, and candidates with the same input are the same item.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..placeholder import placeholder_problem
from ..records import parquet_table
from .cache import as_cache
from .inputs import ImageChecker, load_json
from .metrics import first_candidate_ranks
from .mmeb_v2_metrics import KS, mean_metrics, query_metrics
from .mmeb_v2_prompts import DATASET_RULES, RULE_COLUMNS, RULES, assemble

logger = logging.getLogger(__name__)

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("ind", "ood")
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
V2_COLUMNS = ("qry_inst", "tgt_inst")  # MMEB_Test_Instruct: the instructions apart from the texts
SIDECAR = "mmeb_subsets.json"
V2_SCORE_FOLDER = "image"  # report_score_v2.py reads <exp>/image/, <exp>/video/, <exp>/visdoc/

_PUBLIC = {
    "classification": (
        "ImageNet-1K N24News HatefulMemes VOC2007 SUN397",
        "Place365 ImageNet-A ImageNet-R ObjectNet Country211",
    ),
    "vqa": ("OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W", "ScienceQA VizWiz GQA TextVQA"),
    "retrieval": (
        "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA",
        "FashionIQ Wiki-SS-NQ OVEN EDIS",
    ),
    "grounding": ("MSCOCO", "RefCOCO RefCOCO-Matching Visual7W-Pointing"),
}
# The 36 public subsets: name -> (meta-task, "ind" if it is one of the 20 MMEB-train subsets else "ood").
MMEB_SUBSETS: dict[str, tuple[str, str]] = {
    name: (task, split)
    for task, lists in _PUBLIC.items()
    for split, names in zip(SPLITS, lists, strict=True)
    for name in names.split()
}

# Score blocks of rows: rows × candidates × D floats of gathered candidate embeddings at once.
_BLOCK_ELEMENTS = 1 << 24


def evaluate_mmeb(
    encoder,
    root: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    subsets: list[str] | None = None,
    subset_info: Mapping[str, Mapping] | None = None,
    strict: bool = False,
    cache=None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Scores every subset under `root` (or those named in `subsets`); `image_root` defaults to `root`.

    Writes `<output_dir>/<Subset>_score.json` as VLM2Vec does ({"acc" as a fraction, "num_correct",
    "num_pred"}) when output_dir is given. Returns {"mmeb": {"datasets": {...}, "meta_tasks": {...},
    "overall": {...}, "ind"/"ood": {...} when known, "unassigned": [...]}}, accuracies in %.
    """
    root = Path(root)
    image_root = root if image_root is None else Path(image_root)
    info = subset_table(root, subset_info)
    rules = {**DATASET_RULES, **prompt_rules(root, subset_info)}
    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    datasets = {}
    for name, files in find_subsets(root, subsets).items():
        scores, v2_scores = score_subset(name, files, image_root, embeddings, strict=strict, rule=rules.get(name))
        task, split = info.get(name, (None, None))
        datasets[name] = {**scores, "meta_task": task, "split": split}
        if output_dir is not None:
            write_score_json(Path(output_dir), name, scores, v2_scores)
    return {"mmeb": summarize(datasets)}


def find_subsets(root: Path, subsets: list[str] | None) -> dict[str, list[Path]]:
    """{subset: its test parquet shards}; `root` itself may be one subset's folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB root {root} is not a directory")
    if subsets is None:
        if sorted(root.glob("test-*.parquet")):
            return {root.name: sorted(root.glob("test-*.parquet"))}
        subsets = sorted(child.name for child in root.iterdir() if sorted(child.glob("test-*.parquet")))
        if not subsets:
            raise FileNotFoundError(f"no <Subset>/test-*.parquet under MMEB root {root}")
    found = {}
    for name in subsets:
        files = sorted((root / name).glob("test-*.parquet"))
        if not files:
            raise FileNotFoundError(f"MMEB subset {name!r}: no test-*.parquet in {root / name}")
        found[name] = files
    return found


def subset_table(root: Path, subset_info: Mapping[str, Mapping] | None) -> dict[str, tuple[str | None, str | None]]:
    """Meta-task and split per subset: the public table, then the sidecar file, then `subset_info`."""
    table: dict[str, tuple[str | None, str | None]] = dict(MMEB_SUBSETS)
    sidecar = root / SIDECAR
    for source, extra in (
        (str(sidecar), load_json(sidecar) if sidecar.is_file() else None),
        ("subset_info", subset_info),
    ):
        if extra is None:
            continue
        if not isinstance(extra, Mapping):
            raise ValueError(f"{source}: expected an object {{subset: {{meta_task, split}}}}")
        for name, entry in extra.items():
            if isinstance(entry, Mapping) and entry.get("v2_prompt", RULES[0]) not in RULES:
                raise ValueError(f"{source}: subset {name!r} v2_prompt must be one of {RULES}; got {entry!r}")
            if not isinstance(entry, Mapping) or entry.get("meta_task") not in META_TASKS:
                raise ValueError(f"{source}: subset {name!r} needs meta_task, one of {META_TASKS}; got {entry!r}")
            if entry.get("split") not in (*SPLITS, None):
                raise ValueError(
                    f"{source}: subset {name!r} split must be 'ind', 'ood' or null; got {entry['split']!r}"
                )
            table[name] = (entry["meta_task"], entry.get("split"))
    return table


def prompt_rules(root: Path, subset_info: Mapping[str, Mapping] | None) -> dict[str, str]:
    """The V2 prompt rules given for subsets outside V2's table (sidecar file, then `subset_info`)."""
    sidecar = root / SIDECAR
    rules = {}
    for extra in (load_json(sidecar) if sidecar.is_file() else None, subset_info):
        for name, entry in (extra or {}).items():
            if isinstance(entry, Mapping) and "v2_prompt" in entry:
                rules[name] = entry["v2_prompt"]
    return rules


def read_subset(name: str, files: list[Path]) -> tuple[list[dict], list[str]]:
    """The rows of one subset, each checked: strings where strings belong, candidate lists non-empty
    and as long as their image lists; and the columns the files hold beyond those read."""
    rows, extra = [], []
    layouts = set()
    for path in files:
        table = parquet_table(path)
        columns = table.column_names
        for column in COLUMNS:
            if column not in columns:
                raise ValueError(f"{path}: missing column {column!r} (has {', '.join(columns)})")
        instructions = [c for c in V2_COLUMNS if c in columns]
        layouts.add(bool(instructions))
        if len(layouts) > 1:
            raise ValueError(f"MMEB dataset {name}: {path} and the files before it differ in layout (qry_inst)")
        extra += [c for c in columns if c not in (*COLUMNS, *V2_COLUMNS) and c not in extra]
        rows.extend(table.select([*COLUMNS, *instructions]).to_pylist())
    for number, row in enumerate(rows):
        where = f"MMEB dataset {name} row {number}"
        for column in V2_COLUMNS:
            if column in row and not isinstance(row[column], str):
                raise ValueError(f"{where}: {column} must be a string, got {type(row[column]).__name__}")
        if not isinstance(row["qry_text"], str):
            raise ValueError(f"{where}: qry_text must be a string, got {type(row['qry_text']).__name__}")
        if row["qry_img_path"] is not None and not isinstance(row["qry_img_path"], str):
            raise ValueError(f"{where}: qry_img_path must be a string")
        texts, images = row["tgt_text"], row["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(images, list):
            raise ValueError(f"{where}: tgt_text and tgt_img_path must be lists")
        if not texts:
            raise ValueError(f"{where}: empty candidate list (tgt_text)")
        if len(texts) != len(images):
            raise ValueError(f"{where}: ragged candidates: {len(texts)} tgt_text but {len(images)} tgt_img_path")
        if not all(isinstance(text, str) for text in texts) or not all(i is None or isinstance(i, str) for i in images):
            raise ValueError(f"{where}: tgt_text entries must be strings and tgt_img_path entries strings")
    return rows, extra


def _columns_not_read(name: str, rows: list[dict], extra: list[str], rule: str | None) -> list[str]:
    """Columns with content that the scoring leaves aside (warned about: a user may expect them used)."""
    read = RULE_COLUMNS[rule] if rule else COLUMNS
    unused = [c for c in (*COLUMNS, *V2_COLUMNS) if c in rows[0] and c not in read] if rows else []
    holding = [c for c in unused if any(v if isinstance(v, str) else any(v or []) for v in (r[c] for r in rows))]
    not_read = holding + extra
    if not_read:
        how = f"VLM2Vec V2's {rule} prompt rule" if rule else "MMEB's scoring"
        logger.warning("MMEB dataset %s: column(s) %s not read (%s does not use them)", name, ", ".join(not_read), how)
    return not_read


def score_subset(
    name: str, files: list[Path], image_root: Path, embeddings, *, strict: bool = False, rule: str | None = None
) -> tuple[dict, dict]:
    """({"acc" (%), "num_correct", "num_pred", "num_missing_image_rows", "num_malformed_rows",
    "num_missing_images", ...},
    V2's score dict); `rule`: the V2 prompt rule, used when the files hold `qry_inst`."""
    rows, extra = read_subset(name, files)
    v2 = bool(rows) and "qry_inst" in rows[0]
    if v2 and rule is None:
        raise ValueError(
            f"MMEB dataset {name}: a V2 file (qry_inst) of a dataset outside VLM2Vec V2's table; give its "
            f"prompt rule as 'v2_prompt' ({', '.join(RULES)}) in {SIDECAR} or subset_info"
        )
    if v2 and "tgt_inst" in RULE_COLUMNS[rule] and "tgt_inst" not in rows[0]:
        raise ValueError(f"MMEB dataset {name}: V2's {rule} rule needs the column tgt_inst, which the files lack")
    not_read = _columns_not_read(name, rows, extra, rule if v2 else None)
    checker = ImageChecker(strict)
    inputs: dict[tuple[str, str], int] = {}  # unique (text, image path) -> position

    def position(text: str, image: str | None) -> int:
        return inputs.setdefault((text, image or ""), len(inputs))

    queries, candidates, usable, malformed = [], [], [], 0
    for number, row in enumerate(rows):
        where = f"MMEB dataset {name} row {number}"
        if v2:
            query, targets = assemble(rule, row, name)
            pairs = [query, *targets]
        else:
            pairs = [(row["qry_text"], row["qry_img_path"]), *zip(row["tgt_text"], row["tgt_img_path"], strict=True)]
        # Every image is checked (no short cut), so each missing file is counted.
        images_ok = all([checker.usable(image_root / image if image else None, where) for _, image in pairs])
        # A text with two image placeholders (or one without an image) is a malformed row: a miss, counted.
        sides = ("query", *["candidate"] * (len(pairs) - 1))
        problems = (placeholder_problem(t, bool(i), side) for (t, i), side in zip(pairs, sides, strict=True))
        problem = next(filter(None, problems), None)
        if problem is not None and strict:
            raise ValueError(f"{where}: {problem}")
        malformed += problem is not None
        usable.append(images_ok and problem is None)
        # Rows with a missing image are misses: their inputs are not embedded.
        queries.append(position(*pairs[0]) if usable[-1] else -1)
        candidates.append([position(*pair) for pair in pairs[1:]] if usable[-1] else [-1])
    unique = list(inputs)
    vectors = embeddings.embed(
        [text for text, _ in unique], [image_root / image if image else None for _, image in unique]
    )

    correct = 0
    kept = [r for r in range(len(rows)) if usable[r]]
    ranked: dict[int, list[int]] = {}  # row -> its candidates' inputs, best first (V2's prediction)
    width = max((len(candidates[r]) for r in kept), default=1)
    dim = max(vectors.shape[1], 1)
    step = max(1, _BLOCK_ELEMENTS // (width * dim))
    for start in range(0, len(kept), step):
        block = kept[start : start + step]
        lengths = torch.tensor([len(candidates[r]) for r in block])
        index = torch.tensor([candidates[r] + [0] * (width - len(candidates[r])) for r in block])
        scores = torch.einsum("rd,rcd->rc", vectors[torch.tensor([queries[r] for r in block])], vectors[index])
        correct += int((first_candidate_ranks(scores, lengths) == 1).sum())
        padded = scores.masked_fill(torch.arange(width) >= lengths[:, None], -torch.inf)
        order = torch.sort(padded, dim=1, descending=True, stable=True).indices[:, : max(KS)]
        for r, best in zip(block, index.gather(1, order).tolist(), strict=True):
            ranked[r] = best[: len(candidates[r])]
    num_pred = len(rows)
    per_query = [query_metrics(ranked.get(r, []), [candidates[r][0]]) for r in range(num_pred)]
    return {
        "acc": 100.0 * correct / num_pred if num_pred else 0.0,
        "num_correct": correct,
        "num_pred": num_pred,
        "num_missing_image_rows": num_pred - len(kept) - malformed,
        "num_malformed_rows": malformed,
        **checker.report(),
        "layout": "v2" if v2 else "v1",
        "columns_not_read": not_read,
    }, mean_metrics(per_query, num_pred)


def write_score_json(output_dir: Path, name: str, scores: Mapping, v2_scores: Mapping | None = None) -> Path:
    """`<name>_score.json` in VLM2Vec V1's shape (acc as a fraction, VLM2Vec's own unit), and with
    `v2_scores`, `image/<name>_score.json` with V2's keys and V1's. Returns the V1 file's path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}_score.json"
    fraction = scores["num_correct"] / scores["num_pred"] if scores["num_pred"] else 0.0
    v1 = {"acc": fraction, "num_correct": scores["num_correct"], "num_pred": scores["num_pred"]}
    path.write_text(json.dumps(v1, indent=4))
    if v2_scores is not None:
        (output_dir / V2_SCORE_FOLDER).mkdir(exist_ok=True)
        (output_dir / V2_SCORE_FOLDER / f"{name}_score.json").write_text(json.dumps({**v2_scores, **v1}, indent=4))
    return path


def summarize(datasets: Mapping[str, Mapping]) -> dict:
    """Unweighted means of per-dataset accuracy (as MMEB averages): per meta-task, overall, IND, OOD."""

    def mean(names: list[str]) -> dict:
        return {"acc": sum(datasets[n]["acc"] for n in names) / len(names), "num_datasets": len(names)}

    summary: dict = {"datasets": dict(datasets), "meta_tasks": {}}
    for task in META_TASKS:
        names = [n for n, d in datasets.items() if d["meta_task"] == task]
        if names:
            summary["meta_tasks"][task] = mean(names)
    if datasets:
        summary["overall"] = mean(list(datasets))
    for split in SPLITS:
        names = [n for n, d in datasets.items() if d["split"] == split]
        if names:
            summary[split] = mean(names)
    summary["unassigned"] = [n for n, d in datasets.items() if d["meta_task"] is None]
    return summary

"""Results side by side (before / after training): the headline number of every task, with what it
is measured over and its chance level, so that a gain can be read at a glance.

Headlines: image-text retrieval t2i and i2t R@1 per set, MMEB Precision@1 per meta-task and overall,
SugarCrepe accuracy over every pair, text-video t2v and v2t R@1 per set (hit@1 for an MMEB-V2 set),
visual-document NDCG@5 per set, NLI premise -> entailment R@1 and entailment-over-contradiction accuracy
per set (all in %).
"""

from __future__ import annotations

from collections.abc import Mapping

from .report import table_lines


def headlines(results: Mapping) -> dict[str, tuple[float, str, float | None]]:
    """{metric: (value, what it is over, chance level or None)} of one results dict."""
    rows: dict[str, tuple[float, str, float | None]] = {}
    for name, m in results.get("retrieval", {}).items():
        over, chance = f"{m['num_captions']} captions, {m['num_images']} images", 100.0 / max(m["num_images"], 1)
        rows[f"{name} t2i R@1"] = (m["t2i_R@1"], over, chance)
        rows[f"{name} i2t R@1"] = (m["i2t_R@1"], over, chance)
    if "mmeb" in results:
        mmeb = results["mmeb"]
        for task, m in mmeb["meta_tasks"].items():
            queries = sum(d["num_pred"] for d in mmeb["datasets"].values() if d["meta_task"] == task)
            rows[f"MMEB {task} P@1"] = (m["acc"], f"{m['num_datasets']} dataset(s), {queries} queries", None)
        if "overall" in mmeb:
            queries = sum(d["num_pred"] for d in mmeb["datasets"].values())
            rows["MMEB overall P@1"] = (mmeb["overall"]["acc"], f"{len(mmeb['datasets'])} datasets, {queries} queries",
                                        None)  # fmt: skip
    for name, files in results.get("sugarcrepe", {}).items():
        overall = files["overall"]
        over = f"{overall['num_pred']} image/caption pairs"
        if "length_only_acc" in overall:  # a blind baseline: the shorter caption called right
            over += f"; blind length-only {overall['length_only_acc']:.2f}"
        rows[f"{name} accuracy"] = (overall["acc"], over, 50.0)
    for name, m in results.get("video", {}).items():
        if "hit@1" in m:  # an MMEB-V2 set: its leaderboard's hit@1, captions ranking the videos
            over = f"{m['num_queries']} captions, {m['num_videos']} videos"
            rows[f"{name} hit@1"] = (m["hit@1"], over, 100.0 / max(m["num_videos"], 1))
            continue
        over, chance = f"{m['num_captions']} captions, {m['num_videos']} videos", 100.0 / max(m["num_videos"], 1)
        rows[f"{name} t2v R@1"] = (m["t2v_R@1"], over, chance)
        rows[f"{name} v2t R@1"] = (m["v2t_R@1"], over, chance)
    for name, m in results.get("visdoc", {}).items():
        rows[f"{name} NDCG@5"] = (m["ndcg_linear@5"], f"{m['num_queries']} queries, {m['num_pages']} pages", None)
    for name, m in results.get("nli", {}).items():
        over = f"{m['num_rows']} premises, {m['num_candidates']} sentences"
        rows[f"{name} premise->entailment R@1"] = (m["p2e_R@1"], over, 100.0 / max(m["num_candidates"], 1))
        over = f"{m['num_rows']} triplets; blind length-only {m['length_only_acc']:.2f}"
        rows[f"{name} entailment > contradiction"] = (m["acc"], over, 50.0)
    return rows


def format_comparison(columns: Mapping[str, Mapping]) -> str:
    """A table of `headlines` with one column per results dict (e.g. {"before": ..., "after": ...}),
    the change from the first column to the last, what each metric is over and its chance level."""
    if not columns:
        raise ValueError("format_comparison needs at least one results dict")
    parts = {name: headlines(results) for name, results in columns.items()}
    first, last = next(iter(parts.values())), list(parts.values())[-1]
    metrics = list(dict.fromkeys(metric for part in parts.values() for metric in part))
    header = ["metric (%)", *columns, "change", "chance", "over"]
    rows = []
    for metric in metrics:
        values = [part[metric][0] if metric in part else "-" for part in parts.values()]
        change = last[metric][0] - first[metric][0] if metric in first and metric in last else "-"
        change = f"{change:+.2f}" if isinstance(change, float) else change
        any_part = next(part[metric] for part in parts.values() if metric in part)
        chance = "-" if any_part[2] is None else f"{any_part[2]:.2f}"
        rows.append([metric, *values, change, chance, any_part[1]])
    return "\n".join(table_lines(header, rows))

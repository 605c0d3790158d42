"""MMEB-V2's ranking metrics over ranked candidate lists, with V2's keys and definitions (fractions).

VLM2Vec V2 writes, per dataset, `hit@k`, `ndcg_linear@k`, `ndcg_exponential@k`, `precision@k`,
`recall@k`, `f1@k`, `map@k` and `mrr@k` for k in 1, 5, 10, then `num_pred` and `num_data`; its
leaderboard reader takes `hit@1` (image, video) or `ndcg_linear@5` (visual documents). The definitions,
per query, with `ranked` its candidates best first and `relevant` the set of correct ones:

- hit@k: 1 when any of ranked[:k] is relevant.
- precision@k: |set(ranked[:k]) ∩ relevant| / k; recall@k: the same over |relevant|; f1@k their F1.
- ndcg@k: DCG of ranked[:k] over the DCG of the ideal order, gain = grade (linear) or 2^grade - 1
  (exponential), discount log2(position + 1); grades are 1 for every relevant item unless graded
  relevance is given. An item listed twice counts twice, as in V2.
- map@k: the sum of precision at each relevant position in ranked[:k], over min(|relevant|, k).
- mrr@k: 1 / the position of the first relevant item in ranked[:k], else 0.
A query that could not be ranked (an input missing) has an empty list: every metric is 0 for it.

Every metric is a mean over queries; k never exceeds `max(KS)`, so only the first 10 of a ranking matter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

KS = (1, 5, 10)
METRICS = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr")


def _dcg(grades: Sequence[float], exponential: bool) -> float:
    return sum(((2.0**g - 1.0) if exponential else g) / math.log2(i + 2) for i, g in enumerate(grades))


def query_metrics(
    ranked: Sequence[Hashable], relevant: Mapping[Hashable, float] | Sequence[Hashable], ks: Sequence[int] = KS
) -> dict[str, float]:
    """V2's metrics of one query. `relevant`: the correct candidates, or {candidate: grade} (graded relevance)."""
    grades = dict(relevant) if isinstance(relevant, Mapping) else dict.fromkeys(relevant, 1.0)
    scores = {}
    for k in ks:
        top = list(ranked[:k])
        found = len(set(top) & grades.keys())
        precision = found / k
        recall = found / len(grades) if grades else 1.0  # V2's convention for a query without answers
        gains = [grades.get(item, 0.0) for item in top]
        ideal = sorted(grades.values(), reverse=True)[:k]
        average_precision, hits = 0.0, 0
        for position, item in enumerate(top, 1):
            if item in grades:
                hits += 1
                average_precision += hits / position
        first = next((position for position, item in enumerate(top, 1) if item in grades), None)
        scores[f"hit@{k}"] = float(found > 0)
        for name, exponential in (("ndcg_linear", False), ("ndcg_exponential", True)):
            ideal_dcg = _dcg(ideal, exponential) if ideal else 1.0
            scores[f"{name}@{k}"] = _dcg(gains, exponential) / ideal_dcg if ideal_dcg > 0 else 0.0
        scores[f"precision@{k}"] = precision
        scores[f"recall@{k}"] = recall
        scores[f"f1@{k}"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[f"map@{k}"] = average_precision / min(len(grades), k) if hits else 0.0
        scores[f"mrr@{k}"] = 1.0 / first if first else 0.0
    return scores


def mean_metrics(per_query: Sequence[Mapping[str, float]], num_data: int, ks: Sequence[int] = KS) -> dict:
    """V2's score file body: each metric's mean over the queries (keys in V2's order), num_pred, num_data."""
    keys = [f"{metric}@{k}" for metric in METRICS for k in ks]
    means = {key: (sum(q[key] for q in per_query) / len(per_query) if per_query else 0.0) for key in keys}
    return {**means, "num_pred": len(per_query), "num_data": num_data}


def v2_results(per_query: Sequence[Mapping[str, float]], num_data: int, output_dir, folder: str, name: str) -> dict:
    """V2's metrics of a set in % (mmfast's results), written as V2's score file
    `<output_dir>/<folder>/<name>_score.json` (fractions, num_pred, num_data) when output_dir is given."""
    scores = mean_metrics(per_query, num_data)
    if output_dir is not None:
        target = Path(output_dir) / folder
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{name}_score.json").write_text(json.dumps(scores, indent=4))
    return {key: 100.0 * value for key, value in scores.items() if key not in ("num_pred", "num_data")}

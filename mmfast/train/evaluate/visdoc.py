"""MMEB-V2's visual-document retrieval (ViDoRe, VisRAG) in the BEIR layout, scored as VLM2Vec V2 does.

Layout (the HF BEIR datasets, e.g. `vidore/arxivqa_test_subsampled_beir`, one config per table):
    <root>/queries/*.parquet   query-id, query (and language in the multilingual sets)
    <root>/corpus/*.parquet    corpus-id, image ({bytes, path} as HF stores it, or a path under image_root)
    <root>/qrels/*.parquet     query-id, corpus-id, score (graded relevance)
As V2 reads them: a qrel counts when its score is > 0 (the highest score of a repeated pair); a query
is "Find a document image that matches the given query: {query}", a page "<|image_1|> Understand the
content of the provided document image."; every query ranks the whole corpus (V2's global ranking)
through `mmfast.similarity_topk` (k = 10), never a queries × corpus matrix; a multi-vector encoder
(ColPali) through `mmfast.late_interaction_topk` over its token vectors (MaxSim). A query without a relevant
page is left out and counted (V2 fails on one). `language` keeps the queries of one language (V2's
`_v2` sets take "english", the `_multilingual` ones all).

Scores: V2's metrics (`mmeb_v2_metrics`, graded NDCG; its leaderboard reads ndcg_linear@5), in % in the
results, as fractions in `<output_dir>/visdoc/<name>_score.json`. A page whose image cannot be read
is left out of the corpus and counted (`num_missing_images`); with strict it is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

import mmfast

from ..records import parquet_table
from .cache import as_cache
from .inputs import ImageChecker, resolve_image
from .mmeb_v2_metrics import KS, query_metrics, v2_results

QUERY_INSTRUCTION = "Find a document image that matches the given query:"
PAGE_TEXT = "<|image_1|> Understand the content of the provided document image."
TABLES = {
    "queries": ("query-id", "query"),
    "corpus": ("corpus-id", "image"),
    "qrels": ("query-id", "corpus-id", "score"),
}
V2_SCORE_FOLDER = "visdoc"


def _table(root: Path, name: str, extra: tuple[str, ...] = ()) -> list[dict]:
    files = sorted((root / name).glob("*.parquet"))
    if not files:
        layout = "BEIR layout: queries, corpus, qrels"
        raise FileNotFoundError(f"visual-document set {root}: no {name}/*.parquet ({layout})")
    rows = []
    for path in files:
        table = parquet_table(path)
        columns = table.column_names
        missing = [c for c in TABLES[name] if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {', '.join(columns)})")
        rows += table.select([*TABLES[name], *(c for c in extra if c in columns)]).to_pylist()
    return rows


def _real(token_vectors):
    return token_vectors.ne(0).any(dim=-1)


def relevant_pages(qrels: list[dict], root: Path) -> dict[str, dict[str, float]]:
    """{query-id: {corpus-id: grade}} of the qrels with a score above 0 (a repeated pair keeps its highest)."""
    mapping: dict[str, dict[str, float]] = {}
    for number, row in enumerate(qrels):
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"{root}/qrels row {number}: score must be a number, got {score!r}")
        if score > 0:
            pages = mapping.setdefault(str(row["query-id"]), {})
            pages[str(row["corpus-id"])] = max(pages.get(str(row["corpus-id"]), 0), score)
    return mapping


def evaluate_visdoc(
    encoder,
    root: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    language: str | None = None,
    output_dir: str | os.PathLike | None = None,
    strict: bool = False,
    cache=None,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """{"visdoc": {name: {V2's metrics in %, "num_queries", "num_pages", ...}}}; see the module docstring."""
    root = Path(root)
    image_root = root if image_root is None else Path(image_root)
    name = name or root.name
    queries = _table(root, "queries", ("language",))
    if language is not None:
        queries = [q for q in queries if q.get("language") == language]
    pages = _table(root, "corpus")
    relevant = relevant_pages(_table(root, "qrels"), root)

    checker = ImageChecker(strict)
    images, page_ids = [], []
    for number, page in enumerate(pages):
        image = resolve_image(image_root, page["image"], f"{root}/corpus row {number}")
        if image is not None and checker.usable(image, f"{root}/corpus row {number}"):
            images.append(image)
            page_ids.append(str(page["corpus-id"]))
    asked = [q for q in queries if str(q["query-id"]) in relevant]
    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    query_vectors = embeddings.embed([f"{QUERY_INSTRUCTION} {q['query']}" for q in asked])
    page_vectors = embeddings.embed([PAGE_TEXT] * len(images), images)

    per_query = []
    if asked and page_ids:
        k = min(max(KS), len(page_ids))
        if query_vectors.dim() == 3:  # multi-vector token vectors, zero at padding
            top = mmfast.late_interaction_topk(query_vectors, page_vectors, k, query_mask=_real(query_vectors),
                                               corpus_mask=_real(page_vectors)).indices  # fmt: skip
        else:
            top = mmfast.similarity_topk(query_vectors, page_vectors, k).indices
        for query, best in zip(asked, top.tolist(), strict=True):
            per_query.append(query_metrics([page_ids[i] for i in best], relevant[str(query["query-id"])]))
    else:
        per_query = [query_metrics([], relevant[str(q["query-id"])]) for q in asked]
    result = v2_results(per_query, len(asked), output_dir, V2_SCORE_FOLDER, name)
    result.update(
        num_queries=len(asked), num_queries_without_relevant_page=len(queries) - len(asked),
        num_pages=len(page_ids), **checker.report(),
    )  # fmt: skip
    return {"visdoc": {name: result}}


__all__ = ["evaluate_visdoc", "relevant_pages"]

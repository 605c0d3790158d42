"""The default's visual-document set, in the BEIR layout of MMEB-V2's ViDoRe sets (`evaluate.visdoc`):
each page a fresh render of one shape, each query a caption of one page. Relevance is graded: the
page itself 2, a page with the same shape in the same colour elsewhere 1."""

from __future__ import annotations

import io
from pathlib import Path

from mmfast.train.default import captions as world
from mmfast.train.default.render import render
from mmfast.train.default.sizes import Sizes
from mmfast.train.default.writing import part_rng


def _write_table(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_visdoc(root: Path, seed: int, image_size: int, sizes: Sizes) -> None:
    folder, rng = root / "visdoc" / "documents", part_rng(seed, "visdoc/documents")
    singles = world.distinct_singles(sizes.visdoc_pages, rng)
    corpus, queries, qrels = [], [], []
    for i, single in enumerate(singles):
        page = io.BytesIO()
        render(world.single_scene(single, rng), image_size).save(page, format="PNG")
        # HF's Image feature, as the published sets store their pages: inline bytes and a file name.
        corpus.append({"corpus-id": f"page{i}", "image": {"bytes": page.getvalue(), "path": f"page{i}.png"}})
        queries.append({"query-id": f"q{i}", "query": world.single_caption(single, rng)})
        for j, other in enumerate(singles):
            if (other.shape, other.colour) == (single.shape, single.colour):
                qrels.append({"query-id": f"q{i}", "corpus-id": f"page{j}", "score": 2 if j == i else 1})
    for table, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        _write_table(folder / table / "test-00000-of-00001.parquet", rows)

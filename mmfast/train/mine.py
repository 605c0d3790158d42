"""`mmfast-mine`: hard negatives from the whole training set, and B3-style batches of mutual hard negatives.

    mmfast-mine --output_dir mined                    # the embedded default's data, mined with runs/llave
    mmfast-mine --model TEACHER --data train.yaml --output_dir mined --k 4 --false_negative_ratio 0.95 \
        --batch_order 64
    mmfast-train --data mined/mixture.json [--batch_order mined/batch_order.jsonl]

Per subset (negatives come from the row's own subset, as VLM2Vec's same-task batches): the queries and
the subset's distinct positives (by content id: text and image path, `collator.content_id`) are embedded
with the model through the evaluator's embedding cache, and `mmfast.similarity_topk` finds each query's
best positives of other rows, without the Q × G score matrix. A row's negatives are its k best
candidates that are
- not its own positive, nor a copy of it (the same content id: one gallery entry stands for every copy);
- not likely false negatives: a candidate scoring above `false_negative_ratio` × the row's positive score
  is dropped (NV-Retriever's TopK-PercPos; 0.95 is the paper's best). The rows whose top 2k + 1
  candidates held fewer than k eligible ones are searched again by one exact scan of the gallery with the
  dropped ones masked out (`_scan_rows`), so a row gets k negatives whenever its subset has that many
  candidates below its threshold, at a cost that does not grow with how many were dropped. When most of
  the first rows need that scan, the others go to it directly (`SCAN_DIRECT_FRACTION`).

`--batch_order G` also writes batches of G rows (the global contrastive batch) built from clusters of
mutual hard negatives (`build_batches`), which `mmfast-train --batch_order` trains on in place of the
shuffled batches. Output files: `mined_files`; the batch order file: `batch_order`.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mmfast.similarity_topk import similarity_topk

from .batch_order import write_batch_order
from .collator import content_id
from .data import Example, Input
from .data_report import BadImageError, BadRowError, DataReport
from .data_spec import load_data, split_of
from .mined_files import write_mined_file, write_spec

logger = logging.getLogger(__name__)
BATCH_ORDER_NAME = "batch_order.jsonl"
DEFAULT_MODEL = os.path.join("runs", "llave")


@dataclass(frozen=True)
class MineOptions:
    """k: negatives per row; false_negative_ratio: drop candidates scoring above this × the positive's
    score (None: keep them); batch_order: the global batch of the batch order (0: none); seed: its order."""

    k: int = 4
    false_negative_ratio: float | None = 0.95
    batch_order: int = 0
    seed: int = 0

    def __post_init__(self):
        for name, low in (("k", 1), ("batch_order", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        ratio = self.false_negative_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not math.isfinite(ratio) or ratio <= 0):  # fmt: skip
            raise ValueError(f"--false_negative_ratio must be a number > 0 (or none), got {ratio!r}")


class MinedNegatives(NamedTuple):
    indices: torch.Tensor  # [Q, k] int64 gallery indices, best first, -1 where a row has fewer
    scores: torch.Tensor  # [Q, k] their scores (NaN where -1)
    positive_scores: torch.Tensor  # [Q] float64
    dropped: torch.Tensor  # [Q] int64: candidates ranked above the last kept one, dropped as false negatives


DEPTH_BUDGET = 1 << 22  # search results (value + index) held at once: 48 MiB
# The exact scan's tiles: SCAN_TILE scores (2 MiB float32), at most SCAN_COLUMNS gallery items wide, so a tile
# and its mask stay in the core's cache while the GEMM writes them and the masking and top-k read them (8 MiB
# tiles of 16 rows x 131,072 items ran at ~6 GFLOP/s, mostly waiting on memory; these run ~5x faster).
SCAN_TILE = 1 << 19
SCAN_COLUMNS = 2048
SCAN_BLOCK = 64  # columns per block of a tile's top-k (`_tile_candidates`)
SCAN_MIN_ROWS = 16  # a scan tile has at least this many rows (when there are): a GEMM, not a GEMV
SCAN_MERGE_EVERY = 64  # tiles whose candidates are kept before they are merged into the best k so far
# Rows searched by the kernel first; when more than SCAN_DIRECT_FRACTION of them need the exact scan, the rest
# skip the kernel's pass: the scan of a row costs ~2.3x the kernel's pass (12 and 28 GFLOP/s at D = 64 here),
# so past ~60% of rows rescanned the kernel's pass is a loss. Both give the same result.
SCAN_PROBE_ROWS = 2048
SCAN_DIRECT_FRACTION = 0.6


def _search_chunk(rows, query, gallery, positive, threshold, k, depth, indices, scores, dropped) -> torch.Tensor:
    """Searches `rows` to `depth`, fills the rows that found k eligible candidates (or saw the whole gallery);
    returns the rows that need a deeper search."""
    # screen="off": the float32 GEMM scores the exact scan's torch.mm gives too, so a row's negatives, their
    # scores and its dropped count are the same bits whichever of the two passes finds them.
    top = similarity_topk(query[rows], gallery, depth, screen="off")
    values = top.values.double()
    not_positive = top.indices != positive[rows, None]
    eligible = not_positive if threshold is None else not_positive & (values <= threshold[rows, None])
    rank = eligible.cumsum(dim=1)
    done = (rank[:, -1] >= k) | (depth == gallery.shape[0])
    kept = eligible & (rank <= k) & done[:, None]
    column = torch.where(kept, torch.arange(depth), depth).sort(dim=1).values[:, :k]
    valid = column < depth
    safe = column.clamp(max=depth - 1)
    finished, width = rows[done], column.shape[1]  # width < k only when the gallery is smaller than k
    indices[finished, :width] = torch.where(valid, top.indices.gather(1, safe), -1)[done]
    scores[finished, :width] = torch.where(valid, values.gather(1, safe), float("nan"))[done]
    # Dropped ones: not eligible, not the positive, ranked before the last kept (or anywhere, if none kept).
    last = torch.where(valid.any(dim=1), safe.masked_fill(~valid, -1).max(dim=1).values, depth - 1)
    before = torch.arange(depth)[None, :] <= last[:, None]
    dropped[finished] = (~eligible & not_positive & before).sum(dim=1)[done]
    return rows[~done]


def _float32_at_most(threshold: torch.Tensor) -> torch.Tensor:
    """The largest float32 <= each float64 threshold: for a float32 score s, s <= t exactly when s <= this."""
    rounded = threshold.float()
    return torch.where(rounded.double() > threshold, torch.nextafter(rounded, torch.tensor(-math.inf)), rounded)


def _negative_infinity_bits(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """The integer type as wide as a float type, and -inf's bit pattern in it."""
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    return integer, int(torch.tensor(-math.inf, dtype=dtype).view(integer))


def _tile_candidates(tile: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best columns of a tile and their values, ties across the k-th value to the lower columns
    (the order within the k is left to the merge).

    A tile of whole SCAN_BLOCKs is searched in the k + 1 blocks with the highest maxima (~10x cheaper than a
    top-k of every score): any score outside them is at most each of their k + 1 maxima, so the k best values
    are among theirs. A top-(k + 1) of those shows where a tie crosses the k-th value (a score outside tied with
    it shows up there too: its block's maximum ties the chosen ones'); only such rows (rare, bar -inf) are
    sorted whole, so the lower columns win."""
    n, width = tile.shape
    if width <= k:
        return tile, torch.arange(width).expand(n, -1)
    blocks = width // SCAN_BLOCK
    if tile.is_contiguous() and width % SCAN_BLOCK == 0 and blocks > k + 1:
        grouped = tile.view(n, blocks, SCAN_BLOCK)
        chosen = grouped.amax(dim=2).topk(k + 1, dim=1).indices
        top = grouped.gather(1, chosen[:, :, None].expand(-1, -1, SCAN_BLOCK)).view(n, -1).topk(k + 1, dim=1)
        top_columns = chosen.gather(1, top.indices // SCAN_BLOCK) * SCAN_BLOCK + top.indices % SCAN_BLOCK
    else:
        top = tile.topk(k + 1, dim=1)
        top_columns = top.indices
    values, columns = top.values[:, :k], top_columns[:, :k]
    tied = ((top.values[:, k] == top.values[:, k - 1]) & (top.values[:, k - 1] > -math.inf)).nonzero()[:, 0]
    if tied.numel():
        columns[tied] = tile[tied].sort(dim=1, descending=True, stable=True).indices[:, :k]
        values[tied] = tile[tied].gather(1, columns[tied])
    return values, columns


def _best_k(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row's candidates (distinct ids), best first, ties to the lower id."""
    by_id = ids.sort(dim=1).indices
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), ids.gather(1, order)


def _scan_rows(rows, query, gallery, positive, threshold, k, indices, scores, dropped) -> None:
    """The exact search of `rows` in one pass over the gallery, for rows whose best candidates are mostly
    dropped: scores in cache-sized tiles (torch.mm: the GEMM similarity_topk's cpu kernel runs), the positive
    and the candidates above the threshold set to -inf before a top-k, so the cost does not grow with how many
    are dropped (a top-k as deep as the dropped ones cost ~80x the GEMM). Each tile's k best are kept and
    merged every SCAN_MERGE_EVERY tiles; their counts of candidates over the threshold add up to `dropped`."""
    n_gallery = gallery.shape[0]
    width = min(k, n_gallery)
    columns = max(1, min(n_gallery, SCAN_COLUMNS))
    block = max(SCAN_MIN_ROWS, SCAN_TILE // columns)
    integer, minus_infinity = _negative_infinity_bits(query.dtype)
    for start in range(0, rows.numel(), block):
        begin = max(0, min(start, rows.numel() - SCAN_MIN_ROWS))  # a short last block reaches back: a GEMM
        block_rows = rows[begin : start + block]
        new = slice(start - begin, None)
        q = query[block_rows]
        n = len(block_rows)
        limit = None
        if threshold is not None:
            limit = threshold[block_rows]
            limit = (_float32_at_most(limit) if q.dtype == torch.float32 else limit.to(q.dtype))[:, None]
        # The positives' places, by tile: (rows, columns) set to -inf there (never counted, never chosen).
        pos = positive[block_rows]
        by_tile = pos.div(columns, rounding_mode="floor")
        order = by_tile.argsort()
        bounds = torch.searchsorted(by_tile[order], torch.arange(-(-n_gallery // columns) + 1)).tolist()
        above = torch.zeros(n, dtype=torch.int64)
        tile = torch.empty(n, columns, dtype=q.dtype)
        best_values, best_ids = torch.empty(n, 0, dtype=q.dtype), torch.empty(n, 0, dtype=torch.int64)
        held_values, held_ids = [], []
        for number, offset in enumerate(range(0, n_gallery, columns)):
            part = gallery[offset : offset + columns]
            out = tile[:, : part.shape[0]]
            torch.mm(q, part.T, out=out)
            own = order[bounds[number] : bounds[number + 1]]
            if own.numel():
                out[own, pos[own] - offset] = -math.inf
            if limit is not None:
                over = out > limit
                above += over.view(torch.uint8).sum(dim=1, dtype=torch.int32)
                # -inf where over: adding 0 or -inf (bit patterns from the mask) is ~5x faster than masked_fill_.
                out.add_(over.to(integer).mul_(minus_infinity).view(q.dtype))
            values, chosen = _tile_candidates(out, width)
            held_values.append(values.clone() if values is out else values)
            held_ids.append(chosen + offset)
            if len(held_values) == SCAN_MERGE_EVERY:
                best_values, best_ids = _best_k(torch.cat([best_values, *held_values], dim=1),
                                                torch.cat([best_ids, *held_ids], dim=1), width)  # fmt: skip
                held_values, held_ids = [], []
        best_values, best_ids = _best_k(torch.cat([best_values, *held_values], dim=1),
                                        torch.cat([best_ids, *held_ids], dim=1), width)  # fmt: skip
        valid = best_values > -math.inf
        target = block_rows[new]
        indices[target, :width] = torch.where(valid, best_ids, -1)[new]
        scores[target, :width] = torch.where(valid, best_values.double(), math.nan)[new]
        dropped[target] = above[new]


def mine_negatives(query: torch.Tensor, gallery: torch.Tensor, positive: torch.Tensor, k: int,
                   false_negative_ratio: float | None) -> MinedNegatives:  # fmt: skip
    """Each query's k best gallery items other than its positive (gallery index `positive[q]`), with
    those scoring above false_negative_ratio × its positive's score left out (see the module note)."""
    n_queries, n_gallery = query.shape[0], gallery.shape[0]
    positive_scores = (query.double() * gallery[positive].double()).sum(dim=1)
    threshold = None if false_negative_ratio is None else false_negative_ratio * positive_scores
    indices = torch.full((n_queries, k), -1, dtype=torch.int64)
    scores = torch.full((n_queries, k), float("nan"), dtype=torch.float64)
    dropped = torch.zeros(n_queries, dtype=torch.int64)
    # First a shallow search with the fused kernel (a well-trained model's rows mostly end here), in chunks of
    # at most ~DEPTH_BUDGET results; then one exact scan of the gallery for the rest. When most of the first
    # SCAN_PROBE_ROWS rows need the scan, the others go to it directly (see SCAN_DIRECT_FRACTION).
    depth = min(n_gallery, 2 * k + 1)
    probe, others = torch.arange(n_queries)[:SCAN_PROBE_ROWS], torch.arange(n_queries)[SCAN_PROBE_ROWS:]
    pending = []
    if probe.numel():
        pending.append(_search_chunk(probe, query, gallery, positive, threshold, k, depth, indices, scores, dropped))
    if pending and pending[0].numel() > SCAN_DIRECT_FRACTION * probe.numel():
        pending.append(others)
    else:
        pending += [_search_chunk(rows, query, gallery, positive, threshold, k, depth, indices, scores, dropped)
                    for rows in others.split(max(1, DEPTH_BUDGET // depth)) if rows.numel()]  # fmt: skip
    if pending and (rest := torch.cat(pending)).numel():
        _scan_rows(rest, query, gallery, positive, threshold, k, indices, scores, dropped)
    return MinedNegatives(indices, scores, positive_scores, dropped)


class MinedSubset(NamedTuple):
    negatives: list[list[Input]]  # per example, best first
    positive: np.ndarray  # [Q] gallery index of each example's positive
    neighbours: np.ndarray  # [Q, k] gallery indices of its negatives (-1: none)
    dropped: int


def mine_subset(examples: Sequence[Example], embed: Callable[[Sequence[Input]], torch.Tensor],
                options: MineOptions) -> MinedSubset:  # fmt: skip
    """Mines one subset: its queries against its distinct positives (see the module note)."""
    gallery_of: dict[int, int] = {}
    gallery: list[Input] = []
    positive = np.empty(len(examples), dtype=np.int64)
    for i, example in enumerate(examples):
        key = content_id(example.positive)
        if key not in gallery_of:
            gallery_of[key] = len(gallery)
            gallery.append(example.positive)
        positive[i] = gallery_of[key]
    queries = embed([e.query for e in examples])
    candidates = embed(gallery)
    mined = mine_negatives(queries, candidates, torch.from_numpy(positive), options.k, options.false_negative_ratio)
    neighbours = mined.indices.numpy()
    negatives = [[gallery[g] for g in row if g >= 0] for row in neighbours]
    return MinedSubset(negatives, positive, neighbours, int(mined.dropped.sum()))


def build_batches(positive: np.ndarray, neighbours: np.ndarray, batch_size: int, seed: int) -> list[np.ndarray]:
    """B3-style batches of `batch_size` rows of one subset. The graph: distinct positives (gallery items),
    an edge between a row's positive and each of its mined negatives, both ways (so mutual hard negatives
    are neighbours whichever of them mined the other). A breadth-first walk over it, adding for each item
    reached one of its rows, is cut into batches: a row's hard negatives sit in its batch as other rows'
    positives, and theirs in turn. A batch takes one row per distinct positive while it can (copies of a
    positive would be masked, not negatives). The walk starts from rows in a seeded random order; the last
    partial batch is left out."""
    n = len(positive)
    rng = np.random.default_rng([seed, 1])
    source = np.repeat(positive, neighbours.shape[1])
    target = neighbours.reshape(-1)
    keep = target >= 0
    edges = np.unique(np.stack([np.concatenate([source[keep], target[keep]]),
                                np.concatenate([target[keep], source[keep]])], axis=1), axis=0)  # fmt: skip
    items = int(positive.max()) + 1 if n else 0
    starts = np.searchsorted(edges[:, 0], np.arange(items + 1))
    owners = collections.defaultdict(list)  # gallery item -> its rows, in random order
    for r in rng.permutation(n):
        owners[int(positive[r])].append(int(r))
    taken_up_to = collections.Counter()
    assigned = np.zeros(n, dtype=bool)
    batches, batch, in_batch, deferred = [], [], set(), []
    queue = collections.deque()

    def add(r: int) -> None:
        nonlocal batch, in_batch
        assigned[r] = True
        batch.append(r)
        item = int(positive[r])
        in_batch.add(item)
        queue.extend(edges[starts[item] : starts[item + 1], 1].tolist())
        if len(batch) == batch_size:
            batches.append(np.asarray(batch, dtype=np.int64))
            batch, in_batch = [], set()

    def owner(item: int) -> int | None:
        rows, i = owners[item], taken_up_to[item]
        while i < len(rows) and assigned[rows[i]]:
            i += 1
        taken_up_to[item] = i
        return rows[i] if i < len(rows) else None

    for start in rng.permutation(n):
        if assigned[start]:
            continue
        if int(positive[start]) in in_batch:
            deferred.append(int(start))
            continue
        add(int(start))
        while queue:
            item = queue.popleft()
            if item not in in_batch and (r := owner(item)) is not None:
                add(r)
    for r in deferred:  # rows whose positive was in the batch at their turn: wherever they fit now
        if not assigned[r]:
            add(r)
    return batches


def _rows_by_file(examples: Sequence[Example]) -> dict[str, list[int]]:
    """The positions of the examples of each data file (absolute path), in order. One pass over the rows
    with one path resolution per distinct file name (it resolved two paths per row, once per file)."""
    rows_of: dict[str, list[int]] = collections.defaultdict(list)
    absolute: dict[str, str] = {}
    for i, example in enumerate(examples):
        name = example.source
        if name not in absolute:
            absolute[name] = os.path.abspath(name)
        rows_of[absolute[name]].append(i)
    return rows_of


def _embedder(encoder, cache, batch_size: int, show_progress: bool, phases: dict):
    from .evaluate.cache import as_cache

    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
    phases["embed"] = 0.0

    def embed(inputs: Sequence[Input]) -> torch.Tensor:
        start = time.perf_counter()
        out = embeddings.embed([i.text for i in inputs], [i.image for i in inputs])
        phases["embed"] += time.perf_counter() - start
        return out

    return embed, embeddings


def _ratio(value: str) -> float | None:
    if value.lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or none, got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmfast-mine",
        description="Mine hard negatives for every training row from the whole training set (each row's own "
        "subset) with an embedding model, and optionally a B3-style batch order. Writes <output_dir>/mixture.json "
        f"(train on it with mmfast-train --data), the mined data files, {BATCH_ORDER_NAME} with --batch_order, "
        "and mine_report.json.",
    )
    p.add_argument("--model", help="the model that embeds (an Encoder or HF model folder): a teacher, or the model "
                   f"being trained; default: {DEFAULT_MODEL}, the default run's output, if it exists")  # fmt: skip
    p.add_argument("--data", nargs="+", help="as mmfast-train --data (files, folders or a spec); default: the "
                   "embedded default's training data")  # fmt: skip
    p.add_argument("--image_dir", help="root of the image paths in the data (as mmfast-train)")
    p.add_argument("--mmeb_split", default="original", help="MMEB-train instruction split (default: original)")
    p.add_argument("--num_sample_per_subset", type=int, help="mine the first N rows of each subset only")
    p.add_argument("--strict", action="store_true", help="a bad row is an error naming the file and row")
    p.add_argument("--output_dir", required=True, help="where the mined files go (created)")
    p.add_argument("--k", type=int, default=4, help="hard negatives per row (default: 4; NLI .csv holds 1)")
    p.add_argument("--false_negative_ratio", type=_ratio, default=0.95, metavar="R|none",
                   help="drop candidates scoring above R × the row's positive score as likely false negatives "
                   "(NV-Retriever's TopK-PercPos); none keeps them (default: 0.95)")  # fmt: skip
    p.add_argument("--batch_order", type=int, default=0, metavar="G",
                   help=f"also write {BATCH_ORDER_NAME}: batches of G rows (the global contrastive batch: "
                   "per_device_train_batch_size × processes) of mutual hard negatives, one subset per batch, "
                   "from the subsets of weight > 0; 0 = none (default)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order's walk (default: 0)")
    p.add_argument("--batch_size", type=int, default=64, help="inputs per forward when embedding (default: 64)")
    p.add_argument("--cache", default=None, help="embedding cache folder (default: <output_dir>/embedding_cache; "
                   "none: in memory only)")  # fmt: skip
    p.add_argument("--cpu_threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def run_mine(argv: Sequence[str] | None = None) -> dict:
    """Parses `mmfast-mine` arguments, mines, writes the files; returns the report (also mine_report.json)."""
    from .command import progress_bars
    from .default import default_data
    from .encoder import Encoder
    from .model_source import check_model_source

    args = parser().parse_args(argv)
    options = MineOptions(args.k, args.false_negative_ratio, args.batch_order, args.seed)
    for name in ("batch_size", "cpu_threads", "num_sample_per_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    start = time.perf_counter()
    report = DataReport(strict=args.strict)
    with progress_bars(not args.no_progress):  # datasets' bar as a data file is converted to Arrow
        data = load_data(args.data or default_data().train_spec, image_dir=args.image_dir, strict=args.strict,
                         mmeb_split=args.mmeb_split, num_sample_per_subset=args.num_sample_per_subset,
                         report=report)  # fmt: skip
    for source in data.sources:
        if source.teacher is not None:
            raise ValueError(f"--data: subset {source.name!r} has a teacher file: distillation takes no hard negatives")
        if source.format == "nli" and options.k != 1:
            raise ValueError(f"--k {options.k}: subset {source.name!r} is NLI triplets (.csv), which hold one "
                             "hard_neg per row; use --k 1")  # fmt: skip
    model = args.model or DEFAULT_MODEL
    if args.model is None and not os.path.isfile(os.path.join(DEFAULT_MODEL, "mmfast_encoder.json")):
        raise ValueError(f"no --model and no {DEFAULT_MODEL}: train the default first (mmfast-train), or give --model")
    check_model_source(model, "--model")
    with progress_bars(not args.no_progress):
        encoder = Encoder.from_pretrained(model)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    cache = None if args.cache == "none" else (args.cache or output / "embedding_cache")
    phases = {"load": time.perf_counter() - start}
    embed, embeddings = _embedder(encoder, cache, args.batch_size, not args.no_progress, phases)
    phases |= {"search": 0.0, "write": 0.0, "batch_order": 0.0}

    written: dict[str, list[Path]] = {}
    files: list[Path] = []
    order: list[list[tuple[int, int]]] = []
    subsets = {}
    for source, offset, size in zip(data.sources, data.mixture.offsets, data.mixture.sizes, strict=True):
        examples = data.mixture.items[offset : offset + size]
        began = time.perf_counter()
        embedded = phases["embed"]
        try:
            mined = mine_subset(examples, embed, options)
        except BadImageError as error:  # name the row, as training would (which skips it and counts it)
            bad = next((e for e in examples if error.path in (e.query.image, e.positive.image)), None)
            if bad is None:
                raise
            raise BadRowError(bad.source, bad.row, f"{error}; fix or remove the row to mine") from None
        phases["search"] += time.perf_counter() - began - (phases["embed"] - embedded)
        writing = time.perf_counter()
        located = [(0, 0)] * len(examples)  # (file number, row in the mined file) of each example
        written[source.name] = []
        rows_of = _rows_by_file(examples)
        for path in source.paths:
            own = rows_of.get(os.path.abspath(path), [])
            if not own:
                continue
            target = write_mined_file(source, path, [examples[i] for i in own], [mined.negatives[i] for i in own],
                                      output, options.k)  # fmt: skip
            for new_row, i in enumerate(own):
                located[i] = (len(files), new_row)
            files.append(target)
            written[source.name].append(target)
        batches, phases["write"] = [], phases["write"] + time.perf_counter() - writing
        if options.batch_order and (source.weight is None or source.weight > 0):
            building = time.perf_counter()
            batches = build_batches(mined.positive, mined.neighbours, options.batch_order, options.seed)
            order += [[located[i] for i in batch] for batch in batches]
            phases["batch_order"] += time.perf_counter() - building
        counts = np.array([len(n) for n in mined.negatives])
        subsets[source.name] = {
            "rows": len(examples), "distinct_positives": int(mined.positive.max()) + 1,
            "rows_with_k_negatives": int((counts == options.k).sum()), "mean_negatives": float(counts.mean()),
            "false_negatives_dropped": mined.dropped, "batches": len(batches),
            "rows_in_no_batch": len(examples) - len(batches) * options.batch_order if options.batch_order else None,
            "seconds": round(time.perf_counter() - began, 2),
        }  # fmt: skip
        logger.info("mined %s: %s", source.name, subsets[source.name])
    spec = write_spec(output, data.sources, written,
                      {s.name: split_of(s.paths[0]) or args.mmeb_split for s in data.sources})  # fmt: skip
    result = {"model": str(model), "options": vars(args) | {"false_negative_ratio": options.false_negative_ratio},
              "spec": str(spec), "subsets": subsets, "skipped_rows": report.total,
              "embedded": embeddings.num_encoded, "reused_from_cache": embeddings.num_reused}  # fmt: skip
    if options.batch_order:
        if not order:
            raise ValueError(f"--batch_order {options.batch_order}: no subset of weight > 0 has that many rows")
        write_batch_order(output / BATCH_ORDER_NAME, files, order, options.batch_order)
        result["batch_order"] = str(output / BATCH_ORDER_NAME)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["phases"] = {name: round(seconds, 2) for name, seconds in phases.items()}
    (output / "mine_report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"mmfast-mine: wrote {spec} ({sum(s['rows'] for s in subsets.values())} rows)"
          + (f" and {result['batch_order']} ({len(order)} batches)" if options.batch_order else ""))  # fmt: skip
    if report.total:
        print(report.summary(), file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from .command import run_command

    return run_command(run_mine, "mmfast-mine", argv)


if __name__ == "__main__":
    sys.exit(main())

"""The collator: a list of Examples -> the rows of a contrastive batch and its GradCache mini-batches.

Every image is decoded here once, in the data loader's workers, to check it: a row whose image cannot
be read is left out of the batch and reported in the batch itself (`report`), so the trainer's count
survives worker processes; with `strict` it is an error naming the file and row. The mini-batches'
model inputs are not built here: `MiniBatches` builds each one when the step encodes it, so a step's
memory does not grow with the contrastive batch (`mini_batches.py`).

Every side also gets a content id (`content_id`: its text and its image's path), so the loss can
leave out the copies of a positive among the candidates (mmfast.contrastive_loss's candidate_ids):
in a batch of MMEB classification rows many queries share one label text as their positive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .data import Example, Input, load_image
from .data_report import BadImageError, DataReport
from .encoder import InputBuilder
from .mini_batches import MiniBatches, MiniBatching, pack_by_tokens, padded_tokens

CHUNK_ROWS = 64  # rows whose decoded images the collator holds at once


def kept_negatives(example: Example, max_negatives: int | None) -> tuple[Input, ...]:
    """The hard negatives of a row the loss sees: its first `max_negatives` (all when None). The collator
    and the plan's count (`run.hard_negatives`) both read this."""
    return example.negatives if max_negatives is None else example.negatives[:max_negatives]


def content_id(side: Input) -> int:
    """A stable 63-bit id of what the encoder sees of `side`: its text and its image's path. Equal
    inputs get equal ids in every process and run (no Python hash seed); distinct ones collide with
    odds of about 2^-64 per pair."""
    digest = hashlib.blake2b(f"{side.text}\0{side.image or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class EmbeddingCollator:
    """examples -> {"mini_batches": MiniBatches, "ids", "teacher", "report", "rows"}.

    mini_batches: a sequence of {"query", "target"[, "negatives"]: model inputs}, each built when read.

    ids: {"candidate": int64 [B + M] content ids of the targets then of the negatives (in the order
    the mini-batches' embeddings concatenate to), "query": int64 [B] of the queries}.

    mini_batching: the run's GradCache mini-batches (`mini_batches.MiniBatching`; None: no GradCache):
        at most `rows` rows each (0 = the whole batch in one); with `tokens` > 0, rows are packed in order
        into mini-batches of at most that many tokens (`mini_batches.pack_by_tokens`: every side, padded,
        image tokens included, counted by the processor here), and of at most `rows` rows when that is
        > 0 too. A row over the budget alone gets a mini-batch of its own and is listed in the batch's
        "oversized" (source, row, tokens).
    teacher: the teacher embeddings (UniME stage 1), indexed by each example's `teacher` row.
    max_negatives: use at most this many hard negatives of each row.
    """

    def __init__(
        self,
        builder: InputBuilder,
        *,
        mini_batching: MiniBatching | None = None,
        teacher=None,
        max_negatives: int | None = None,
        strict: bool = False,
    ):
        mini_batching = MiniBatching() if mini_batching is None else mini_batching
        if not isinstance(mini_batching, MiniBatching):
            raise TypeError(f"mini_batching must be a MiniBatching, got {type(mini_batching).__name__}")
        self.builder, self.mini_batching, self.teacher = builder, mini_batching, teacher
        self.max_negatives, self.strict = max_negatives, strict

    def _load(self, example: Example, report: DataReport) -> tuple[tuple[Input, ...], list] | None:
        """The row's sides and their decoded images; None, reported, when an image cannot be decoded."""
        sides = (example.query, example.positive, *kept_negatives(example, self.max_negatives))
        images = []
        for side in sides:
            if side.image is None:
                images.append(None)
                continue
            try:
                images.append(load_image(side.image))
            except BadImageError as error:
                report.skip(example.source, example.row, "unreadable image", path=error.path)
                return None
        return sides, images

    def _token_counts(self, loaded) -> list[tuple[int, ...]]:
        """Each row's sides' token counts, as the processor makes them (image tokens, truncation)."""
        sides = [side for sides, _ in loaded for side in sides]
        images = [image for _, images in loaded for image in images]
        counts = self.builder(sides, images)["attention_mask"].sum(dim=1).tolist()
        out, start = [], 0
        for row_sides, _ in loaded:
            out.append(tuple(counts[start : start + len(row_sides)]))
            start += len(row_sides)
        return out

    @staticmethod
    def _ids(rows) -> dict[str, torch.Tensor]:
        targets = [sides[1] for sides in rows]
        negatives = [side for sides in rows for side in sides[2:]]
        queries = [sides[0] for sides in rows]

        def ids(sides):
            return torch.tensor([content_id(side) for side in sides], dtype=torch.int64)

        return {"candidate": ids(targets + negatives), "query": ids(queries)}

    def __call__(self, examples: Sequence[Example]) -> dict:
        report = DataReport(strict=self.strict)
        if getattr(examples, "skipped", None) is not None:  # rows a stream skipped to read this batch (streaming.py)
            report.merge(examples.skipped)
        kept, rows, lengths = [], [], []
        # A chunk of rows at a time: every image is decoded once here, to check it (and, with a token
        # budget, to count its tokens), and dropped with its chunk; the step decodes it again.
        for start in range(0, len(examples), CHUNK_ROWS):
            chunk = examples[start : start + CHUNK_ROWS]
            loaded = [(example, got) for example in chunk if (got := self._load(example, report)) is not None]
            if self.mini_batching.tokens and loaded:
                lengths += self._token_counts([got for _, got in loaded])
            kept += [example for example, _ in loaded]
            rows += [sides for _, (sides, _) in loaded]
        oversized = []
        if self.mini_batching.tokens:
            bounds, oversized = pack_by_tokens(lengths, self.mini_batching.tokens, self.mini_batching.rows)
        else:
            bounds = self.mini_batching.bounds(len(rows))
        mini_batches = MiniBatches(self.builder, rows, bounds)
        batch = {"mini_batches": mini_batches, "report": report, "rows": len(rows), "ids": self._ids(rows)}
        if oversized:
            batch["oversized"] = [(kept[i].source, kept[i].row, padded_tokens([lengths[i]])) for i in oversized]
        if self.teacher is not None and kept:
            query, positive = self.teacher.rows(kept)
            batch["teacher"] = {"query": query, "target": positive}
        return batch

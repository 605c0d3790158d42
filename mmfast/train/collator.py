"""The collator: a list of Examples -> GradCache mini-batches of model-ready tensors.

Images are decoded here, in the data loader's workers. A row whose image cannot be read is left out
of the batch and reported in the batch itself (`skipped`), so the trainer's count survives worker
processes; with `strict` it is an error naming the file and row.

Every side also gets a content id (`content_id`: its text and its image's path), so the loss can
leave out the copies of a positive among the candidates (mmfast.contrastive_loss's candidate_ids):
in a batch of MMEB classification rows many queries share one label text as their positive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .data import BadImageError, DataReport, Example, Input, load_image
from .encoder import InputBuilder


def content_id(side: Input) -> int:
    """A stable 63-bit id of what the encoder sees of `side`: its text and its image's path. Equal
    inputs get equal ids in every process and run (no Python hash seed); distinct ones collide with
    odds of about 2^-64 per pair."""
    digest = hashlib.blake2b(f"{side.text}\0{side.image or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class EmbeddingCollator:
    """examples -> {"mini_batches": [{"query", "target"[, "negatives"]}], "ids", "teacher", "report", "rows"}.

    ids: {"candidate": int64 [B + M] content ids of the targets then of the negatives (in the order
    the mini-batches' embeddings concatenate to), "query": int64 [B] of the queries}.

    mini_batch_size: rows per GradCache mini-batch (0 = the whole batch in one).
    teacher: the teacher embeddings (UniME stage 1), indexed by each example's `teacher` row.
    max_negatives: use at most this many hard negatives of each row.
    """

    def __init__(
        self,
        builder: InputBuilder,
        *,
        mini_batch_size: int = 0,
        teacher=None,
        max_negatives: int | None = None,
        strict: bool = False,
    ):
        self.builder, self.mini_batch_size, self.teacher = builder, mini_batch_size, teacher
        self.max_negatives, self.strict = max_negatives, strict

    def _load(self, example: Example, report: DataReport):
        negatives = example.negatives if self.max_negatives is None else example.negatives[: self.max_negatives]
        sides = (example.query, example.positive, *negatives)
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

    @staticmethod
    def _ids(loaded) -> dict[str, torch.Tensor]:
        targets = [sides[1] for _, (sides, _) in loaded]
        negatives = [side for _, (sides, _) in loaded for side in sides[2:]]
        queries = [sides[0] for _, (sides, _) in loaded]

        def ids(sides):
            return torch.tensor([content_id(side) for side in sides], dtype=torch.int64)

        return {"candidate": ids(targets + negatives), "query": ids(queries)}

    def __call__(self, examples: Sequence[Example]) -> dict:
        report = DataReport(strict=self.strict)
        loaded = [(example, got) for example in examples if (got := self._load(example, report)) is not None]
        step = self.mini_batch_size or max(len(loaded), 1)
        mini_batches = []
        for start in range(0, len(loaded), step):
            part = loaded[start : start + step]
            mini_batch = {
                "query": self.builder([sides[0] for _, (sides, _) in part], [images[0] for _, (_, images) in part]),
                "target": self.builder([sides[1] for _, (sides, _) in part], [images[1] for _, (_, images) in part]),
            }
            negative_items = [item for _, (sides, _) in part for item in sides[2:]]
            if negative_items:
                negative_images = [image for _, (_, images) in part for image in images[2:]]
                mini_batch["negatives"] = self.builder(negative_items, negative_images)
            mini_batches.append(mini_batch)
        batch = {"mini_batches": mini_batches, "report": report, "rows": len(loaded), "ids": self._ids(loaded)}
        if self.teacher is not None and loaded:
            query, positive = self.teacher.rows([example for example, _ in loaded])
            batch["teacher"] = {"query": query, "target": positive}
        return batch

"""Text-to-text NLI retrieval: is a premise's entailment its nearest sentence?

Layout: a CSV in SimCSE's `nli_for_simcse.csv` layout (sent0 = premise, sent1 = entailment, hard_neg =
contradiction), one triplet per row, none of them seen in training (the default writes
`eval/nli/nli_heldout.csv`). Each premise is a query; the gallery is every row's entailment and
contradiction (2 × rows sentences). Scores:
    p2e_R@1/5/10, MdR, MnR   the premise's own entailment among the whole gallery (chance 1 / gallery)
    acc                      cos(premise, entailment) > cos(premise, contradiction), strictly (chance 50%)
    length_only_acc          a blind baseline for acc: the shorter of the two called right (a tie: half)
This is what E5-V's text-only training (premise -> entailment, contradiction as its hard negative) is
meant to learn, on sentences it never saw; it says nothing of the image side.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..records import csv_header, csv_rows
from .cache import as_cache
from .inputs import BARE_CAPTION
from .metrics import RECALL_KS, accuracy, mean_rank, median_rank, recall_at_k, retrieval_ranks

COLUMNS = ("sent0", "sent1", "hard_neg")


def read_triplets(path: Path) -> list[tuple[str, str, str]]:
    """The CSV's (premise, entailment, contradiction) rows; errors name the file and row."""
    if not path.is_file():
        raise FileNotFoundError(f"NLI file {path} not found")
    missing = [c for c in COLUMNS if c not in csv_header(path)]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    rows = []
    for line, _, record in csv_rows(path):
        values = tuple(record[c].strip() for c in COLUMNS)
        if not all(values):
            raise ValueError(f"{path} line {line}: an empty {COLUMNS[values.index('')]}")
        rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def length_only_wins(rows) -> float:
    """How many rows a blind scorer gets right by calling the shorter of entailment and contradiction
    right (a tie: half)."""
    wins = 0.0
    for _, entailment, contradiction in rows:
        wins += 1.0 if len(entailment) < len(contradiction) else 0.5 if len(entailment) == len(contradiction) else 0.0
    return wins


def evaluate_nli(
    encoder,
    data: str | os.PathLike,
    image_root=None,
    *,
    name: str | None = None,
    strict: bool = False,
    cache=None,
    text_prompt: str = BARE_CAPTION,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Returns {"nli": {name: {"p2e_R@1", "p2e_R@5", "p2e_R@10", "p2e_MdR", "p2e_MnR", "acc",
    "length_only_acc", "num_correct", "num_pred", "num_rows", "num_candidates"}}} (rates in %).
    text_prompt wraps each sentence ("{text}": as is, and an encoder with its own template, E5-V's
    one-word prompt, applies it). image_root and strict are taken for a uniform signature: there are
    no images, and every malformed row is an error."""
    del image_root, strict
    path = Path(data)
    if "{text}" not in text_prompt:
        raise ValueError(f"text_prompt must hold {{text}} where the sentence goes, got {text_prompt!r}")
    rows = read_triplets(path)
    embeddings = as_cache(encoder, cache, batch_size=batch_size, show_progress=show_progress)

    def embed(column: int) -> torch.Tensor:
        return embeddings.embed([text_prompt.replace("{text}", row[column]) for row in rows])

    premises, entailments, contradictions = embed(0), embed(1), embed(2)
    gallery = torch.cat([entailments, contradictions])
    ranks = retrieval_ranks(premises, gallery, torch.arange(len(rows)))
    wins = (premises * entailments).sum(dim=1) > (premises * contradictions).sum(dim=1)
    metrics = {f"p2e_R@{k}": value for k, value in recall_at_k(ranks, RECALL_KS).items()}
    metrics |= {"p2e_MdR": median_rank(ranks), "p2e_MnR": mean_rank(ranks)}
    metrics |= accuracy(int(wins.sum()), len(rows))
    metrics |= {"length_only_acc": 100.0 * length_only_wins(rows) / len(rows), "num_rows": len(rows),
                "num_candidates": gallery.shape[0]}  # fmt: skip
    return {"nli": {name or path.stem: metrics}}

"""MMEB's image placeholder, `<|image_1|>`: where an input's text puts its image. Training rows,
evaluation sets, prompts and `Encoder.encode` all write it; each Encoder rewrites it for its backbone
(`backbones.rewrite_image_tokens`). Defined here once, and its rule written here once (`placeholder_rule`):
an input holds it at most once, and only with an image. The training loader applies the same rule to
whole columns at a time (`placeholder_problems`), everything else to one text (`placeholder_problem`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<|image_1|>"


def placeholder_rule(count, has_image, what: str) -> Sequence[tuple[np.bool_ | np.ndarray, str]]:
    """The rule as (holds, reason) pairs in the order they are checked: a text's problem is the first
    reason that holds. `count` (the placeholders in the text) and `has_image` are one text's, or
    numpy arrays of a column's, element by element. The reasons name the placeholder and `what` the
    text is ("query", "positive" …), never the count, so that a report counting rows by reason counts
    them together."""
    return (
        (np.greater(count, 1), f"several {IMAGE_PLACEHOLDER} in one {what}"),
        (np.greater(count, 0) & np.logical_not(has_image), f"{IMAGE_PLACEHOLDER} without an image"),
    )


def placeholder_problem(text: str, has_image: bool, what: str = "input") -> str | None:
    """Why `text` cannot go with its image (or its lack of one), or None."""
    rule = placeholder_rule(text.count(IMAGE_PLACEHOLDER), has_image, what)
    return next((reason for holds, reason in rule if holds), None)


def placeholder_problems(count: np.ndarray, has_image: np.ndarray, what: str) -> list[tuple[np.ndarray, str]]:
    """`placeholder_rule` over a column: (rows, reason) pairs, each row under the first reason that holds
    for it, as `placeholder_problem` would name it. `count`: each row's placeholders."""
    unclaimed = np.ones(len(count), bool)
    problems = []
    for holds, reason in placeholder_rule(count, has_image, what):
        rows = holds & unclaimed
        unclaimed &= ~rows
        problems.append((rows, reason))
    return problems


def placeholder_reasons(what: str) -> tuple[str, ...]:
    """Every reason the rule can give for a `what` text."""
    return tuple(reason for _, reason in placeholder_rule(0, False, what))

"""MMEB's image placeholder, `<|image_1|>`: where an input's text puts its image. Training rows,
evaluation sets, prompts and `Encoder.encode` all write it; each Encoder rewrites it for its backbone
(`backbones.rewrite_image_tokens`). Defined here once, and checked here once: an input holds it at most
once, and only with an image."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<|image_1|>"


def placeholder_problem(text: str, has_image: bool, what: str = "input") -> str | None:
    """Why `text` cannot go with its image (or its lack of one), or None. The message names the
    placeholder and `what` the text is ("query", "positive" …), never the count, so that a report
    counting rows by reason counts them together."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count > 1:
        return f"several {IMAGE_PLACEHOLDER} in one {what}"
    if count and not has_image:
        return f"{IMAGE_PLACEHOLDER} without an image"
    return None

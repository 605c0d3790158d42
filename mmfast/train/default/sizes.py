"""How much of each part of the default data `generate` writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmfast.train.default import captions as world


@dataclass(frozen=True)
class Sizes:
    """How much of each part to write. `flickr_images`, `urban_pairs` and the MSCOCO_t2i eval rows
    are distinct pictures, at most 256 (shape x colour x quadrant)."""

    train_classification: int = 1500
    train_vqa: int = 1500
    train_t2i: int = 3000
    train_i2t: int = 3000
    train_grounding: int = 1000
    # Held-out sizes for an evaluation of ~30 s on 2 cores: every set keeps >= 100 queries, Flickr >= 200 pairs.
    eval_rows: int = 100
    eval_candidates: int = 20  # at most; VQA has 24 answers, grounding as many crops as there are
    flickr_images: int = 256
    urban_pairs: int = 100
    sugarcrepe_rows: int = 40
    nli_rows: int = 2000
    videos: int = 50
    video_frames: int = 4
    visdoc_pages: int = 100  # distinct pictures, one query each
    nli_heldout_rows: int = 200  # NLI triplets whose sentences the training CSV never holds (E5-V's held-out set)

    @classmethod
    def tiny(cls) -> Sizes:
        """A few rows of everything (tests)."""
        return cls(12, 12, 12, 12, 8, 6, 5, 12, 6, 4, 12, 4, 3, 8, nli_heldout_rows=8)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Sizes.{f.name} must be an int >= 1, got {value!r}")
        limit = len(world.ALL_SINGLES)
        for name in ("flickr_images", "urban_pairs", "eval_rows", "visdoc_pages"):
            if getattr(self, name) > limit:
                raise ValueError(f"Sizes.{name} = {getattr(self, name)}: the world has only {limit} distinct pictures")
        if not 2 <= self.eval_candidates <= 64:
            raise ValueError(f"Sizes.eval_candidates must be in 2..64, got {self.eval_candidates}")

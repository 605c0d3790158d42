"""The contrastive batch of a run in plain numbers: what is per device, what is global, what each
query is contrasted against. Logged at the start of every run and printed by `--dry-run`.

With P processes, B rows per device, K hard negatives per row and `cross_device` on (every recipe's
default), the loss of each query sees
    B·P − 1 in-batch negatives (the other rows' targets, gathered from every rank) and
    K·B·P hard negatives (every row's hard negatives are shared by the whole batch),
of which (B·(P − 1))·(1 + K) come from other devices. The GradCache mini-batch M only sets how many
rows are encoded at once (peak activation memory): the loss still sees the whole batch, exactly.
Gradient accumulation averages separate contrastive batches: it adds no negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .recipes import Recipe

SMALL_CONTRASTIVE_BATCH = 8


@dataclass(frozen=True)
class BatchPlan:
    """per_device: rows per device per step (`per_device_train_batch_size`); processes: data-parallel
    ranks; hard_per_row: hard negatives per row (None: not known until the data is read)."""

    recipe: Recipe
    per_device: int
    processes: int
    hard_per_row: float | None
    mini_batch: int
    gradient_accumulation: int = 1
    mini_batch_tokens: int = 0

    @property
    def gathered(self) -> bool:
        return bool(getattr(self.recipe.loss, "cross_device", False)) and self.processes > 1

    @property
    def contrastive(self) -> int:
        """Rows in one contrastive matrix: every rank's when gathered, else this device's."""
        return self.per_device * (self.processes if self.gathered else 1)

    @property
    def hard(self) -> float | None:
        if self.recipe.is_distillation:
            return 0.0
        return None if self.hard_per_row is None else self.hard_per_row * self.contrastive

    @property
    def cross_device(self) -> float:
        """Negatives of each query that come from other ranks (targets and their hard negatives)."""
        if not self.gathered:
            return 0.0
        hard = 0.0 if self.recipe.is_distillation or self.hard_per_row is None else self.hard_per_row
        return self.per_device * (self.processes - 1) * (1 + hard)

    def lines(self) -> list[str]:
        loss = self.recipe.loss
        processes = f"{self.per_device} per device × {self.processes} process(es)"
        if self.gathered:
            processes += ", gathered across devices"
        elif self.processes > 1:
            processes += "; cross_device off: each device's loss sees its own rows only"
        lines = [f"contrastive batch: {self.contrastive} ({processes})"]
        if self.recipe.is_distillation:
            lines.append(
                f"distillation: each query's similarity distribution over the {self.contrastive} in-batch targets"
                f" (teacher's against student's)"
            )
        else:
            hard = f"{self.hard:g} hard" if self.hard is not None else f"{self.contrastive} × the rows' hard negatives"
            line = f"negatives per query: {self.contrastive - 1} in-batch + {hard}"
            if self.gathered:
                line += f" (of which cross-device: {self.cross_device:g})"
            lines.append(line)
            if getattr(loss, "topk", None):
                margin = getattr(loss, "false_negative_margin", None)
                kept = f"after the false-negative margin {margin:g}, " if margin is not None else ""
                lines.append(f"  the loss keeps, {kept}the {loss.topk} highest-scoring of them per query")
            if getattr(loss, "symmetric", False):
                lines.append(
                    f"  symmetric: each target is also contrasted with the other {self.contrastive - 1} queries"
                )
        if self.mini_batch_tokens:
            rows = f" and {self.mini_batch} rows" if self.mini_batch else ""
            lines.append(f"GradCache mini-batches: at most {self.mini_batch_tokens} tokens{rows} each (every side of "
                         "their rows, padded, image tokens included)")  # fmt: skip
        elif self.mini_batch:
            count = math.ceil(self.per_device / self.mini_batch)
            lines.append(f"GradCache mini-batch: {self.mini_batch} ({count} mini-batch(es) per device per step)")
        else:
            lines.append("GradCache mini-batch: off (the whole batch in one graph)")
        return lines

    def warnings(self) -> list[str]:
        """Where a setting does not do what users often expect of it."""
        out = []
        if self.gradient_accumulation > 1 and not self.recipe.is_distillation:
            out.append(
                f"gradient_accumulation_steps={self.gradient_accumulation} averages gradients of separate "
                "contrastive batches: it adds no negatives. To grow the contrastive batch, raise "
                "per_device_train_batch_size and set gradcache_mini_batch_size."
            )
        if self.contrastive < SMALL_CONTRASTIVE_BATCH:
            out.append(
                f"the contrastive batch is {self.contrastive} rows: with so few in-batch negatives the loss can "
                "collapse towards 0. Use a larger per_device_train_batch_size (with GradCache if memory is short)."
            )
        if self.mini_batch >= self.per_device > 0:
            out.append(
                f"gradcache_mini_batch_size={self.mini_batch} is not below the per-device batch ({self.per_device}): "
                "one mini-batch per step, so GradCache only adds a second forward; use a smaller one, or 0"
            )
        return out

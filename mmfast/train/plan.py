"""The contrastive batch of a run in plain numbers: what is per device, what is global, what each
query is contrasted against. Logged at the start of every run and printed by `--dry-run`, from the
run's resolved options (the recipe's defaults under the user's overrides), never the recipe's alone.

With P processes, B rows per device, K hard negatives per row and `cross_device` on (every recipe's
default), the loss of each query sees
    B·P − 1 in-batch negatives (the other rows' targets, gathered from every rank) and
    K·B·P hard negatives (every row's hard negatives are shared by the whole batch),
of which (B·(P − 1))·(1 + K) come from other devices. Where rows hold different K, the hard count
of a query depends on its batch: the plan gives the mean and the range (the B·P rows holding the
fewest to the B·P holding the most). The GradCache mini-batch M only sets how many rows are encoded
at once (peak activation memory): the loss still sees the whole batch, exactly. Gradient
accumulation averages separate contrastive batches: it adds no negatives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from mmfast import DistillationLossOptions, LateInteractionLossOptions, SigmoidLossOptions

from .mini_batches import MiniBatching
from .recipes import Recipe
from .run_config import LossOptions, RunConfig

SMALL_CONTRASTIVE_BATCH = 8


@dataclass(frozen=True)
class HardNegatives:
    """How many hard negatives the data's rows hold: `histogram` is (count, rows holding it), ascending."""

    histogram: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, counts: Iterable[int]) -> HardNegatives:
        histogram = tuple(sorted(Counter(counts).items()))
        if not histogram:
            raise ValueError("hard negative counts: no rows")
        return cls(histogram)

    @property
    def mean(self) -> float:
        rows = sum(n for _, n in self.histogram)
        return sum(k * n for k, n in self.histogram) / rows

    def _sum_of(self, rows: int, buckets: Sequence[tuple[int, int]]) -> int:
        """The hard negatives of the first `rows` rows in the buckets' order; rows past the data's
        (the uniform default, known without its data) count as the first bucket's again."""
        total, left = 0, rows
        for count, holding in buckets:
            taken = min(left, holding)
            total, left = total + taken * count, left - taken
        return total + left * buckets[0][0]

    def in_rows(self, rows: int) -> tuple[int, float, int]:
        """The hard negatives of `rows` rows drawn together: the fewest, the mean, the most."""
        return self._sum_of(rows, self.histogram), rows * self.mean, self._sum_of(rows, self.histogram[::-1])


def _count(numbers: tuple[int, float, int], noun: str) -> str:
    """A count per query: an integer when every batch gives the same, else the mean and the range."""
    fewest, mean, most = numbers
    return f"{fewest} {noun}" if fewest == most else f"{mean:.1f} {noun} on average ({fewest} to {most} by batch)"


# Options every loss has that say how, not what, it computes (the backend, the reduction, gathering:
# the batch lines say what gathering does).
_HOW = ("reduction", "backend", "cross_device")
_DESCRIBED = ("temperature", "hardness", "false_negative_margin", "topk", "symmetric",
              "student_temperature", "teacher_temperature", "loss", "normalize_scores", "matryoshka_dims",
              "matryoshka_weights", "logit_scale", "logit_bias")  # fmt: skip


def describe_loss(loss: LossOptions) -> str:
    """What the run's loss does (its resolved options: the user's overrides over the recipe's). An
    option without a phrase of its own here is still named, with its value, when it is set away from
    the options' default: a new loss option shows in the plan and the log without a change here."""
    if isinstance(loss, SigmoidLossOptions):
        text = (f"sigmoid (SigLIP) loss, learnable logit scale from {loss.logit_scale:g} (log-scale "
                f"{math.log(loss.logit_scale):.4g}) and bias from {loss.logit_bias:g}")  # fmt: skip
    elif isinstance(loss, LateInteractionLossOptions):
        kind = "InfoNCE" if loss.loss == "infonce" else "pairwise softplus (hardest negative)"
        text = f"late interaction (MaxSim over token vectors), {kind} τ {loss.temperature:g}"
        text += ", scores / query length" if loss.normalize_scores else ""
    elif isinstance(loss, DistillationLossOptions):
        text = (
            f"KL(teacher ‖ student) of in-batch similarity distributions, student τ {loss.student_temperature:g}, "
            f"teacher τ {loss.teacher_temperature:g}"
        )
    else:
        text = f"InfoNCE τ {loss.temperature:g}"
        if loss.hardness:
            text += f", hardness-weighted (α {loss.hardness:g})"
        if loss.false_negative_margin is not None:
            text += f", false-negative margin β {loss.false_negative_margin:g}"
        if loss.topk:
            text += f", top-{loss.topk} negatives"
        text += ", symmetric" if loss.symmetric else ", query → target only"
        if loss.matryoshka_dims is not None:
            dims = " ".join(map(str, loss.matryoshka_dims))
            weights = " ".join(f"{w:g}" for w in loss.matryoshka_weights)
            text += f", Matryoshka dims {dims} (weights {weights}; each prefix L2-normalised)"
    defaults = type(loss)()
    for option in fields(loss):
        value = getattr(loss, option.name)
        if option.name not in _HOW + _DESCRIBED and value != getattr(defaults, option.name):
            text += f", {option.name} {value}"
    return text


def describe_adapter(model_args) -> str:
    """The trained parameters: LoRA/DoRA r, α and targets, or "full fine-tune" (model_args: ModelArguments)."""
    if model_args.lora:
        kind = "DoRA" if model_args.use_dora else "LoRA"
        targets = model_args.lora_target_modules or "the language model's attention and MLP projections"
        if not isinstance(targets, str):
            targets = ", ".join(targets)
        text = f"{kind} r{model_args.lora_r} α{model_args.lora_alpha} dropout {model_args.lora_dropout:g} on {targets}"
    else:
        text = "full fine-tune"
    if model_args.freeze_vision_tower:
        text += ", vision tower frozen"
    return text


@dataclass(frozen=True)
class BatchPlan:
    """loss: the run's resolved loss options; per_device: rows per device per step
    (`per_device_train_batch_size`); processes: data-parallel ranks; hard: the rows' hard negatives
    (None: not known until the data is read)."""

    loss: LossOptions
    per_device: int
    processes: int
    hard: HardNegatives | None
    mini_batching: MiniBatching = MiniBatching()
    gradient_accumulation: int = 1

    @classmethod
    def of(cls, run: RunConfig, hard: HardNegatives | None) -> BatchPlan:
        """The contrastive batch of a run, from its resolved config."""
        return cls(
            loss=run.loss, per_device=run.training.per_device_train_batch_size, processes=run.processes, hard=hard,
            mini_batching=run.mini_batching, gradient_accumulation=run.training.gradient_accumulation_steps,
        )  # fmt: skip

    @property
    def is_distillation(self) -> bool:
        return isinstance(self.loss, DistillationLossOptions)

    @property
    def gathered(self) -> bool:
        return bool(self.loss.cross_device) and self.processes > 1

    @property
    def contrastive(self) -> int:
        """Rows in one contrastive matrix: every rank's when gathered, else this device's."""
        return self.per_device * (self.processes if self.gathered else 1)

    def hard_per_query(self) -> tuple[int, float, int] | None:
        """Hard negatives each query sees: fewest, mean, most (None: the data is not read)."""
        return None if self.hard is None else self.hard.in_rows(self.contrastive)

    def cross_device(self) -> tuple[int, tuple[int, float, int] | None]:
        """Negatives of each query from other ranks: their targets, and their rows' hard negatives."""
        if not self.gathered:
            return 0, (0, 0.0, 0)
        rows = self.per_device * (self.processes - 1)
        return rows, None if self.hard is None else self.hard.in_rows(rows)

    def lines(self) -> list[str]:
        processes = f"{self.per_device} per device × {self.processes} process(es)"
        if self.gathered:
            processes += ", gathered across devices"
        elif self.processes > 1:
            processes += "; cross_device off: each device's loss sees its own rows only"
        lines = [f"contrastive batch: {self.contrastive} ({processes})"]
        if self.is_distillation:
            lines.append(
                f"distillation: each query's similarity distribution over the {self.contrastive} in-batch targets"
                f" (teacher's against student's)"
            )
        else:
            hard = self.hard_per_query()
            unread = f"the hard negatives of its {self.contrastive} rows"
            hard_text = unread if hard is None else _count(hard, "hard")
            line = f"negatives per query: {self.contrastive - 1} in-batch + {hard_text}"
            if self.gathered:
                targets, other_hard = self.cross_device()
                other = _count(other_hard, "hard") if other_hard is not None else "their rows' hard negatives"
                line += f" (of which cross-device: {targets} targets + {other})"
            lines.append(line)
            if self.hard is not None and len(self.hard.histogram) > 1:
                low, high = self.hard.histogram[0][0], self.hard.histogram[-1][0]
                lines.append(f"  the rows hold {low} to {high} hard negatives each, {self.hard.mean:.2f} on average")
            if getattr(self.loss, "topk", None):  # the late-interaction loss has no top-k nor symmetric half
                margin = self.loss.false_negative_margin
                kept = f"after the false-negative margin {margin:g}, " if margin is not None else ""
                lines.append(f"  the loss keeps, {kept}the {self.loss.topk} highest-scoring of them per query")
            if getattr(self.loss, "symmetric", False):
                lines.append(
                    f"  symmetric: each target is also contrasted with the other {self.contrastive - 1} queries"
                )
        rows, tokens = self.mini_batching.rows, self.mini_batching.tokens
        if tokens:
            cap = f" and {rows} rows" if rows else ""
            lines.append(f"GradCache mini-batches: at most {tokens} tokens{cap} each (every side of their rows, "
                         "padded, image tokens included)")  # fmt: skip
        elif rows:
            count = math.ceil(self.per_device / rows)
            lines.append(f"GradCache mini-batch: {rows} ({count} mini-batch(es) per device per step)")
        else:
            lines.append("GradCache mini-batch: off (the whole batch in one graph)")
        return lines

    def warnings(self) -> list[str]:
        """Where a setting does not do what users often expect of it."""
        out = []
        if self.gradient_accumulation > 1 and not self.is_distillation:
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
        if self.mini_batching.rows >= self.per_device > 0:
            out.append(
                f"gradcache_mini_batch_size={self.mini_batching.rows} is not below the per-device batch "
                f"({self.per_device}): one mini-batch per step, so GradCache only adds a second forward; use a "
                "smaller one, or 0"
            )
        return out


def describe_recipe(recipe: Recipe, loss: LossOptions) -> str:
    """The plan's recipe line: the recipe's name and what this run's loss does."""
    return f"{recipe.name} ({recipe.summary}'s defaults): {describe_loss(loss)}"

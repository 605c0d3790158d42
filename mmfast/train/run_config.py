"""A run's configuration, resolved once: `RunConfig`.

`arguments.parse_arguments` layers the recipe's defaults, the embedded default's profile, the config
file and the command line into HF's argument dataclasses, then resolves them here, once, into one
frozen `RunConfig`. What the run derives from its arguments is derived in `RunConfig.resolve` and
nowhere else:
- the recipe (the object, looked up once);
- the loss options: the recipe's, under the user's overrides (`arguments.LossArguments`), with the
  `--loss_backend` and with `cross_device` only when more than one process trains;
- the GradCache mini-batching (`mini_batches.MiniBatching`: rows and tokens);
- whether duplicate candidates are masked, the model's dtype, the number of processes;
- the checks that need nothing loaded (the overrides against the recipe's loss, the dtype, GradCache
  under DeepSpeed).
The objective (`losses.Objective.of`), the collator, the batch plan (`plan.BatchPlan.of`), the dry run
and the start-of-run log read these fields; none re-derives them from the arguments.

A new loss option: a field of `arguments.LossArguments` named as the core option (None = the
recipe's). It is applied here, described by the plan (`plan.describe_loss`), and checked by the test
of every override (tests/train/test_run_config.py), with no other change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmfast import ContrastiveLossOptions, DistillationLossOptions, LateInteractionLossOptions, SigmoidLossOptions

from .mini_batches import MiniBatching
from .recipes import Recipe

if TYPE_CHECKING:  # the argument dataclasses import this module to resolve themselves
    from .arguments import DataArguments, LossArguments, ModelArguments, TrainingArguments

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LossOptions = ContrastiveLossOptions | DistillationLossOptions | LateInteractionLossOptions | SigmoidLossOptions


def loss_overrides(loss_arguments: LossArguments) -> dict:
    """The loss options the user set (`--temperature` …), by name; unset ones (None) are left out."""
    return {
        f.name: getattr(loss_arguments, f.name)
        for f in dataclasses.fields(loss_arguments)
        if getattr(loss_arguments, f.name) is not None
    }


# `--loss` of a single-vector recipe; a multi-vector recipe's `--loss` is its late-interaction loss's own option.
SINGLE_VECTOR_LOSSES = ("infonce", "sigmoid")
# SigLIP's initial logit scale t (t' = log 10) and bias (Zhai et al. 2023, §3.2).
SIGLIP_SCALE_INIT, SIGLIP_BIAS_INIT = 10.0, -10.0
_SIGLIP_INITS = ("siglip_scale_init", "siglip_bias_init")


def _flags(names) -> str:
    return ", ".join(f"--{name}" for name in names)


def _sigmoid_loss(recipe: Recipe, overrides: dict, backend: str, cross_device: bool) -> SigmoidLossOptions:
    """`--loss sigmoid`: SigLIP's loss with the recipe's gathering; its initial scale and bias (the model
    holds them as learnable parameters, `encoder.SigmoidParameters`). No InfoNCE option applies."""
    infonce_only = [name for name in overrides if name not in ("loss", *_SIGLIP_INITS)]
    if infonce_only:
        raise ValueError(f"{_flags(infonce_only)}: not an option of --loss sigmoid (its options: "
                         f"{_flags(_SIGLIP_INITS)})")  # fmt: skip
    scale = overrides.get("siglip_scale_init", SIGLIP_SCALE_INIT)
    bias = overrides.get("siglip_bias_init", SIGLIP_BIAS_INIT)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--siglip_scale_init must be a finite number > 0, got {scale}")
    if not math.isfinite(bias):
        raise ValueError(f"--siglip_bias_init must be a finite number, got {bias}")
    return SigmoidLossOptions(logit_scale=float(scale), logit_bias=float(bias), backend=backend,
                              cross_device=cross_device)  # fmt: skip


def trains_default(model: ModelArguments, data: DataArguments) -> bool:
    """Whether the run trains the tiny default model, or one trained from it, on the default data (no data
    given): where a recipe's `default_run_loss` applies."""
    if data.data:
        return False
    from .default import descends_from_default

    return model.model_name_or_path is None or descends_from_default(model.model_name_or_path)


def resolve_loss(recipe: Recipe, overrides: dict, *, backend: str, processes: int,
                 trains_default: bool = False) -> LossOptions:  # fmt: skip
    """The recipe's loss options under the overrides (validated by the options themselves), with the
    run's backend, gathering across devices only when more than one process trains. trains_default: the
    run trains the embedded default (the recipe's `default_run_loss`, when it has one)."""
    if overrides and recipe.is_distillation:
        raise ValueError(f"{_flags(overrides)}: recipe {recipe.name} distils, it has no contrastive loss")
    cross_device = recipe.loss.cross_device and processes > 1
    kind = overrides.get("loss")
    if not recipe.is_multi_vector and kind is not None and kind not in SINGLE_VECTOR_LOSSES:
        raise ValueError(f"--loss {kind}: recipe {recipe.name}'s loss is one of {', '.join(SINGLE_VECTOR_LOSSES)}")
    if kind == "sigmoid" and not recipe.is_multi_vector:
        return _sigmoid_loss(recipe, overrides, backend, cross_device)
    if not recipe.is_multi_vector:
        overrides = {name: value for name, value in overrides.items() if name != "loss"}  # --loss infonce: as is
    inits = [name for name in overrides if name in _SIGLIP_INITS]
    if inits:
        raise ValueError(f"{_flags(inits)}: only with --loss sigmoid")
    known = {f.name for f in dataclasses.fields(recipe.loss)}
    unknown = [name for name in overrides if name not in known]
    if unknown and recipe.is_multi_vector:
        raise ValueError(f"{_flags(unknown)}: recipe {recipe.name}'s late-interaction (MaxSim) loss has no such "
                         "option (Matryoshka and the sigmoid loss are for single-vector embeddings)")  # fmt: skip
    if unknown:
        raise ValueError(f"{_flags(unknown)}: recipe {recipe.name}'s loss has no such option")
    loss = recipe.default_run_loss if trains_default and recipe.default_run_loss is not None else recipe.loss
    try:
        return dataclasses.replace(loss, **overrides, backend=backend, cross_device=cross_device)
    except (TypeError, ValueError) as error:  # the options' own check, e.g. "matryoshka_dims must be …"
        named = str(error)
        raise type(error)(named if named.startswith("--") else f"--{named}") from None


def check_matryoshka_fits(loss: LossOptions, embedding_size: int) -> None:
    """--matryoshka_dims against the model's embedding size (known once its config is read)."""
    dims = getattr(loss, "matryoshka_dims", None)
    if dims is not None and dims[-1] > embedding_size:
        raise ValueError(f"--matryoshka_dims {' '.join(map(str, dims))}: the largest, {dims[-1]}, exceeds the "
                         f"model's embedding size {embedding_size}")  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything a run reads, resolved once (see the module docstring).

    model, data, training: the parsed arguments (training is HF's TrainingArguments, which the Trainer
        reads itself); the fields below are what the run derives from them, and read instead of them.
    recipe: the recipe object. loss: the resolved loss options (what the objective calls the loss with).
    mini_batching: GradCache's mini-batches, for the collator and the trainer alike.
    mask_duplicates: leave copies of a positive out of the loss (never for distillation).
    dtype: the model's weights' dtype (None: the checkpoint's own).
    processes: data-parallel processes (the live world size for a run; the planned one for a dry run).
    """

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    recipe: Recipe
    loss: LossOptions
    mini_batching: MiniBatching
    mask_duplicates: bool
    dtype: torch.dtype | None
    processes: int

    @classmethod
    def resolve(cls, model: ModelArguments, data: DataArguments, training: TrainingArguments,
                loss_arguments: LossArguments, recipe: Recipe, *, processes: int | None = None,
                ) -> RunConfig:  # fmt: skip
        """processes: None for the live world size (`training.world_size`)."""
        if training.recipe != recipe.name:
            raise ValueError(f"the arguments name recipe {training.recipe!r}, but {recipe.name!r} was resolved")
        processes = training.world_size if processes is None else processes
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"processes must be a positive integer, got {processes!r}")
        if model.model_dtype is not None and model.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {', '.join(DTYPES)}, got {model.model_dtype!r}")
        mini_batching = MiniBatching.of(training)
        mini_batching.check_engine("deepspeed" if training.deepspeed else None)
        loss = resolve_loss(recipe, loss_overrides(loss_arguments), backend=training.loss_backend, processes=processes,
                            trains_default=trains_default(model, data))  # fmt: skip
        if isinstance(loss, SigmoidLossOptions) and (training.fsdp or training.deepspeed):
            # The loss reads the scale and bias outside the model's forward: a sharded engine would hand it shards.
            engine = "FSDP" if training.fsdp else "DeepSpeed"
            raise ValueError(f"--loss sigmoid: its learnable logit scale and bias are not supported under "
                             f"{engine}; train it with DDP (torchrun, accelerate launch) or one process")  # fmt: skip
        return cls(
            model=model, data=data, training=training, recipe=recipe, loss=loss,
            mini_batching=mini_batching,
            mask_duplicates=training.mask_duplicate_candidates and not recipe.is_distillation,
            dtype=None if model.model_dtype is None else DTYPES[model.model_dtype],
            processes=processes,
        )  # fmt: skip

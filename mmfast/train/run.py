"""From parsed arguments to a ready EmbeddingTrainer: encoder, data, objective, batches."""

from __future__ import annotations

import atexit
import logging
import os
import sys

import torch

from . import checkpoints, default
from .arguments import DataArguments, ModelArguments, TrainingArguments
from .collator import EmbeddingCollator
from .data_report import DataReport
from .data_spec import SAMPLE_ROWS, TrainData, load_data
from .encoder import Encoder
from .evaluate.during_training import HeldOutEvaluation
from .evaluate.report import TASKS
from .losses import Objective, distributed_world_size
from .model_source import check_model_source
from .plan import BatchPlan, HardNegatives, describe_adapter, describe_recipe
from .recipes import Recipe
from .sampling import ContrastiveBatchSampler
from .streaming import StreamingBatches
from .trainer import EmbeddingTrainer

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_encoder(model_args: ModelArguments, recipe: Recipe) -> Encoder:
    """The backbone with the recipe's prompts, its adapter and frozen parts, ready to train."""
    path = model_args.model_name_or_path or str(default.default_backbone())
    options = {
        "text_prompt": model_args.text_prompt or recipe.text_prompt,
        "image_prompt": model_args.image_prompt or recipe.image_prompt,
        "max_length": model_args.max_length,
        "padding_side": model_args.padding_side,
        "trust_remote_code": model_args.trust_remote_code,
    }
    for name in ("image_resolution", "min_pixels", "max_pixels", "image_token_style"):
        if getattr(model_args, name) is not None:  # else the saved encoder's own (or the default)
            options[name] = getattr(model_args, name)
    if model_args.attn_implementation:
        options["attn_implementation"] = model_args.attn_implementation
    if model_args.model_dtype:
        if model_args.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {', '.join(DTYPES)}, got {model_args.model_dtype!r}")
        options["dtype"] = DTYPES[model_args.model_dtype]
    encoder = Encoder.from_pretrained(path, **options)
    if encoder.is_adapter:
        # Training on from an adapter checkpoint (UniME stage 2 after stage 1): fold it in first.
        encoder = encoder.merged()
    if model_args.freeze_vision_tower:
        if encoder.family.multimodal:
            encoder.freeze_vision_tower()
        else:
            logger.warning("freeze_vision_tower: a text-only %s backbone has no vision tower", encoder.family.name)
    if model_args.lora:
        encoder.add_adapter(
            r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules, use_dora=model_args.use_dora,
        )  # fmt: skip
    return encoder


def batch_plan(training_args: TrainingArguments, recipe: Recipe, hard: HardNegatives | None,
               processes: int | None = None) -> BatchPlan:  # fmt: skip
    """The run's contrastive batch (`plan.BatchPlan`) under its resolved loss options; processes: the
    live world size by default."""
    return BatchPlan(
        loss=training_args.loss_options(recipe), per_device=training_args.per_device_train_batch_size,
        processes=distributed_world_size() if processes is None else processes, hard=hard,
        mini_batch=training_args.gradcache_mini_batch_size, mini_batch_tokens=training_args.gradcache_mini_batch_tokens,
        gradient_accumulation=training_args.gradient_accumulation_steps,
    )  # fmt: skip


def hard_negatives(data: TrainData, data_args: DataArguments) -> HardNegatives:
    """The hard negatives each row gives the loss (at most `--max_negatives`)."""
    counts = data.negatives_per_row()
    if data_args.max_negatives is not None:
        counts = counts.clip(max=data_args.max_negatives)
    return HardNegatives.of(counts.tolist())


def describe_run(model_args: ModelArguments, training_args: TrainingArguments, recipe: Recipe,
                 hard: HardNegatives) -> str:  # fmt: skip
    """The run in plain numbers, logged at start: its loss, its adapter, its contrastive batch."""
    batches = batch_plan(training_args, recipe, hard)
    lines = [f"recipe {describe_recipe(recipe, batches.loss)}", f"adapter {describe_adapter(model_args)}"]
    return "\n".join(lines + batches.lines())


def check_batch_semantics(training_args: TrainingArguments, recipe: Recipe) -> None:
    """Warns where a setting does not do what users often expect of it."""
    for warning in batch_plan(training_args, recipe, None).warnings():
        logger.warning("%s", warning)


def load_training_data(data_args: DataArguments, recipe: Recipe, report: DataReport,
                       sample_rows: int | None = None) -> TrainData:  # fmt: skip
    """`--data` (or the embedded default data of the recipe's kind) as one dataset with its mixture;
    `sample_rows`: only that many rows of each file, streamed (the dry run's sample, `data_spec.load_data`)."""
    if data_args.data:
        data = data_args.data
    else:
        defaults = default.default_data()
        if recipe.data == "mmeb":
            data = defaults.train_spec
        elif recipe.data == "nli":
            data = defaults.nli
        else:
            from .default.teacher import default_teacher

            default_teacher(defaults)
            data = defaults.teacher_spec
    loaded = load_data(data, image_dir=data_args.image_dir, teacher=data_args.teacher, strict=data_args.strict,
                       mmeb_split=data_args.mmeb_split, num_sample_per_subset=data_args.num_sample_per_subset,
                       report=report, sample_rows=sample_rows)  # fmt: skip
    has_teacher = loaded.dataset.teacher is not None
    if recipe.is_distillation and not has_teacher:
        raise ValueError(
            f"recipe {recipe.name} distils from teacher embeddings: give --teacher FILE (or a spec with one)"
        )
    return loaded


def held_out_evaluation(training_args: TrainingArguments) -> HeldOutEvaluation | None:
    """What `--eval_strategy` evaluates (`--eval_tasks` on the held-out sets or `--eval_data`), checked;
    None when the run does not evaluate."""
    if training_args.eval_strategy == "no":
        if training_args.eval_tasks or training_args.eval_data:
            raise ValueError("--eval_tasks: give --eval_strategy steps (or epoch) to say when to evaluate")
        return None
    if not training_args.eval_tasks:
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        raise ValueError(
            f"--eval_strategy {strategy}: mmfast-train takes no eval dataset (the Trainer would ask for one); "
            f"name what to evaluate with --eval_tasks ({', '.join(TASKS)}), or evaluate the checkpoints "
            "with mmfast-eval"
        )
    evaluation = HeldOutEvaluation.from_arguments(
        training_args.eval_tasks, training_args.eval_data, training_args.eval_image_root,
        training_args.per_device_eval_batch_size,
    )  # fmt: skip
    if training_args.load_best_model_at_end and training_args.metric_for_best_model in ("loss", "eval_loss", None):
        raise ValueError(
            "--load_best_model_at_end: name one of the evaluation's scores with --metric_for_best_model "
            "(e.g. flickr30k_t2i_R@1); mmfast's evaluation has no eval loss"
        )
    return evaluation


def check_trainer_settings(training_args: TrainingArguments) -> None:
    """Settings the Trainer would reject only once it started (a run and its dry run both check them)."""
    held_out_evaluation(training_args)
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    missing = [name for name in training_args.report_to or [] if name not in available]
    if missing:
        raise ValueError(
            f"--report_to {' '.join(missing)}: not installed here (pip install {' '.join(missing)}), "
            "or --report_to none"
        )


def build_sampler(
    data: TrainData, training_args: TrainingArguments, data_args: DataArguments, processes: int | None = None
) -> ContrastiveBatchSampler:
    """The run's batches (an error when an epoch would hold none); processes: the live world size by default."""
    return ContrastiveBatchSampler(
        data.mixture, batch_size=training_args.per_device_train_batch_size, homogeneous=data_args.homogeneous_batches,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        drop_last=training_args.dataloader_drop_last,
        num_replicas=distributed_world_size() if processes is None else processes,
    )  # fmt: skip


def streaming_batches(data: TrainData, training_args: TrainingArguments, data_args: DataArguments) -> StreamingBatches:
    """`--streaming`: this rank's batches, read from the files as training goes (`streaming.py`)."""
    if training_args.max_steps <= 0:
        raise ValueError("--streaming: a stream has no length; give --max_steps")
    return StreamingBatches(
        data.sources, training_args.per_device_train_batch_size, homogeneous=data_args.homogeneous_batches,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        num_replicas=distributed_world_size(), rank=training_args.process_index, strict=data_args.strict,
    )  # fmt: skip


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, recipe: Recipe
) -> EmbeddingTrainer:
    if training_args.cpu_threads is not None:
        torch.set_num_threads(training_args.cpu_threads)
    # Before anything loads: "True"/"latest" becomes the newest complete checkpoint, a named one is checked.
    training_args.resume_from_checkpoint = checkpoints.resolve_resume(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    check_trainer_settings(training_args)
    if model_args.model_name_or_path:
        check_model_source(model_args.model_name_or_path, "--model_name_or_path")
    report = DataReport(strict=data_args.strict)
    if data_args.streaming:  # the first rows of each file checked up front, as a dry run does; the rest as read
        data = load_training_data(data_args, recipe, DataReport(strict=data_args.strict), sample_rows=SAMPLE_ROWS)
        sampler, train_dataset = None, streaming_batches(data, training_args, data_args)
    else:
        data = load_training_data(data_args, recipe, report)
        sampler, train_dataset = build_sampler(data, training_args, data_args), data.dataset
    encoder = build_encoder(model_args, recipe)
    collator = EmbeddingCollator(
        encoder.builder, mini_batch_size=training_args.gradcache_mini_batch_size,
        mini_batch_tokens=training_args.gradcache_mini_batch_tokens, teacher=data.dataset.teacher,
        max_negatives=data_args.max_negatives, strict=data_args.strict,
    )  # fmt: skip
    backend = None if training_args.loss_backend == "auto" else training_args.loss_backend
    if training_args.process_index == 0:  # every rank holds the same plan and data: say it once
        logger.warning("%s", describe_run(model_args, training_args, recipe, hard_negatives(data, data_args)))
        check_batch_semantics(training_args, recipe)
        if report.total:
            logger.warning("%s", report.summary())
    return EmbeddingTrainer(
        model=encoder, args=training_args, train_dataset=train_dataset, data_collator=collator,
        eval_dataset=held_out_evaluation(training_args),
        objective=Objective(training_args.loss_options(recipe), backend=backend,
                            mask_duplicates=training_args.mask_duplicate_candidates),
        batch_sampler=sampler, data_report=report,
    )  # fmt: skip


def fit(trainer: EmbeddingTrainer) -> EmbeddingTrainer:
    """Trains (resuming from `--resume_from_checkpoint` when given), saves the final encoder into
    output_dir and logs the data report. As HF's example scripts, output_dir also gets the run's
    `trainer_state.json`, `train_results.json` and `all_results.json` (rank 0 writes them)."""
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.info("saved the trained encoder to %s", trainer.args.output_dir)
        logger.info("%s", trainer.data_report.summary())
    return trainer


def leave_process_group() -> None:
    """Under torchrun, the last thing a rank does once its run has succeeded: every rank leaves
    together (a rank that exits while a peer is still inside a gloo collective can make the peer's
    gloo thread abort, SIGABRT), then the process ends here.

    It ends with os._exit, after the atexit handlers (a logger's final sync, say) and a flush of
    stdout/stderr: the process group object outlives destroy_process_group (the trainer holds it),
    and its destructor, run later with the GIL held, joins gloo's work thread, which may be waiting
    for the GIL to drop the last Python reference of a finished work item. That deadlock left a rank
    hanging after a finished run (seen in gdb: ~ProcessGroupGloo in std::thread::join, the
    pt_gloo_runloop thread in take_gil)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

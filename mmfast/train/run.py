"""From parsed arguments to a ready EmbeddingTrainer: encoder, data, objective, batches."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mmfast import SigmoidLossOptions

from . import checkpoints, default
from .arguments import DataArguments, TrainingArguments
from .batch_order import BatchOrderSampler
from .collator import EmbeddingCollator
from .data_report import DataReport
from .data_spec import SAMPLE_ROWS, DataSource, TrainData, load_data, parse_data_spec
from .encoder import Encoder
from .evaluate.during_training import HeldOutEvaluation
from .evaluate.report import TASKS
from .losses import Objective
from .model_source import check_model_source
from .plan import BatchPlan, HardNegatives, describe_adapter, describe_recipe
from .recipes import Recipe
from .run_config import RunConfig, check_matryoshka_fits
from .sampling import ContrastiveBatchSampler
from .streaming import StreamingBatches
from .trainer import EmbeddingTrainer

logger = logging.getLogger(__name__)
PATH_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)  # what a check of the user's input raises


def build_encoder(run: RunConfig) -> Encoder:
    """The backbone with the recipe's prompts, its adapter and frozen parts, ready to train.

    The parameters it draws fresh (a multi-vector head, a LoRA adapter) come from the run's seed: the same
    arguments build the same model in every process (the Trainer seeds only once the model exists)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.training.seed)
        return _build_encoder(run)


def _build_encoder(run: RunConfig) -> Encoder:
    model_args, recipe = run.model, run.recipe
    path = model_args.model_name_or_path or str(default.default_backbone())
    options = {
        "text_prompt": model_args.text_prompt or recipe.text_prompt,
        "image_prompt": model_args.image_prompt or recipe.image_prompt,
        "max_length": model_args.max_length,
        "padding_side": model_args.padding_side,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if recipe.is_multi_vector:
        options["multi_vector"] = True
        options["mask_non_image_embeddings"] = model_args.mask_non_image_embeddings
    elif model_args.mask_non_image_embeddings:
        raise ValueError(f"--mask_non_image_embeddings masks token vectors: recipe {recipe.name} embeds one vector "
                         "per input (the colpali recipe is multi-vector)")  # fmt: skip
    for name in ("image_resolution", "min_pixels", "max_pixels", "image_token_style"):
        if getattr(model_args, name) is not None:  # else the saved encoder's own (or the default)
            options[name] = getattr(model_args, name)
    if model_args.attn_implementation:
        options["attn_implementation"] = model_args.attn_implementation
    if run.dtype is not None:
        options["dtype"] = run.dtype
    encoder = Encoder.from_pretrained(path, **options)
    # What is drawn fresh (the head, then an adapter) is drawn from the seed once the backbone is loaded: how
    # transformers built the backbone (on the meta device, or first initialised at random, which draws numbers:
    # e.g. when torch.empty is wrapped) must not change it, or processes would train different models.
    torch.manual_seed(run.training.seed)
    if encoder.projection_is_fresh:
        encoder.projection.reset_parameters()
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
    check_matryoshka_fits(run.loss, encoder.embedding_size)
    if isinstance(run.loss, SigmoidLossOptions):  # learnable from their initial values (`--siglip_*_init`)
        encoder.add_sigmoid_parameters(run.loss.logit_scale, run.loss.logit_bias)
    return encoder


def hard_negatives(data: TrainData, max_negatives: int | None) -> HardNegatives:
    """The hard negatives each row gives the loss: per row, as the collator keeps them (its first
    `max_negatives`, `collator.kept_negatives`), counted from the data's columns."""
    counts = data.negatives_per_row()
    if max_negatives is not None:
        counts = counts.clip(max=max_negatives)
    return HardNegatives.of(counts.tolist())


def run_sections(run: RunConfig, hard: HardNegatives | None) -> list[tuple[str, str]]:
    """The run in plain numbers, from its resolved config: its loss ("recipe"), its trained parameters
    ("adapter") and its contrastive batch ("batches"). The start-of-run log and the dry run print these."""
    return [
        ("recipe", describe_recipe(run.recipe, run.loss)),
        ("adapter", describe_adapter(run.model)),
        ("batches", "\n".join(BatchPlan.of(run, hard).lines())),
    ]


def describe_run(run: RunConfig, hard: HardNegatives | None) -> str:
    """The start-of-run log: `run_sections`, the batch lines unlabelled."""
    (_, recipe), (_, adapter), (_, batches) = run_sections(run, hard)
    return f"recipe {recipe}\nadapter {adapter}\n{batches}"


def missing_data_paths(data_args: DataArguments, sources: Sequence[DataSource] = ()) -> None:
    """Every path the data arguments (and the subsets of a spec) name that is not there, in one error of
    one line: "--data: X does not exist", or "N missing paths: …; …" naming each."""
    missing = [f"--data: {p}" for p in data_args.data or [] if not Path(p).exists()]
    if data_args.image_dir is not None and not Path(data_args.image_dir).is_dir():
        missing.append(f"--image_dir: {data_args.image_dir}")
    if data_args.teacher is not None and not Path(data_args.teacher).is_file():
        missing.append(f"--teacher: {data_args.teacher}")
    for s in sources:
        missing += [f"subset {s.name}: {p}" for p in s.paths if not p.is_file()]
        missing += [f"subset {s.name}: image_dir {s.image_dir}"] if s.image_dir and not s.image_dir.exists() else []
        missing += [f"subset {s.name}: teacher {s.teacher}"] if s.teacher and not s.teacher.is_file() else []
    if len(missing) == 1:
        raise FileNotFoundError(f"{missing[0]} does not exist")
    if missing:
        raise FileNotFoundError(f"{len(missing)} missing paths: " + "; ".join(f"{m} does not exist" for m in missing))


def load_training_data(data_args: DataArguments, recipe: Recipe, report: DataReport,
                       sample_rows: int | None = None) -> TrainData:  # fmt: skip
    """`--data` (or the embedded default data of the recipe's kind) as one dataset with its mixture;
    `sample_rows`: only that many rows of each file, streamed (the dry run's sample, `data_spec.load_data`)."""
    if data_args.data:
        missing_data_paths(data_args)
        sources = parse_data_spec(
            data_args.data, image_dir=data_args.image_dir, teacher=data_args.teacher,
            mmeb_split=data_args.mmeb_split, num_sample_per_subset=data_args.num_sample_per_subset,
        )  # fmt: skip
        missing_data_paths(data_args, sources)
        data = sources
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


def build_sampler(data: TrainData, run: RunConfig) -> ContrastiveBatchSampler | BatchOrderSampler:
    """The run's batches for its processes (an error when an epoch would hold none)."""
    training = run.training
    if run.data.batch_order:
        return BatchOrderSampler(
            run.data.batch_order, data.mixture, training.per_device_train_batch_size,
            seed=training.data_seed if training.data_seed is not None else training.seed,
            num_replicas=run.processes,
        )  # fmt: skip
    return ContrastiveBatchSampler(
        data.mixture, batch_size=training.per_device_train_batch_size, homogeneous=run.data.homogeneous_batches,
        seed=training.data_seed if training.data_seed is not None else training.seed,
        drop_last=training.dataloader_drop_last, num_replicas=run.processes,
    )  # fmt: skip


def check_before_loading(run: RunConfig) -> tuple[str | None, list[str]]:
    """The checks a run makes before it loads anything, and its dry run too: the checkpoint to resume
    from (`--resume_from_checkpoint` True/"latest": the newest complete one), and each failing check's
    message (the run stops on them, the dry run lists them)."""
    training, resume, errors = run.training, None, []
    try:
        resume = checkpoints.resolve_resume(training.resume_from_checkpoint, training.output_dir)
    except PATH_ERRORS as error:
        errors.append(str(error))
    try:
        check_trainer_settings(training)
    except PATH_ERRORS as error:
        errors.append(str(error))
    return resume, errors


def streaming_batches(data: TrainData, run: RunConfig) -> StreamingBatches:
    """`--streaming`: this rank's batches, read from the files as training goes (`streaming.py`)."""
    training = run.training
    if training.max_steps <= 0:
        raise ValueError("--streaming: a stream has no length; give --max_steps")
    return StreamingBatches(
        data.sources, training.per_device_train_batch_size, homogeneous=run.data.homogeneous_batches,
        seed=training.data_seed if training.data_seed is not None else training.seed,
        num_replicas=run.processes, rank=training.process_index, strict=run.data.strict,
    )  # fmt: skip


def build_trainer(run: RunConfig) -> EmbeddingTrainer:
    """The run's Trainer: its data, encoder, collator and objective, all from the resolved config."""
    training = run.training
    if training.cpu_threads is not None:
        torch.set_num_threads(training.cpu_threads)
    training.resume_from_checkpoint, errors = check_before_loading(run)
    if errors:
        raise ValueError("\n".join(errors))
    if run.model.model_name_or_path:
        check_model_source(run.model.model_name_or_path, "--model_name_or_path")
    report = DataReport(strict=run.data.strict)
    if run.data.streaming:  # the first rows of each file checked up front, as a dry run does; the rest as read
        data = load_training_data(run.data, run.recipe, DataReport(strict=run.data.strict), sample_rows=SAMPLE_ROWS)
        sampler, train_dataset = None, streaming_batches(data, run)
    else:
        data = load_training_data(run.data, run.recipe, report)
        sampler, train_dataset = build_sampler(data, run), data.dataset
    encoder = build_encoder(run)
    if training.ddp_find_unused_parameters is None and run.processes > 1:
        # For a model that is not a PreTrainedModel, HF's Trainer asks DDP to search every step's graph for
        # unused parameters, and DDP warns when there are none: search only when a step can leave some.
        images = data.every_row_has_image(run.data.max_negatives)
        training.ddp_find_unused_parameters = bool(encoder.parameters_without_gradient(images=images))
    collator = EmbeddingCollator(encoder.builder, mini_batching=run.mini_batching, teacher=data.dataset.teacher,
                                 max_negatives=run.data.max_negatives, strict=run.data.strict)  # fmt: skip
    if training.process_index == 0:  # every rank holds the same plan and data: say it once
        logger.warning("%s", describe_run(run, hard_negatives(data, run.data.max_negatives)))
        for warning in BatchPlan.of(run, None).warnings():
            logger.warning("%s", warning)
        if report.total:
            logger.warning("%s", report.summary())
    return EmbeddingTrainer(
        model=encoder, args=training, train_dataset=train_dataset, data_collator=collator,
        eval_dataset=held_out_evaluation(training), objective=Objective.of(run), batch_sampler=sampler,
        data_report=report,
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

"""EmbeddingTrainer: transformers.Trainer with a contrastive (or distillation) training step.

Everything but the step is the Trainer's own: DDP/FSDP/DeepSpeed through accelerate, checkpoints
and resume, schedules, logging, the progress bar, and evaluation at `--eval_strategy` points, where
`evaluate` runs mmfast's own evaluation (`evaluate.during_training.HeldOutEvaluation`, given as the
eval dataset) instead of an eval loss. The step encodes the batch's GradCache
mini-batches and applies the recipe's fused loss (`grad_cache.py`); without GradCache it is one
graph over the whole batch. Batches come from `ContrastiveBatchSampler` (whole batches only,
optionally one subset per batch), so `per_device_train_batch_size` is the contrastive batch of
each device.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, speed_metrics

from . import checkpoints
from .data_report import DataReport
from .encoder import nothing_of
from .evaluate.during_training import HeldOutEvaluation, RankShards, evaluation_output_dir, flat_metrics
from .evaluate.report import write_results
from .fsdp import sync_at_last_post_backward
from .grad_cache import full_batch_step, grad_cache_step
from .losses import Objective, distributed_world_size
from .mini_batches import MiniBatching
from .rank_alignment import AlignedMiniBatches, Alignment, hard_negatives_on_other_ranks_only, rank_alignment
from .sampling import ContrastiveBatchSampler

logger = logging.getLogger(__name__)
TRAINING_ARGS_NAME = "training_args.bin"
DATA_REPORT_NAME = "data_report.json"
FSDP_OPTIMIZER_NAME = "optimizer.bin"  # accelerate's save_fsdp_optimizer, full state dict


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the accelerator's allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class EmbeddingTrainer(transformers.Trainer):
    """A Trainer for `Encoder` models.

    objective: the recipe's loss (`losses.Objective`).
    batch_sampler: yields the dataset indices of each contrastive batch of this device (None when the
    train dataset is a stream of batches, `streaming.StreamingBatches`).
    data_report: where skipped rows are counted (merged from every batch); saved beside checkpoints.
    """

    def __init__(
        self, *args, objective: Objective, batch_sampler: ContrastiveBatchSampler | None, data_report=None, **kw
    ):
        super().__init__(*args, **kw)
        # The collator cuts each batch into the mini-batches the step encodes: both must read the run's one
        # setting (`MiniBatching`), or GradCache would run over mini-batches the arguments did not ask for.
        asked, collated = MiniBatching.of(self.args), getattr(self.data_collator, "mini_batching", None)
        if collated != asked:
            raise ValueError(
                f"the data collator's GradCache mini-batches ({getattr(collated, 'setting', collated)}) are not "
                f"the arguments' ({asked.setting}): build both from one RunConfig"
            )
        self.mini_batching = collated  # the step reads the very object the collator cuts by
        self.mini_batching.check_engine("deepspeed" if self.is_deepspeed_enabled else None)
        launched_fsdp = bool(self.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if launched_fsdp and not self.is_fsdp_enabled:
            # accelerate sets up FSDP only on accelerators: a CPU run with several processes becomes DDP
            # (distributed_type MULTI_CPU) before the FSDP plugin is looked at. Training on would be another run.
            raise ValueError(
                f"FSDP was asked for (--fsdp / fsdp_config, or accelerate launch with an FSDP config), but accelerate "
                f"set up {self.accelerator.distributed_type.value}: it runs FSDP only on GPUs (or other "
                "accelerators), never on CPU processes. Launch on GPUs, or drop FSDP to train with DDP"
            )
        self.objective, self.batch_sampler = objective, batch_sampler
        self.data_report = data_report if data_report is not None else DataReport()
        self._window = {"time": time.perf_counter(), "rows": 0, "batches": 0, "masked": 0}
        self._staging = False

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """As Trainer.train; resume_from_checkpoint True (or "True", "latest") is the newest *complete*
        checkpoint in output_dir, and a named checkpoint must be complete (`checkpoints.resolve_resume`)."""
        resume = checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        return super().train(resume_from_checkpoint=resume, **kwargs)

    # --- data ---

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            # --streaming: the stream yields this rank's batches itself (streaming.py); not sharded again.
            return DataLoader(self.train_dataset, batch_size=None, collate_fn=self.data_collator)
        workers = args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
        )
        return self.accelerator.prepare(loader)

    def _run_epoch(self, *args, **kwargs):
        # The Trainer reaches the sampler's set_epoch through accelerate's wrappers, except when a
        # multi-process run resumes mid-epoch; set it here so every epoch's order is (seed, epoch).
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
        (self.batch_sampler or self.train_dataset).set_epoch(epoch)
        return super()._run_epoch(*args, **kwargs)

    # --- the step ---

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        self.data_report.merge(inputs["report"])
        if inputs["rows"] == 0:
            if distributed_world_size() > 1:
                raise RuntimeError(
                    "every row of this rank's batch was skipped (see the data report); with several "
                    "processes a rank cannot skip a step alone"
                )
            logger.warning("every row of a batch was skipped (unreadable images); the step is skipped")
            return torch.zeros((), device=self.args.device)
        for source, row, tokens in inputs.get("oversized", ()):
            logger.warning(
                "%s, row %d: %d tokens, more than gradcache_mini_batch_tokens %d: encoded in a GradCache "
                "mini-batch of its own", source, row, tokens, self.mini_batching.tokens,
            )  # fmt: skip
        inputs = self._prepare_inputs(inputs)
        # Each mini-batch is built, and moved to the device, when it is encoded (mini_batches.py); a batch
        # from a data-loader worker comes without the builder.
        mini_batches = inputs["mini_batches"].bound(self.data_collator.builder, self._prepare_input)
        teacher = inputs.get("teacher")
        # The Trainer's own convention: the loss of one of several accumulated batches is divided
        # by their number, so the accumulated gradient is their mean.
        scale = 1.0 / self.current_gradient_accumulation_steps

        ids = inputs.get("ids")
        # The sigmoid loss's learnable scale and bias: the model's parameters, read by the loss.
        unwrapped = self.accelerator.unwrap_model(model)
        sigmoid_parameters = unwrapped.sigmoid_parameters if self.objective.is_sigmoid else None

        several_ranks = distributed_world_size() > 1
        # DDP (FSDP is aligned below): a cross-device loss gathers hard negatives when any rank has some, so a
        # rank without them gives it negatives of no rows (rank_alignment.hard_negatives_on_other_ranks_only).
        ddp_gathers = several_ranks and self.objective.options.cross_device and not isinstance(model, FSDPModule)
        negatives_of_no_rows = ddp_gathers and hard_negatives_on_other_ranks_only(mini_batches)

        def loss_fn(embeddings):
            if negatives_of_no_rows:
                # Cut from the targets, so in the graph: the gather's backward, a collective, runs here too.
                embeddings = {**embeddings, "negatives": nothing_of(embeddings["target"])}
            return self.objective(embeddings, teacher, ids, sigmoid_parameters)

        # As Trainer.training_step: the loss is already divided by the accumulation steps, so DeepSpeed
        # must not divide it again.
        options = {"scale_wrt_gas": False} if self.accelerator.distributed_type == DistributedType.DEEPSPEED else {}

        def backward(surrogate):
            self.accelerator.backward(surrogate * scale, **options)

        forward = model
        if isinstance(model, FSDPModule) and several_ranks:
            # Every rank runs the modules, and the mini-batches, any rank runs (passes weighted zero where it
            # lacks them), so their FSDP collectives stay in step (rank_alignment.py).
            alignments = rank_alignment(mini_batches, self.accelerator.unwrap_model(model).takes_blank_image)
            if alignments != [Alignment()] * len(mini_batches):
                mini_batches = AlignedMiniBatches(mini_batches, alignments)

                def forward(aligned):
                    mini_batch, alignment = aligned
                    return model(mini_batch, blank_image_sides=alignment.blank_image_sides,
                                 placeholder_sides=alignment.placeholder_sides)  # fmt: skip

        with self.compute_loss_context_manager():
            if self.mini_batching.grad_cache:
                no_sync = functools.partial(self.defer_gradient_sync, model)
                loss_parameters = () if sigmoid_parameters is None else tuple(sigmoid_parameters.parameters())
                last_sync = contextlib.nullcontext
                if isinstance(model, FSDPModule) and self.args.gradcache_fsdp_sync == "last_mini_batch":
                    last_sync = functools.partial(sync_at_last_post_backward, model)
                loss, _ = grad_cache_step(forward, mini_batches, loss_fn, backward=backward, no_sync=no_sync,
                                          last_sync=last_sync, loss_parameters=loss_parameters)  # fmt: skip
            else:
                loss, _ = full_batch_step(forward, mini_batches, loss_fn, backward=backward)
        self._window["rows"] += inputs["rows"]
        self._window["batches"] += 1
        self._window["masked"] += self.objective.masked_candidates(ids, inputs["rows"])
        return loss * scale

    @contextlib.contextmanager
    def defer_gradient_sync(self, model) -> Iterator[None]:
        """Holds back the gradient sync of the backwards run inside it: DDP's all-reduce (`no_sync`), or
        FSDP2's reduce-scatter (`set_requires_gradient_sync(False)`, as accelerate's FSDP2 plugin does; here
        also for a model sharded with `fully_shard` outside accelerate). GradCache runs every mini-batch but
        the last in it, so gradients are synced once per step.

        Under FSDP2, `gradcache_fsdp_sync` chooses. last_mini_batch: each unit's gradient stays unsharded
        (a whole unit's gradient per process) until the last mini-batch's backward reduce-scatters it once,
        at the unit's last post-backward (`fsdp.sync_at_last_post_backward`, which the last mini-batch runs
        in): one reduce-scatter per unit per step, whatever the number of mini-batches. every_mini_batch:
        sharded gradient memory, one reduce-scatter per unit per mini-batch (README, "GradCache under
        FSDP2")."""
        if not isinstance(model, FSDPModule):
            with self.accelerator.no_sync(model):
                yield
            return
        if self.args.gradcache_fsdp_sync == "every_mini_batch":
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    # --- logging ---

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            elapsed = now - self._window["time"]
            world = distributed_world_size()
            logs["samples_per_second"] = round(self._window["rows"] * world / elapsed, 2) if elapsed > 0 else 0.0
            logs["peak_memory_mb"] = round(peak_memory_mb(self.args.device), 1)
            logs["skipped_rows"] = self.data_report.total
            if self.objective.mask_duplicates:
                # Per contrastive batch of this process (the copies of its positives the loss left out).
                batches = max(self._window["batches"], 1)
                logs["masked_candidates"] = round(self._window["masked"] / batches, 2)
            self._window = {"time": now, "rows": 0, "batches": 0, "masked": 0}
        super().log(logs, start_time)

    # --- evaluation: mmfast's held-out tasks, through the Trainer's schedule, best-model tracking and callbacks ---

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With a `HeldOutEvaluation` (the run's `--eval_tasks`), runs it on the model being trained and
        logs its scores as `<prefix>_<set>_<metric>` (e.g. eval_flickr30k_t2i_R@1); any other eval
        dataset goes to the Trainer's own loop. Every rank embeds its share; rank 0 writes the results
        into <output_dir>/eval/step-N/."""
        evaluation = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(evaluation, HeldOutEvaluation):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        start_time = time.time()
        encoder = self.accelerator.unwrap_model(self.model)
        if self.args.world_size > 1:
            encoder = RankShards(encoder, self.args.process_index, self.args.world_size)
        output_dir = None
        if self.args.should_save:  # rank 0 writes
            output_dir = evaluation_output_dir(self.args.output_dir, self.state.global_step)
        results = evaluation.run(encoder, output_dir=output_dir)
        if output_dir is not None:
            write_results(results, output_dir)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in flat_metrics(results).items()}
        metrics.update(speed_metrics(metric_key_prefix, start_time))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _load_best_model(self) -> None:
        """The best checkpoint's weights, read in the Encoder's own format (as a resume reads them)."""
        best = self.state.best_model_checkpoint
        logger.info("loading the best model from %s (score %s)", best, self.state.best_metric)
        self.accelerator.unwrap_model(self.model).load_weights(best)

    # --- saving and loading: the Encoder's own format, for checkpoints and the final model ---

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return str(checkpoints.staging_dir(run_dir)) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written by every rank into <output_dir>/.partial/checkpoint-N and
        renamed into place once all ranks are done (`checkpoints`): a killed save leaves no folder that
        looks complete. The Trainer's own rotation then runs inside the staging folder, where it finds
        nothing to delete; `checkpoints.rotate` applies save_total_limit to the published folders."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = checkpoints.staging_dir(run_dir) / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by an earlier save of this step that was killed
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's files (rng states, optimizer shards) are written
        if self.args.should_save:
            checkpoints.publish(staged, run_dir / name)
            shutil.rmtree(checkpoints.staging_dir(run_dir), ignore_errors=True)  # older interrupted saves
            if self.state.best_global_step:
                best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                self.state.best_model_checkpoint = str(best) if best.is_dir() else self.state.best_model_checkpoint
            checkpoints.rotate(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        with open(os.path.join(output_dir, DATA_REPORT_NAME), "w") as f:
            json.dump(self.data_report.to_dict(), f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        optimizer_file = os.path.join(checkpoint, FSDP_OPTIMIZER_NAME) if checkpoint else ""
        if not (self.accelerator.is_fsdp2 and os.path.isfile(optimizer_file)):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        # accelerate's load_fsdp_optimizer for a full state dict (rank 0 reads, the ranks take their shards),
        # but not strict: a parameter that had no gradient before the save (the vision tower in a text-only
        # run) has no optimizer state, which is the state the optimizer gives it until its first gradient.
        # torch's strict load refuses such a checkpoint.
        saved = torch.load(optimizer_file, weights_only=True) if self.args.process_index == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_optimizer_state_dict(self.model_wrapped, self.optimizer.optimizer, saved, options=options)
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            # The sharded model takes the checkpoint's accelerate FSDP state dict (pytorch_model_fsdp.bin,
            # written beside the encoder's files by the Trainer's own FSDP save), each rank its shards.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self.accelerator.unwrap_model(model or self.model).load_weights(resume_from_checkpoint)
        report = os.path.join(resume_from_checkpoint, DATA_REPORT_NAME)
        if os.path.isfile(report):
            with open(report) as f:
                resumed = DataReport.from_dict(json.load(f))
            resumed.strict = self.data_report.strict
            self.data_report = resumed

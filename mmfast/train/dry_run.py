"""`--dry-run`: a training config checked without weights, and the plan of the run it describes.

`dry_run(argv)` resolves the arguments exactly as `mmfast-train` does (`parse_arguments`: one
`RunConfig`, for the planned processes), then runs the run's own checks, up to where weights would
load, and prints the plan the run would log:
- the resolved config's checks (the parser's, the recipe, the loss overrides, the dtype, GradCache
  under DeepSpeed);
- the checks the run makes before it loads anything (`run.check_before_loading`: the
  `--resume_from_checkpoint`, the settings the Trainer would reject once started), and
  `--metric_for_best_model` against the names the evaluation during training logs (its held-out
  sets read, not embedded), which the Trainer would find wrong only at the first evaluation;
- the data: the first `SAMPLE_ROWS` rows of each file read through the run's own loader
  (`run.load_training_data`: every missing path at once, the teacher a distilling recipe needs,
  columns, types, bad rows, a subset with no usable row), streamed, so a large file is neither read
  whole nor converted, and the epoch cut into batches for the planned processes (`run.build_sampler`,
  or `run.streaming_batches`), so each data error is the one training would give; rows training would
  skip are a warning;
- the model class: from the model's config.json when it is on this machine (a folder, or the local
  HF cache), else from the model id's family name; nothing is downloaded and no weights are loaded;
- the launcher: an `accelerate launch` config file, if given (`launch_config`), and what it means for
  this run (precision, GradCache under FSDP or DeepSpeed);
- the run's sections as its start-of-run log gives them (`run.run_sections`: the loss, the adapter,
  the contrastive batch, the negatives of each query, the GradCache mini-batch), for `processes`
  ranks (default: the accelerate config's num_processes, else $WORLD_SIZE, else 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .arguments import ModelArguments, TrainingArguments, option_value, parse_arguments, without_option
from .backbones import Family, auto_model_class, family_of
from .data_report import DataReport
from .data_spec import SAMPLE_ROWS
from .evaluate.during_training import check_metric_for_best_model
from .launch_config import check_against_training, check_launch_config
from .plan import BatchPlan, HardNegatives
from .run import (
    PATH_ERRORS,
    build_sampler,
    check_before_loading,
    hard_negatives,
    held_out_evaluation,
    load_training_data,
    run_sections,
    streaming_batches,
)
from .run_config import RunConfig, check_matryoshka_fits

# Family names as they appear in hub ids, most specific first ("llama3-llava-next" is LLaVA-NeXT).
NAME_PATTERNS = (
    (("qwen2.5-vl", "qwen2_5_vl", "qwen2.5vl"), "qwen2_5_vl"),
    (("qwen2-vl", "qwen2_vl", "qwen2vl"), "qwen2_vl"),
    (("onevision", "llava-ov", "llava_ov"), "llava_onevision"),
    (("llava-v1.6", "llava-1.6", "llava-next", "llava_next", "e5-v"), "llava_next"),
    (("llava-v1.5", "llava-1.5"), "llava"),
    (("phi-3.5-vision", "phi-3-vision", "phi3_v", "phi3.5-v"), "phi3_v"),
    (("qwen3",), "qwen3"),
    (("qwen2",), "qwen2"),
    (("llama",), "llama"),
    (("mistral",), "mistral"),
)


@dataclass
class Plan:
    """What a run would do (`sections`: label, text), what looks wrong (`warnings`), what would fail."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, label: str, text: str) -> None:
        self.sections.append((label, text))

    def format(self) -> str:
        width = max((len(label) for label, _ in self.sections), default=0)
        lines = []
        for label, text in self.sections:
            first, *rest = text.split("\n")
            lines.append(f"{label.ljust(width)}  {first}")
            lines += [f"{'':{width}}  {line}" for line in rest]
        lines += [f"warning: {w}" for w in self.warnings]  # the errors go to stderr, once (dry_run_main)
        verdict = "valid" if self.ok else f"NOT valid: {len(self.errors)} error(s)"
        lines.append(f"dry run: {verdict}, {len(self.warnings)} warning(s); no weights were loaded, nothing trained")
        return "\n".join(lines)


def _family_from_name(name: str) -> str | None:
    lowered = name.lower()
    for patterns, model_type in NAME_PATTERNS:
        if any(p in lowered for p in patterns):
            return model_type
    return None


def model_class(model_type: str, family: Family, config: dict | None = None) -> str:
    """The transformers class a model_type loads as (remote code: its auto_map entry)."""
    auto = auto_model_class(family).__name__
    if family.requires_remote_code:
        remote = ((config or {}).get("auto_map") or {}).get(auto)
        return f"{remote or 'its remote code'} (remote code, through {auto})"
    import transformers
    from transformers.models.auto import modeling_auto

    mapping = (
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if family.multimodal
        else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    name = mapping.get(model_type)
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"transformers {transformers.__version__} has no {auto} class for model_type {model_type!r}")
    return f"transformers.{name} (through {auto})"


def resolve_model(model_args: ModelArguments, plan: Plan) -> Family | None:
    """The model's family and class, from its config.json if present here, else from its name."""
    from transformers import PretrainedConfig

    from .default import BACKBONE

    name = model_args.model_name_or_path
    if name is None:
        family = family_of({"model_type": BACKBONE["family"]})
        plan.add("model", f"the embedded default: a tiny {family.name} built from its config on first use")
        return family
    config, where = None, None
    try:
        config, _ = PretrainedConfig.get_config_dict(name, local_files_only=True)
        where = f"its config.json ({'folder' if os.path.isdir(name) else 'local HF cache'})"
    except (OSError, ValueError):
        if os.path.isdir(name):
            plan.errors.append(f"--model_name_or_path {name}: the folder has no config.json")
            return None
        if name.startswith((".", "/", "~")):
            plan.errors.append(f"--model_name_or_path {name}: no such folder")
            return None
    model_type = config.get("model_type") if config else _family_from_name(name)
    if model_type is None:
        known = ", ".join(p[0] for p, _ in NAME_PATTERNS)
        plan.errors.append(
            f"--model_name_or_path {name}: not on this machine, and its family cannot be told from the name "
            f"(names with one of: {known}); give a folder with its config.json"
        )
        return None
    if where is None:
        where = "its name: it is not on this machine; a real run reads it from a folder or the local HF cache"
    try:
        family = family_of({"model_type": model_type})
        chosen = model_class(model_type, family, config)
    except ValueError as error:
        plan.errors.append(f"--model_name_or_path {name}: {error}")
        return None
    plan.add("model", f"{name}: model_type {model_type}, from {where}\nfamily {family.name} -> {chosen}")
    if family.requires_remote_code and not model_args.trust_remote_code:
        plan.errors.append(f"--model_name_or_path {name}: model_type {model_type!r} runs remote code; "
                           "set trust_remote_code: true")  # fmt: skip
    return family


def check_matryoshka(run: RunConfig, plan: Plan) -> None:
    """--matryoshka_dims against the model's hidden size, when its config.json is on this machine."""
    from transformers import PretrainedConfig

    from .default import BACKBONE

    if getattr(run.loss, "matryoshka_dims", None) is None:
        return
    name = run.model.model_name_or_path
    if name is None:
        size = BACKBONE["hidden_size"]
    else:
        try:
            config, _ = PretrainedConfig.get_config_dict(name, local_files_only=True)
        except (OSError, ValueError):
            return  # resolve_model says what is missing
        size = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    if isinstance(size, int):
        try:
            check_matryoshka_fits(run.loss, size)
        except ValueError as error:
            plan.errors.append(str(error))


def check_data(run: RunConfig, family: Family | None, plan: Plan) -> HardNegatives | None:
    """Reads the data as the run does (`run.load_training_data`: every missing path, every row) and cuts
    the epoch into batches for the planned processes; returns the rows' hard negatives (None if unread)."""
    recipe, data_args = run.recipe, run.data
    if not data_args.data:
        kind = {"mmeb": "MMEB-train rows", "nli": "NLI triplets", "nli_teacher": "NLI pairs + the teacher file"}
        plan.add("data", f"the embedded default data ({kind[recipe.data]}), generated on first use")
        per_row = {"mmeb": None, "nli": 1, "nli_teacher": 0}[recipe.data]  # the generated MMEB rows vary
        return None if per_row is None else HardNegatives.of([per_row])
    report = DataReport(strict=data_args.strict)
    try:  # what training does before it loads weights: read the rows, then cut the epoch into batches
        data = load_training_data(data_args, recipe, report, sample_rows=SAMPLE_ROWS)
        if data_args.streaming:
            streaming_batches(data, run)
        else:
            build_sampler(data, run)
    except PATH_ERRORS as error:
        plan.errors.append(str(error))
        return None
    mixture, lines = data.mixture, []
    for source in data.sources:
        read = sum(report.rows.get(str(path), 0) for path in source.paths)
        usable = mixture.sizes[mixture.names.index(source.name)]
        weight = "" if source.weight is None else f", weight {source.weight:g}"
        teacher = f", teacher {source.teacher}" if source.teacher else ""
        cut = any(report.rows.get(str(path), 0) >= SAMPLE_ROWS for path in source.paths)
        sample = f" (the first {SAMPLE_ROWS:,} of each file: a sample)" if cut else ""
        lines.append(f"{source.name}: {len(source.paths)} {source.format} file(s){weight}{teacher}; {read} row(s) "
                     f"read{sample}, {usable} usable")  # fmt: skip
    if report.total:
        plan.warnings.append(f"training will skip rows:\n  {report.summary()}")
    plan.add("data", "\n".join(lines))
    with_images = data.subsets_with_images()
    if family is not None and not family.multimodal and with_images:
        plan.errors.append(f"the model is text-only ({family.name}) but subset(s) {', '.join(with_images)} have images")
    return hard_negatives(data, data_args.max_negatives)


def _training_text(args: TrainingArguments) -> str:
    length = f"{args.max_steps} steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epoch(s)"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    text = f"{length}, lr {args.learning_rate:g} ({schedule}, warmup {args.warmup_steps:g}), {precision}"
    if getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing:
        text += ", activation checkpointing"
    if args.fsdp:
        text += f", FSDP {' '.join(str(o) for o in args.fsdp)}"
    if args.deepspeed:
        text += f", DeepSpeed {args.deepspeed}"
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy != "no" and args.eval_tasks:
        every = f"every {args.eval_steps:g} steps" if strategy == "steps" else "every epoch"
        on = "--eval_data" if args.eval_data else "the held-out sets"
        text += f"\nevaluates {' '.join(args.eval_tasks)} on {on} {every}"
    return text + f"\noutput_dir {args.output_dir}, seed {args.seed}"


def check_best_metric(run: RunConfig, family: Family | None, plan: Plan) -> None:
    """`--metric_for_best_model` against the names the evaluation during training logs (found by reading
    its held-out sets, not embedding them: `check_metric_for_best_model`)."""
    metric = run.training.metric_for_best_model
    if metric is None:
        return
    try:
        evaluation = held_out_evaluation(run.training)
    except PATH_ERRORS:
        return  # check_before_loading has reported it
    if evaluation is not None:
        try:
            check_metric_for_best_model(metric, evaluation, family)
        except PATH_ERRORS as error:
            plan.errors.append(str(error))


def dry_run(argv: Sequence[str] | None = None, *, processes: int | None = None, profile=None,
            accelerate_config: str | None = None) -> Plan:  # fmt: skip
    """The plan of `mmfast-train argv` (see the module docstring); never loads weights or trains.
    processes (given) wins over the accelerate config's num_processes, as `accelerate launch --num_processes`."""
    plan = Plan()
    launch = check_launch_config(accelerate_config) if accelerate_config is not None else None
    if launch is not None and processes is None:
        processes = launch.processes
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run = parse_arguments(argv, profile=profile, processes=processes)
    except SystemExit as exit_:  # HfArgumentParser has printed the offending argument
        plan.errors.append(f"the arguments do not parse (the parser's message is above; exit {exit_.code})")
        return plan
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError) as error:
        plan.errors.append(str(error))  # the resolved config's own checks: loss overrides, dtype, GradCache …
        return plan
    if launch is not None:
        check_against_training(launch, run)
        plan.errors += launch.errors
        if launch.errors:
            return plan
        plan.add("launcher", f"{accelerate_config}: {launch.text(run.processes)}")
        plan.warnings += launch.warnings
    logged = dict(run_sections(run, None))  # what the run logs at its start, in the plan's order
    plan.add("recipe", logged["recipe"])
    family = resolve_model(run.model, plan)
    check_matryoshka(run, plan)
    plan.add("adapter", logged["adapter"])
    _, errors = check_before_loading(run)
    plan.errors += errors
    check_best_metric(run, family, plan)
    negatives = check_data(run, family, plan)
    plan.add("batches", dict(run_sections(run, negatives))["batches"])
    plan.warnings += BatchPlan.of(run, negatives).warnings()
    plan.add("training", _training_text(run.training))
    return plan


def dry_run_main(argv: Sequence[str], *, program: str, profile=None) -> int:
    """Prints the plan; 0 when valid, 2 (each error on its own line on stderr) when not.
    argv may hold `--num_processes N` (plan for N data-parallel ranks) and `--accelerate_config FILE`
    (check the `accelerate launch` config file and plan for its processes)."""
    argv, processes = list(argv), None
    value = option_value(argv, "num_processes")
    if value is not None or "--num_processes" in argv:
        if value is None or not value.isdigit() or int(value) < 1:
            print(f"{program}: error: --num_processes needs a positive integer, got {value!r}", file=sys.stderr)
            return 2
        processes, argv = int(value), without_option(argv, "num_processes")
    accelerate_config = option_value(argv, "accelerate_config")
    if accelerate_config is None and "--accelerate_config" in argv:
        print(f"{program}: error: --accelerate_config needs a file", file=sys.stderr)
        return 2
    argv = without_option(argv, "accelerate_config")
    plan = dry_run(argv, processes=processes, profile=profile, accelerate_config=accelerate_config)
    print(plan.format())
    for error in plan.errors:
        print(f"{program}: error: {error}", file=sys.stderr)
    return 0 if plan.ok else 2

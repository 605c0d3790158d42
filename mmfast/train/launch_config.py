"""An `accelerate launch --config_file` file checked against the run it launches (`--dry-run
--accelerate_config FILE`), without GPUs and without DeepSpeed installed.

The file is read with accelerate's own loader (unknown top-level keys and an unknown
distributed_type fail there); the keys of fsdp_config and deepspeed_config must be options of
`accelerate launch` (accelerate itself would pass a misspelt one on silently). DeepSpeed: the
deepspeed_config_file exists, is JSON, and its zero_optimization.stage is 2 or 3 (or zero_stage is
set inline). Then, against the training arguments: the precision (the training config's bf16/fp16
win over the file's mixed_precision, as in transformers), and what GradCache does under the
sharded modes.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run_config import RunConfig

SUPPORTED = {
    "NO": "one process",
    "MULTI_CPU": "DDP on CPUs (gloo)",
    "MULTI_GPU": "DDP",
    "FSDP": "FSDP",
    "DEEPSPEED": "DeepSpeed",
}
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class LaunchCheck:
    """What the file sets up (`lines`), what to know (`notes`, `warnings`), what would fail (`errors`);
    processes: the total number of ranks (None when the file does not say)."""

    path: str
    processes: int | None = None
    distributed_type: str | None = None
    mixed_precision: str = "no"
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def text(self, processes: int | None = None) -> str:
        """The plan's launcher section; processes: a --num_processes given on the command line."""
        text = "\n".join([*self.lines, *(f"note: {note}" for note in self.notes)])
        if processes is not None and processes != self.processes:
            text += f"\n--num_processes {processes} replaces the file's {self.processes}"
        return text

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"accelerate config {self.path}: {key}: {message}")


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


def _check_sub_config(check: LaunchCheck, name: str, values, prefix: str | None = None) -> dict:
    if values in (None, {}):
        return {}
    if not isinstance(values, dict):
        check.error(name, f"must be a mapping, got {values!r}")
        return {}
    known = _launch_options()
    # accelerate launch adds the fsdp_ prefix to a key that lacks it
    unknown = [k for k in values if (k if prefix is None or k.startswith(prefix) else prefix + k) not in known]
    if unknown:
        check.error(name, f"unknown key(s) {', '.join(sorted(unknown))} (not options of accelerate launch)")
    return values


def _deepspeed_stage(check: LaunchCheck, deepspeed: dict) -> int | None:
    if "deepspeed_config_file" not in deepspeed:
        stage = deepspeed.get("zero_stage")
        if stage is None:
            check.error("deepspeed_config", "set deepspeed_config_file (or zero_stage)")
        return stage
    ds_file = Path(deepspeed["deepspeed_config_file"])
    key = "deepspeed_config.deepspeed_config_file"
    if not ds_file.is_file():
        check.error(key, f"{ds_file} does not exist (a relative path is taken from where you run)")
        return None
    try:
        ds_config = json.loads(ds_file.read_text())
    except json.JSONDecodeError as error:
        check.error(key, f"{ds_file} is not valid JSON: {error}")
        return None
    stage = (ds_config.get("zero_optimization") or {}).get("stage") if isinstance(ds_config, dict) else None
    if stage is None:
        check.error(key, f"{ds_file} has no zero_optimization.stage")
    if "zero_stage" in deepspeed:
        check.error("deepspeed_config.zero_stage", "set it in the deepspeed_config_file, not both (accelerate refuses)")
    return stage


def check_launch_config(path: str | Path) -> LaunchCheck:
    """Reads and checks an accelerate config file on its own (see the module docstring)."""
    from accelerate.commands.config.config_args import load_config_from_file

    check = LaunchCheck(str(path))
    if not Path(path).is_file():
        check.errors.append(f"accelerate config {path}: no such file")
        return check
    try:
        config = load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError) as error:  # accelerate names the key or the bad value
        check.errors.append(f"accelerate config {path}: {error}")
        return check
    except Exception as error:  # a YAML syntax error: yaml's own message names the line
        check.errors.append(f"accelerate config {path}: does not parse: {error}")
        return check
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    check.distributed_type = kind
    if kind not in SUPPORTED:
        check.error("distributed_type", f"{kind} is not one mmfast's trainer runs under ({', '.join(SUPPORTED)})")
    processes, machines = config.num_processes, config.num_machines
    if not isinstance(processes, int) or processes < 1:
        check.error("num_processes", f"must be a positive integer (all machines' processes), got {processes!r}")
    elif not isinstance(machines, int) or machines < 1 or processes % machines:
        check.error("num_machines", f"must be a positive divisor of num_processes ({processes}), got {machines!r}")
    else:
        check.processes = processes
    precision = check.mixed_precision = config.mixed_precision or "no"
    if precision not in PRECISIONS:
        check.error("mixed_precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fsdp = _check_sub_config(check, "fsdp_config", config.fsdp_config, prefix="fsdp_")
    deepspeed = _check_sub_config(check, "deepspeed_config", config.deepspeed_config)
    where = f"{processes} process(es) on {machines} machine(s)"
    text = f"{SUPPORTED.get(kind, kind)} ({kind}), {where}, mixed_precision {precision}"
    if kind == "FSDP":
        version = fsdp.get("fsdp_version", 1)
        if version not in (1, 2):
            check.error("fsdp_config.fsdp_version", f"must be 1 or 2, got {version!r}")
        state_dict = fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT")
        if state_dict != "FULL_STATE_DICT":
            check.error("fsdp_config.fsdp_state_dict_type", f"mmfast saves the encoder from the full state dict: "
                        f"use FULL_STATE_DICT, got {state_dict!r}")  # fmt: skip
        text += f"\nFSDP{version}, wrap {fsdp.get('fsdp_auto_wrap_policy', 'NO_WRAP')}, " + (
            "parameters resharded after forward" if fsdp.get("fsdp_reshard_after_forward", True) else "no reshard"
        )
    elif kind == "DEEPSPEED":
        stage = _deepspeed_stage(check, deepspeed)
        if stage is not None and stage not in (2, 3):
            check.error("deepspeed zero stage", f"the examples ship ZeRO-2 and ZeRO-3 configs; got stage {stage!r}")
        text += f"\nZeRO-{stage}" + (f" from {deepspeed['deepspeed_config_file']}" if "deepspeed_config_file" in
                                     deepspeed else "")  # fmt: skip
        if importlib.util.find_spec("deepspeed") is None:
            check.notes.append("deepspeed is not installed here: the file was checked, not run "
                               "(pip install deepspeed on the GPU machine)")  # fmt: skip
    check.lines.append(text)
    return check


def check_against_training(check: LaunchCheck, run: RunConfig) -> None:
    """What the launch config means for this run (its resolved `RunConfig`): its precision, and GradCache
    under sharding."""
    if check.distributed_type is None:
        return
    training_args, mini_batching = run.training, run.mini_batching
    file_precision = check.mixed_precision
    training = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else None
    if training is not None and training != file_precision:
        check.warnings.append(f"the training config sets {training} and the accelerate config mixed_precision "
                              f"{file_precision}: the run uses {training} (the training config wins)")  # fmt: skip
    elif training is None and file_precision != "no":
        check.warnings.append(f"the training config sets neither bf16 nor fp16: the run uses the accelerate "
                              f"config's mixed_precision {file_precision}")  # fmt: skip
    if not mini_batching.grad_cache:
        return
    if check.distributed_type == "DEEPSPEED":
        try:
            mini_batching.check_engine("deepspeed")
        except ValueError as error:
            check.errors.append(f"accelerate config {check.path}: {error}")
    elif check.distributed_type == "FSDP":
        held = training_args.gradcache_fsdp_sync == "last_mini_batch"
        check.notes.append(
            "GradCache under FSDP2 (proven on CPU processes, not on GPUs): each mini-batch all-gathers the "
            "parameters for its no-grad forward and again for its forward with grad. gradcache_fsdp_sync "
            f"{training_args.gradcache_fsdp_sync}: "
            + ("the gradients stay unsharded until the last mini-batch, so a full fine-tune holds a whole model's "
               "gradients per GPU (with LoRA only the adapter's); every_mini_batch keeps them sharded for more "
               "reduce-scatters" if held else
               "the gradients are reduce-scattered (sharded) after every mini-batch, one reduce-scatter per unit "
               "per mini-batch")
            + ". A side with images on some ranks only runs a blank image through the others' vision tower; hard "
            "negatives must be on every rank or none, else the step stops with an error"
        )  # fmt: skip

"""The arguments of `mmfast-train`: transformers' TrainingArguments plus mmfast's fields.

Precedence, lowest first: the dataclass defaults, the recipe's published defaults, the embedded
default's profile (only when neither a model nor data is given), the config file, the command line.
Every layer is turned into command-line tokens and parsed once by `HfArgumentParser`, so a value
from a file is checked exactly like one typed on the command line. `parse_arguments` then resolves
the parsed arguments once into the run's `run_config.RunConfig`, which the whole run reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from .mapping_file import read_mapping_file
from .recipes import RECIPES, Recipe, get_recipe
from .run_config import RunConfig, loss_overrides, resolve_loss

DEFAULT_RECIPE = "llave"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A backbone folder or hub id in the local cache; none = the embedded default"}
    )
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of the full model"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names or one regex; none = every projection of the language model's decoder "
            "(attention and MLP)"
        },
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA) via peft"})
    freeze_vision_tower: bool = False
    attn_implementation: str | None = field(
        default=None, metadata={"help": "flash_attention_2 when importable, else sdpa (the default)"}
    )
    model_dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 weights"})
    text_prompt: str | None = field(default=None, metadata={"help": "Prompt for text inputs, with {text}"})
    image_prompt: str | None = field(default=None, metadata={"help": "Prompt for image inputs, with {text}"})
    max_length: int | None = field(default=None, metadata={"help": "Token limit; cuts text, not images"})
    padding_side: str | None = field(default=None, metadata={"help": "left or right; none = the processor's"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Needed for Phi-3.5-V (untested offline)"})
    image_resolution: str | None = field(
        default=None, metadata={"help": "VLM2Vec V1's resize of every image: high 1344², mid 672², low 128²"}
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Qwen-VL processor's min pixels (VLM2Vec V2: 3136)"})
    max_pixels: int | None = field(
        default=None, metadata={"help": "Qwen-VL processor's max pixels (VLM2Vec V2: 1003520)"}
    )
    image_token_style: str | None = field(
        default=None, metadata={"help": "mmfast or vlm2vec (Qwen-VL gets a bare <|image_pad|>, as VLM2Vec)"}
    )
    mask_non_image_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Multi-vector: an input with an image keeps its image tokens' vectors only (ColQwen2's "
            "option; the colpali recipe's default)"
        },
    )


@dataclass
class DataArguments:
    data: list[str] | None = field(
        default=None,
        metadata={"help": "MMEB-train .jsonl/.parquet files, an NLI .csv, or a mixture .yaml; none = embedded default"},
    )
    image_dir: str | None = field(default=None, metadata={"help": "Root of the image paths in the data"})
    mmeb_split: str = field(
        default="original",
        metadata={"help": "MMEB-train instruction split to train on: original or diverse_instruction (never both)"},
    )
    num_sample_per_subset: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of each subset (VLM2Vec's cap); none = all"}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher embeddings (.npy/.safetensors), UniME stage 1"}
    )
    homogeneous_batches: bool = field(default=False, metadata={"help": "Every batch from one subset (VLM2Vec v2)"})
    max_negatives: int | None = field(default=None, metadata={"help": "Use at most this many hard negatives per row"})
    strict: bool = field(default=False, metadata={"help": "Any bad row is an error naming the file and row"})
    batch_order: str | None = field(
        default=None,
        metadata={"help": "A batch order file (mmfast-mine --batch_order): train on its batches, in a seeded order "
                  "per epoch, instead of shuffled ones"},
    )  # fmt: skip
    streaming: bool = field(
        default=False,
        metadata={"help": "Read rows from the data files as training needs them, converting nothing up front "
                  "(data too large to convert); needs --max_steps"},
    )  # fmt: skip


# When GradCache syncs gradients under FSDP (EmbeddingTrainer.defer_gradient_sync).
FSDP_SYNCS = ("last_mini_batch", "every_mini_batch")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    recipe: str = field(default=DEFAULT_RECIPE, metadata={"help": f"One of: {', '.join(RECIPES)}"})
    gradcache_mini_batch_size: int = field(
        default=0, metadata={"help": "GradCache mini-batch (rows encoded at once); 0 = no GradCache"}
    )
    gradcache_mini_batch_tokens: int = field(
        default=0,
        metadata={"help": "GradCache mini-batches of at most this many tokens (every side of their rows, padded, "
                  "image tokens included; with gradcache_mini_batch_size, at most that many rows too); 0 = off"},
    )  # fmt: skip
    gradcache_fsdp_sync: str = field(
        default="last_mini_batch",
        metadata={"help": "Under FSDP, when GradCache reduce-scatters the gradients: last_mini_batch (once per "
                  "step; each process holds its units' unsharded gradients until then) or every_mini_batch "
                  "(sharded gradient memory, one reduce-scatter per unit per mini-batch)"},
    )  # fmt: skip
    loss_backend: str = field(default="auto", metadata={"help": "auto, cpu, triton, torch or reference"})
    mask_duplicate_candidates: bool = field(
        default=True,
        metadata={"help": "Leave copies of a positive (same text and image) out of each row's negatives; logged "
                  "per step as masked_candidates"},
    )  # fmt: skip
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op threads on CPU (none = torch's default); tiny models run best on 1"},
    )
    # What `--eval_strategy` evaluates (`evaluate.during_training`): mmfast's tasks, not an eval loss.
    eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Tasks evaluated at each --eval_strategy point (mmeb, retrieval, sugarcrepe, video, "
                  "visdoc); logged as eval_<set>_<metric>, e.g. eval_flickr30k_t2i_R@1"},
    )  # fmt: skip
    eval_data: list[str] | None = field(
        default=None, metadata={"help": "One data path per --eval_tasks entry; none = the embedded held-out sets"}
    )
    eval_image_root: list[str] | None = field(
        default=None, metadata={"help": "One image root per --eval_tasks entry, with --eval_data"}
    )
    # HF's 500 logs nothing in a short run; a fraction below 1 is HF's own "of the run's steps" (ceil).
    logging_steps: float = field(
        default=0.02,
        metadata={"help": "Log every N steps; below 1, every that fraction of the run's steps (0.02: about 50 "
                  "points of the loss curve, every step in a run of 50 or fewer)"},
    )  # fmt: skip
    # A contrastive batch must be whole: a partial last batch has fewer negatives and spikes the loss.
    dataloader_drop_last: bool = True
    remove_unused_columns: bool = False

    def __post_init__(self):
        if self.gradcache_fsdp_sync not in FSDP_SYNCS:
            raise ValueError(f"gradcache_fsdp_sync must be {' or '.join(FSDP_SYNCS)}, got {self.gradcache_fsdp_sync!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"cpu_threads must be a positive integer, got {self.cpu_threads}")
        if self.loss_backend not in ("auto", "cpu", "triton", "torch", "reference"):
            raise ValueError(f"loss_backend must be auto, cpu, triton, torch or reference, got {self.loss_backend!r}")
        if not self.use_cpu and not torch.cuda.is_available():
            # Without this, accelerate does not set up data parallelism on a CPU-only machine: torchrun's
            # ranks would each train alone, silently.
            self.use_cpu = True
        super().__post_init__()


@dataclass
class LossArguments:
    """Overrides of the recipe's loss options, each named as the core option (`mmfast.ContrastiveLossOptions`)
    and None for the recipe's own value. A new overridable option is one field here: `RunConfig.resolve`
    applies it, the plan describes it, tests/train/test_run_config.py checks it."""

    temperature: float | None = field(default=None, metadata={"help": "Contrastive τ; none = the recipe's"})
    hardness: float | None = field(
        default=None, metadata={"help": "LLaVE's α (0 = plain InfoNCE); none = the recipe's"}
    )
    false_negative_margin: float | None = field(
        default=None, metadata={"help": "UniME's β false-negative filter; none = the recipe's"}
    )
    topk: int | None = field(default=None, metadata={"help": "UniME's k hardest negatives; none = the recipe's"})
    symmetric: bool | None = field(
        default=None, metadata={"help": "Also the loss of targets against queries; none = the recipe's"}
    )
    matryoshka_dims: list[int] | None = field(
        default=None,
        metadata={"help": "Matryoshka: also train each prefix of the embedding of these sizes, increasing, the "
                  "largest at most the embedding size (e.g. 64 256 1024); none = the full embedding only"},
    )  # fmt: skip
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per --matryoshka_dims entry; none = all 1"}
    )
    loss: str | None = field(
        default=None,
        metadata={"help": "The loss: infonce or sigmoid (SigLIP, with a learnable scale and bias) for the "
                  "single-vector recipes; infonce or pairwise for colpali; none = the recipe's"},
    )  # fmt: skip
    siglip_scale_init: float | None = field(
        default=None, metadata={"help": "--loss sigmoid: the learnable logit scale's initial t (SigLIP: 10)"}
    )
    siglip_bias_init: float | None = field(
        default=None, metadata={"help": "--loss sigmoid: the learnable logit bias's initial b (SigLIP: -10)"}
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LossArguments)


def known_fields() -> set[str]:
    return {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls)}


def read_config(path: str | os.PathLike) -> dict:
    """A YAML or JSON file of argument names to values; errors name the file."""
    config = read_mapping_file(path, "config file")
    unknown = sorted(set(config) - known_fields())
    if unknown:
        raise ValueError(f"config file {path}: unknown argument(s) {', '.join(unknown)}")
    return config


def to_tokens(values: Mapping) -> list[str]:
    """Argument values as command-line tokens for HfArgumentParser (None means: leave it unset)."""
    tokens = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            tokens += [f"--{name}", *map(str, value)]
        elif isinstance(value, Mapping):
            tokens += [f"--{name}", json.dumps(dict(value))]
        else:
            tokens += [f"--{name}", str(value)]
    return tokens


def option_value(argv: Sequence[str], name: str) -> str | None:
    """The last value given to --name on the command line (--name V or --name=V), or None."""
    value = None
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def without_option(argv: Sequence[str], name: str) -> list[str]:
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token == f"--{name}":
            skip = i + 1 < len(argv)
        elif not token.startswith(f"--{name}="):
            out.append(token)
    return out


def _config_and_choices(argv: Sequence[str]) -> tuple[dict, list[str], set[str]]:
    """argv's --config file (read), argv without it, and the options either sets."""
    config_path = option_value(argv, "config")
    argv = without_option(argv, "config")
    config = read_config(config_path) if config_path else {}
    return config, argv, set(config) | {name for name in known_fields() if option_value(argv, name) is not None}


def with_default_evaluation(argv: Sequence[str], recipe: str = DEFAULT_RECIPE) -> list[str]:
    """argv, after the embedded default's evaluation during training (`default.EVALUATION`, or its
    multi-vector one) when argv trains the embedded default (no model, no data) and neither it nor its
    config file says how to evaluate, nor shards the model (evaluation under FSDP or DeepSpeed is untested).
    `recipe`: the one trained when neither argv nor its config names one. The tokens go first, so that an
    option left without its value at argv's end stays an error of its own. A broken config or recipe is
    left for `parse_arguments` to report."""
    from .default import EVALUATION, MULTI_VECTOR_EVALUATION

    argv = list(argv)
    try:
        config, rest, chosen = _config_and_choices(argv)
        trained = get_recipe(option_value(rest, "recipe") or config.get("recipe") or recipe)
    except (ValueError, FileNotFoundError):
        return argv
    if chosen & {"model_name_or_path", "data", "eval_strategy", "eval_tasks", "fsdp", "deepspeed"}:
        return argv
    return to_tokens(MULTI_VECTOR_EVALUATION if trained.is_multi_vector else EVALUATION) + argv


def _parsed(argv: Sequence[str] | None, profile: Mapping | None) -> tuple[tuple, Recipe]:
    """The argument dataclasses (one per ARGUMENT_CLASSES) of argv with --config and the profile
    layered in, and the recipe they name (looked up once, here)."""
    config, argv, chosen = _config_and_choices(list(argv or []))
    recipe = get_recipe(option_value(argv, "recipe") or config.get("recipe") or DEFAULT_RECIPE)

    layers = [dict(recipe.model_defaults), dict(recipe.training_defaults)]
    if profile and not any(key in chosen for key in ("model_name_or_path", "data")):
        layers.append(dict(profile))
    if "output_dir" not in chosen:
        layers.append({"output_dir": f"runs/{recipe.name}"})
    layers.append(config)
    tokens = [token for layer in layers for token in to_tokens(layer)] + argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    return tuple(parser.parse_args_into_dataclasses(args=tokens)), recipe


def parse_arguments(
    argv: Sequence[str] | None = None, *, profile: Mapping | None = None, processes: int | None = None
) -> RunConfig:
    """Parses `mmfast-train` arguments (`--config FILE.yaml|json` plus command-line overrides) and
    resolves them once into the run's `RunConfig`.

    profile: defaults for the embedded default run, applied when neither --model_name_or_path nor
    --data is given anywhere. processes: the data-parallel processes to plan for (a dry run); None for
    the live world size.
    """
    (model_args, data_args, training_args, loss_args), recipe = _parsed(argv, profile)
    return RunConfig.resolve(model_args, data_args, training_args, loss_args, recipe, processes=processes)


HELP_FLAGS = ("-h", "--help")


def print_help(argv: Sequence[str], *, profile: Mapping | None = None, program: str = "mmfast-train") -> None:
    """`--help`: every option the command takes, each default being the value this run would use (the
    recipe's, the profile's, the config file's and the command line's, as `parse_arguments` layers them)."""
    resolved, recipe = _parsed([token for token in argv if token not in HELP_FLAGS], profile)
    parser = HfArgumentParser(ARGUMENT_CLASSES, prog=program,
                              description="Train an embedding model with a recipe. Each default shown is the value "
                              "this run would use, given the other arguments on this command line.")  # fmt: skip
    own = parser.add_argument_group(f"{program}'s own options")
    hidden = {"default": argparse.SUPPRESS}  # no "(default: None)" after these
    own.add_argument(
        "--config", metavar="FILE", help="a YAML or JSON file of these arguments; the command line wins", **hidden
    )
    own.add_argument(
        "--dry-run",
        action="store_true",
        **hidden,
        help="check the run up to where weights would load and print its plan; exit 2 on an error",
    )
    own.add_argument(
        "--num_processes",
        metavar="N",
        **hidden,
        help="with --dry-run: plan for N data-parallel processes (default: --accelerate_config's, "
        "else $WORLD_SIZE, else 1)",
    )
    own.add_argument(
        "--accelerate_config",
        metavar="FILE",
        **hidden,
        help="with --dry-run: check an `accelerate launch` config file and plan for its processes",
    )
    values = {f.name: getattr(args, f.name) for args in resolved for f in dataclasses.fields(args)}
    # A loss option's default is the value the run's loss takes (the recipe's, unless overridden).
    overrides = loss_overrides(resolved[-1])
    loss = None if recipe.is_distillation else resolve_loss(recipe, overrides, backend="auto", processes=1)
    values.update({f.name: getattr(loss, f.name) for f in dataclasses.fields(LossArguments) if hasattr(loss, f.name)})
    parser.set_defaults(**{name: getattr(value, "value", value) for name, value in values.items()})
    parser.print_help()

"""What differs per backbone family: model class, image token, vision tower, LoRA targets, positions.

A `Family` is chosen from `config.model_type`. Everything above this module (the Encoder, the trainer)
is family-agnostic: it rewrites MMEB prompts with `rewrite_image_tokens`, batches them with
`processor_inputs` and reads `last_hidden_state`.

Batch invariance: `last_hidden_state` passes position ids counted over each row's real tokens (M-RoPE
ids from the model's own `get_rope_index` for Qwen), so a row gets the same positions alone, padded on
either side, or next to rows with or without images. The model's defaults do not guarantee that: a
left-padded row would start at position = its pad count, and Qwen's text-only batches use plain
`arange` positions.

Phi-3.5-V (`phi3_v`) runs its remote code and is supported through `trust_remote_code=True`; it is
untested offline, since no tiny Phi-3.5-V can be built without downloading that code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from mmfast.train.placeholder import IMAGE_PLACEHOLDER, placeholder_problem
from mmfast.train.processors import (
    VIDEO_FILL_TOKEN,
    load_processor,
    processor_inputs,
    register_processors,
    save_backbone_processor,
    tokenizer_of,
)

__all__ = [
    "FAMILIES",
    "Family",
    "attn_implementation",
    "auto_model_class",
    "family_of",
    "last_hidden_state",
    "load_backbone",
    "lora_target_modules",
    "position_ids",
    "processor_inputs",
    "rewrite_image_tokens",
    "save_backbone_processor",
    "tokenizer_of",
    "unwrap_model",
    "vision_tower",
]


@dataclass(frozen=True)
class Family:
    name: str
    multimodal: bool
    # What MMEB's "<|image_1|>" becomes in a prompt.
    image_token: str | None
    # The token the processor repeats once per image feature (None: Phi-3.5-V uses negative ids).
    image_fill_token: str | None
    # The tokens an image expands into after processing; truncation never removes them.
    image_span_tokens: tuple[str, ...]
    model_types: tuple[str, ...]
    # Attribute paths from the top-level model (`...ForConditionalGeneration` / `...ForCausalLM`).
    language_model_path: str
    vision_tower_path: str | None
    mrope: bool = False
    accepts_logits_to_keep: bool = True
    requires_remote_code: bool = False
    # What the placeholder becomes when the input is a video (None: the family takes no video input),
    # and the tokens a video expands into.
    video_token: str | None = None
    video_span_tokens: tuple[str, ...] = ()


def _qwen(name: str) -> Family:
    span = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
    video_span = ("<|vision_start|>", VIDEO_FILL_TOKEN, "<|vision_end|>")
    return Family(name=name, multimodal=True, image_token="".join(span), image_fill_token="<|image_pad|>",
                  image_span_tokens=span, model_types=(name,), language_model_path="model.language_model",
                  vision_tower_path="model.visual", mrope=True, video_token="".join(video_span),
                  video_span_tokens=video_span)  # fmt: skip


def _llava(name: str) -> Family:
    return Family(name=name, multimodal=True, image_token="<image>", image_fill_token="<image>",
                  image_span_tokens=("<image>",), model_types=(name,), language_model_path="model.language_model",
                  vision_tower_path="model.vision_tower")  # fmt: skip


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        _qwen("qwen2_vl"),
        _qwen("qwen2_5_vl"),
        _llava("llava_onevision"),
        _llava("llava_next"),
        _llava("llava"),
        Family(name="causal_lm", multimodal=False, image_token=None, image_fill_token=None, image_span_tokens=(),
               model_types=("qwen2", "qwen3", "llama", "mistral"), language_model_path="model",
               vision_tower_path=None),
        # Phi-3.5-V's own processor expands "<|image_1|>" (into negative ids), so the placeholder stays.
        Family(name="phi3_v", multimodal=True, image_token=IMAGE_PLACEHOLDER, image_fill_token=None,
               image_span_tokens=(), model_types=("phi3_v",), language_model_path="model",
               vision_tower_path="model.vision_embed_tokens", accepts_logits_to_keep=False, requires_remote_code=True),
    )
}  # fmt: skip
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.model_types}

# Attention and MLP projections of a decoder layer, in every supported family (Phi-3 fuses qkv and gate_up).
_LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")
_ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


def family_of(config) -> Family:
    """The family of a config (or a config dict) by its `model_type`."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_BY_MODEL_TYPE))}")
    return _BY_MODEL_TYPE[model_type]


def attn_implementation(requested: str | None = None) -> str:
    """`flash_attention_2` when flash-attn is importable and CUDA is available, else `sdpa`."""
    flash_ok = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if requested is None:
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested in ("sdpa", "eager"):
        return requested
    if requested == "flash_attention_2":
        if not flash_ok:
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA device "
                f"(flash_attn importable: {importlib.util.find_spec('flash_attn') is not None}, "
                f"CUDA available: {torch.cuda.is_available()}); use 'sdpa' instead"
            )
        return requested
    raise ValueError(f"attn_implementation must be 'flash_attention_2', 'sdpa', 'eager' or None, got {requested!r}")


def load_backbone(path, *, dtype=None, attn_implementation=None, trust_remote_code: bool = False):
    """Load `(model, processor, family)` from a local folder or a hub id already in the local cache.

    `dtype=None` keeps transformers' default (the checkpoint's own dtype); `attn_implementation=None`
    picks flash_attention_2 when it can run, else sdpa. Nothing is downloaded (`local_files_only`).
    """
    config_dict, _ = PretrainedConfig.get_config_dict(str(path), local_files_only=True)
    family = family_of(config_dict)
    if family.requires_remote_code and not trust_remote_code:
        raise ValueError(f"{path}: model_type {family.name!r} runs remote code; pass trust_remote_code=True")
    register_processors()
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(path, **options)
    model = auto_model_class(family).from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation=_resolve_attention(attn_implementation),
        **options,
    )
    return model, load_processor(path, family, trust_remote_code=trust_remote_code), family


def auto_model_class(family: Family):
    """The transformers auto class a family loads with (Phi-3.5-V's remote code is a causal LM)."""
    return AutoModelForImageTextToText if family.multimodal and family.name != "phi3_v" else AutoModelForCausalLM


def _resolve_attention(requested):
    # load_backbone's `attn_implementation` argument shadows the function of that name.
    return attn_implementation(requested)


def rewrite_image_tokens(text: str, family: Family, *, video: bool = False) -> str:
    """Replace MMEB's `<|image_1|>` by the family's image token (its video token when the input is a
    video); a text without it is returned unchanged."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if IMAGE_PLACEHOLDER not in text:
        return text
    if not family.multimodal:
        raise ValueError(f"family {family.name!r} is text-only, but the text holds {IMAGE_PLACEHOLDER}")
    problem = placeholder_problem(text, has_image=True, what="text")
    if problem:
        raise ValueError(f"{problem}; one image per text is supported")
    if video:
        if family.video_token is None:
            raise ValueError(
                f"family {family.name!r} takes no video input in mmfast (Qwen2-VL and Qwen2.5-VL do); "
                "embed its frames as images instead (evaluate_video averages them)"
            )
        return text.replace(IMAGE_PLACEHOLDER, family.video_token)
    return text.replace(IMAGE_PLACEHOLDER, family.image_token)


def with_token_style(family: Family, style: str) -> Family:
    """The family as an image-token style writes it: "vlm2vec" gives Qwen-VL VLM2Vec's bare
    `<|image_pad|>` for `<|image_1|>` (no vision start/end tokens), and with it VLM2Vec's positions
    (`position_ids`); LLaVA's `<image>` and Phi-3.5-V's placeholder are VLM2Vec's already."""
    if style == "mmfast" or not family.mrope:
        return family
    if style != "vlm2vec":
        raise ValueError(f"image_token_style must be 'mmfast' or 'vlm2vec', got {style!r}")
    return dataclasses.replace(
        family, image_token=family.image_fill_token, image_span_tokens=(family.image_fill_token,),
        video_token=VIDEO_FILL_TOKEN, video_span_tokens=(VIDEO_FILL_TOKEN,),
    )  # fmt: skip


def set_pixel_range(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Sets a Qwen-VL image processor's pixel range, as VLM2Vec V2 builds its processor (`size` with
    shortest_edge = min_pixels, longest_edge = max_pixels); None keeps the processor's value."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} exceeds max_pixels {size['longest_edge']}")
    image_processor.size = size
    for name, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / FSDP / DeepSpeed / torch.compile and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel
    from peft import PeftModel

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def position_ids(model: nn.Module, family: Family, batch: Mapping) -> torch.Tensor:
    """Position ids counted over each row's real tokens: `[B, T]`, or `[3, B, T]` (M-RoPE) for Qwen."""
    mask = batch["attention_mask"]
    text_positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if family.mrope and family.image_token == family.image_fill_token:
        # VLM2Vec's bare <|image_pad|> (`with_token_style`): VLM2Vec's Qwen-VL models find an image by the
        # <|vision_start|> before it, so without one every token, the image's too, gets text positions.
        return text_positions.unsqueeze(0).expand(3, -1, -1)
    if family.mrope:
        if "mm_token_type_ids" not in batch:
            raise ValueError(
                f"{family.name} batches need 'mm_token_type_ids' for M-RoPE; build them with processor_inputs"
            )
        if not batch["mm_token_type_ids"].any():
            # No image or video token: get_rope_index would give each row 0, 1, ... over its real tokens on
            # all three axes and 0 at padding, through a Python loop per row (most of a text batch's time).
            return text_positions.masked_fill(~mask.bool(), 0).unsqueeze(0).expand(3, -1, -1)
        rope_model = unwrap_model(model).model
        extra = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch}
        positions, _ = rope_model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], attention_mask=mask, **extra
        )
        return positions
    return text_positions


def last_hidden_state(model: nn.Module, family: Family, batch: Mapping) -> torch.Tensor:
    """The final-norm output of the last layer, `[B, T, H]`, for a batch from `processor_inputs`.

    The top-level model is called (so peft, DDP and FSDP wrappers keep working) with only the last
    position's logits computed.
    """
    inputs = dict(batch)
    inputs["position_ids"] = position_ids(model, family, batch)
    if family.accepts_logits_to_keep:
        inputs["logits_to_keep"] = 1
    outputs = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    return outputs.hidden_states[-1]


def vision_tower(model: nn.Module, family: Family) -> nn.Module | None:
    """The vision encoder (for Qwen including its merger); None for text-only families."""
    if family.vision_tower_path is None:
        return None
    return _submodule(unwrap_model(model), family.vision_tower_path, "vision tower", family)


def lora_target_modules(model: nn.Module, family: Family, *, include_mlp: bool = True) -> str:
    """A peft `target_modules` regex matching the language model's decoder projections only.

    The regex is anchored at the language model's path in the unwrapped model, so no vision-tower or
    projector module can match. `include_mlp=False` keeps attention projections only.
    """
    base = unwrap_model(model)
    language_model = _submodule(base, family.language_model_path, "language model", family)
    present = {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}
    leaves = [leaf for leaf in (_LORA_LEAVES if include_mlp else _ATTENTION_LEAVES) if leaf in present]
    if not leaves:
        raise ValueError(f"{type(base).__name__} has none of the projections {', '.join(_LORA_LEAVES)}")
    return rf"{re.escape(family.language_model_path)}\.layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(leaves)})"


def _submodule(model: nn.Module, path: str, what: str, family: Family) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise ValueError(f"{type(model).__name__} has no {what} at {path!r} (family {family.name!r})") from error

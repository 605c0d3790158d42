"""Tiny backbones of every supported family, built from their configs with random (seeded) weights.

`build_tiny_backbone` writes a model and its processor into one folder that `load_backbone` reloads
identically. The image processors are the `*ImageProcessorPil` classes (torchvision is never needed).
Word embeddings are tied to the LM head: the head is unused by an embedding model, and tying keeps it
from being a parameter without a gradient (which DDP would otherwise have to be told about).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    SiglipVisionConfig,
)

from mmfast.train.backbones import FAMILIES
from mmfast.train.default.tokenizer import train_tokenizer
from mmfast.train.processors import (
    LlavaOnevisionNoVideoProcessor,
    Qwen2_5_VLNoVideoProcessor,
    Qwen2VLNoVideoProcessor,
    save_backbone_processor,
)

BUILDABLE = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next", "llava", "causal_lm")
TEXT_CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "mistral": MistralConfig}
# The language model each multimodal family ships with.
_NATURAL_TEXT_MODEL = {"llava_onevision": "qwen2", "llava_next": "llama", "llava": "llama", "causal_lm": "qwen2"}
PATCH_SIZE = 14


def default_corpus() -> list[str]:
    """A small fallback corpus for the tokenizer: shape captions and the prompts the recipes use.

    The embedded default should pass its generated data's texts instead; this only keeps
    `build_tiny_backbone` usable on its own.
    """
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star")
    positions = ("top left", "top right", "bottom left", "bottom right", "center")
    counts = ("one", "two", "three", "four")
    captions = [
        f"{count} {colour} {shape}{'s' if count != 'one' else ''} at the {position}"
        for count in counts
        for colour in colours
        for shape in shapes
        for position in positions
    ]
    prompts = [
        "Summary above sentence in one word:",
        "Summary above image in one word:",
        "<|image_1|> Represent the given image with the following question:",
        "Represent the given image.",
        "Find an image that matches the given caption.",
        "Retrieve the caption that describes the image.",
        "moving left moving right moving up moving down",
    ]
    return captions + prompts


def build_tiny_backbone(
    family: str,
    out_dir,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    corpus: Iterable[str] | None = None,
    text_model: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_layers: int = 2,
    vision_width: int = 32,
    vision_heads: int = 2,
    image_size: int = 56,
    seed: int = 0,
) -> Path:
    """Build a tiny `family` backbone (random init, seeded) and save model + processor into `out_dir`.

    `tokenizer` defaults to one trained on `corpus` (default: `default_corpus()`); it must carry the
    image tokens of `mmfast.train.default.tokenizer.IMAGE_TOKENS`. `text_model` picks the language model
    of `causal_lm` ("qwen2", "qwen3", "llama", "mistral"); the multimodal families use their own.
    """
    if family not in BUILDABLE:
        raise ValueError(f"family must be one of {', '.join(BUILDABLE)}, got {family!r}")
    text_model = _text_model(family, text_model)
    _check_sizes(family, hidden_size, num_heads, vision_width, vision_heads, image_size)
    if tokenizer is None:
        tokenizer = train_tokenizer(default_corpus() if corpus is None else corpus)
    elif corpus is not None:
        raise ValueError("pass either tokenizer or corpus, not both")
    ids = _token_ids(tokenizer, family)

    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    vision = {"layers": vision_layers, "width": vision_width, "heads": vision_heads, "image_size": image_size}
    config, processor = _CONFIG_AND_PROCESSOR[family](tokenizer, text_model, text, vision, ids)

    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    model_class = AutoModelForImageTextToText if FAMILIES[family].multimodal else AutoModelForCausalLM
    model = model_class.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    save_backbone_processor(processor, out_dir)
    return out_dir


def _text_model(family: str, text_model: str | None) -> str:
    if text_model is None:
        return "qwen2" if family in ("qwen2_vl", "qwen2_5_vl") else _NATURAL_TEXT_MODEL[family]
    if family != "causal_lm":
        raise ValueError(f"text_model applies to causal_lm only; {family} has its own language model")
    if text_model not in TEXT_CONFIGS:
        raise ValueError(f"text_model must be one of {', '.join(TEXT_CONFIGS)}, got {text_model!r}")
    return text_model


def _check_sizes(family, hidden_size, num_heads, vision_width, vision_heads, image_size) -> None:
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size / num_heads must be a multiple of 4, got {hidden_size} / {num_heads}")
    if vision_width % vision_heads or (vision_width // vision_heads) % 4:
        raise ValueError(f"vision_width / vision_heads must be a multiple of 4, got {vision_width} / {vision_heads}")
    # Qwen merges 2x2 patches, so its images are resized to a multiple of two patches.
    factor = 2 * PATCH_SIZE if family.startswith("qwen") else PATCH_SIZE
    if image_size % factor:
        raise ValueError(f"image_size must be a multiple of {factor} for {family}, got {image_size}")


def _token_ids(tokenizer, family: str) -> dict[str, int]:
    needed = [token for token in FAMILIES[family].image_span_tokens] + (
        ["<|video_pad|>"] if family.startswith("qwen") else ["<video>"] if family == "llava_onevision" else []
    )
    ids = {}
    for token in needed:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token, which {family} needs")
        ids[token] = token_id
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs a pad and an eos token")
    return ids


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL splits head_dim/2 rotary frequencies over (time, height, width) as 16:24:24 at head_dim 128.
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    return [half - 2 * spatial, spatial, spatial]


def _qwen(config_class, processor_class):
    def build(tokenizer, text_model, text, vision, ids):
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
        vision_config = {
            "depth": vision["layers"],
            "num_heads": vision["heads"],
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        if config_class is Qwen2VLConfig:
            vision_config.update(embed_dim=vision["width"], hidden_size=text["hidden_size"], mlp_ratio=2)
        else:
            vision_config.update(
                hidden_size=vision["width"],
                intermediate_size=2 * vision["width"],
                out_hidden_size=text["hidden_size"],
                fullatt_block_indexes=[vision["layers"] - 1],
            )
        config = config_class(
            text_config={**text, "rope_parameters": rope},
            vision_config=vision_config,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
        )
        pixels = vision["image_size"] ** 2
        image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
        return config, processor_class(image_processor=image_processor, tokenizer=tokenizer)

    return build


def _llava(config_class, processor_class, image_processor_class, vision_config_class, strategy):
    def build(tokenizer, text_model, text, vision, ids):
        size = vision["image_size"]
        vision_config = vision_config_class(
            hidden_size=vision["width"],
            intermediate_size=2 * vision["width"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["heads"],
            image_size=size,
            patch_size=PATCH_SIZE,
            # LLaVA-OneVision reads SigLIP's patch features; its pooling head would be parameters without gradients.
            **({"vision_use_head": False} if vision_config_class is SiglipVisionConfig else {}),
        )
        options = {"image_grid_pinpoints": [[size, size]]} if config_class is not LlavaConfig else {}
        text_config = TEXT_CONFIGS[text_model](**text)
        config = config_class(
            text_config=text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            image_token_index=ids["<image>"],
            vision_feature_select_strategy=strategy,
            # The tiny tower's last layer is the useful one (real LLaVA checkpoints read layer -2).
            vision_feature_layer=-1,
            tie_word_embeddings=True,
            **options,
            **({"video_token_index": ids["<video>"]} if config_class is LlavaOnevisionConfig else {}),
        )
        image_processor = image_processor_class(
            size={"height": size, "width": size} if config_class is LlavaOnevisionConfig else {"shortest_edge": size},
            crop_size={"height": size, "width": size},
            **options,
        )
        if processor_class is LlavaOnevisionNoVideoProcessor:
            processor = processor_class(
                image_processor=image_processor,
                tokenizer=tokenizer,
                num_image_tokens=(size // PATCH_SIZE) ** 2,
                vision_feature_select_strategy=strategy,
                vision_aspect_ratio="anyres_max_9",
            )
        else:
            # CLIP prepends a CLS token that the "default" strategy drops: one more token per image.
            processor = processor_class(
                image_processor=image_processor,
                tokenizer=tokenizer,
                patch_size=PATCH_SIZE,
                vision_feature_select_strategy=strategy,
                num_additional_image_tokens=1,
            )
        return config, processor

    return build


def _causal_lm(tokenizer, text_model, text, vision, ids):
    return TEXT_CONFIGS[text_model](**text), tokenizer


_CONFIG_AND_PROCESSOR = {
    "qwen2_vl": _qwen(Qwen2VLConfig, Qwen2VLNoVideoProcessor),
    "qwen2_5_vl": _qwen(Qwen2_5_VLConfig, Qwen2_5_VLNoVideoProcessor),
    "llava_onevision": _llava(
        LlavaOnevisionConfig,
        LlavaOnevisionNoVideoProcessor,
        LlavaOnevisionImageProcessorPil,
        SiglipVisionConfig,
        "full",
    ),
    "llava_next": _llava(LlavaNextConfig, LlavaNextProcessor, LlavaNextImageProcessorPil, CLIPVisionConfig, "default"),
    "llava": _llava(LlavaConfig, LlavaProcessor, CLIPImageProcessorPil, CLIPVisionConfig, "default"),
    "causal_lm": _causal_lm,
}

"""Processors per backbone family: construction without torchvision, save/reload, and batching.

Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors cannot be built without a video processor, which
needs torchvision (never installed next to the CPU torch here). The `*NoVideoProcessor` subclasses
leave `video_processor` out of `__init__`: `ProcessorMixin` reads its sub-processors from that
signature, so saving and loading then skip the video processor entirely. They are registered with
`AutoProcessor` so that a saved folder reloads as the subclass instead of silently as a bare tokenizer.

`processor_inputs` turns prompts (already rewritten to the family's image token) and a flat image list
into model inputs. Its truncation rule: an input longer than `max_length` loses text tokens from its
end, never a token of an image span (for Qwen the whole `<|vision_start|>…<|vision_end|>` span); an
input whose image span alone is longer than `max_length` is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)

from .placeholder import IMAGE_PLACEHOLDER  # MMEB's image placeholder, and Phi-3.5-V's own image token
from .video_inputs import Video, with_video_processor

# The token Qwen-VL repeats once per merged video patch.
VIDEO_FILL_TOKEN = "<|video_pad|>"


class Qwen2VLNoVideoProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images and text only (no torchvision-backed video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLNoVideoProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (no torchvision-backed video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class LlavaOnevisionNoVideoProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor for images and text only.

    Every option is listed in the signature: `save_pretrained` writes only the `__init__` parameters,
    and without them the reload loses `num_image_tokens` and fails.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


NO_VIDEO_PROCESSORS = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLNoVideoProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLNoVideoProcessor),
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionNoVideoProcessor),
}


def register_processors() -> None:
    """Make `AutoProcessor` resolve the no-video subclasses (idempotent)."""
    for config_class, processor_class in NO_VIDEO_PROCESSORS.values():
        AutoProcessor.register(config_class, processor_class, exist_ok=True)


def load_processor(path, family, *, trust_remote_code: bool = False):
    """The processor of a saved backbone: the family's no-video subclass, the tokenizer for text-only
    families, `AutoProcessor` for the rest."""
    register_processors()
    options = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if family.name in NO_VIDEO_PROCESSORS:
        processor = NO_VIDEO_PROCESSORS[family.name][1].from_pretrained(path, **options)
    elif not family.multimodal:
        processor = AutoTokenizer.from_pretrained(path, **options)
    else:
        processor = AutoProcessor.from_pretrained(path, **options)
    if family.multimodal and isinstance(processor, PreTrainedTokenizerBase):
        raise ValueError(f"{path}: expected a {family.name} processor with an image processor, found only a tokenizer")
    return processor


def save_backbone_processor(processor, out_dir) -> None:
    """Save a processor (or tokenizer) so that `load_processor` rebuilds it identically."""
    os.makedirs(out_dir, exist_ok=True)
    processor.save_pretrained(out_dir)


def tokenizer_of(processor) -> PreTrainedTokenizerBase:
    return processor if isinstance(processor, PreTrainedTokenizerBase) else processor.tokenizer


def processor_inputs(
    processor,
    family,
    texts: Sequence[str],
    images: Sequence | None = None,
    *,
    padding_side: str = "right",
    max_length: int | None = None,
) -> BatchFeature:
    """Tokenize a batch of prompts with their images, padded on `padding_side`.

    `texts` already carry the family's image or video token (see `rewrite_image_tokens`); `images` is
    flat, one per text that holds either token, in order: a PIL image, or a `Video` of PIL frames for a
    text with the video token; text-only rows take none. See the module docstring for the truncation
    rule.
    """
    texts = list(texts)
    images = list(images) if images is not None else []
    if not texts:
        raise ValueError("texts must hold at least one prompt")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    _check_images_match_texts(family, texts, images)
    videos = [list(item.frames) for item in images if isinstance(item, Video)]
    images = [item for item in images if not isinstance(item, Video)]

    tokenizer = tokenizer_of(processor)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before batching")
    if family.name == "phi3_v":
        batch = _phi3_v_inputs(processor, texts, images)
    elif family.multimodal and not images and not videos:
        # Text only: the processor would add nothing to its tokenizer's call but checks that cost a third of
        # it (no image or video token is in these texts: _check_images_match_texts).
        batch = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        if getattr(processor, "return_mm_token_type_ids", False):
            batch["mm_token_type_ids"] = _mm_token_type_ids(processor, batch["input_ids"])
    elif family.multimodal:
        if videos:
            processor = with_video_processor(processor)
        # mm_token_type_ids (Qwen-VL): transformers builds them one row at a time in numpy; the same marks
        # (create_mm_token_type_ids: 1 image, 2 video, 3 audio tokens) in one batched isin each.
        type_ids = bool(getattr(processor, "return_mm_token_type_ids", False))
        batch = processor(
            text=texts, images=images or None, videos=videos or None, padding=True, padding_side="right",
            return_tensors="pt", **({"return_mm_token_type_ids": False} if type_ids else {}),
        )  # fmt: skip
        if type_ids:
            batch["mm_token_type_ids"] = _mm_token_type_ids(processor, batch["input_ids"])
    else:
        batch = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    span_tokens = dict.fromkeys(family.image_span_tokens + family.video_span_tokens)
    span_ids = [tokenizer.convert_tokens_to_ids(token) for token in span_tokens]
    return _repad(batch, span_ids, tokenizer.pad_token_id, padding_side, max_length)


def _mm_token_type_ids(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """What the processor's create_mm_token_type_ids gives for these ids, for the whole batch at once."""
    types = torch.zeros_like(input_ids)
    for value, modality in ((1, "image"), (2, "video"), (3, "audio")):
        ids = [i for i in getattr(processor, f"{modality}_token_ids", None) or [] if i is not None]
        if ids:
            types[torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype))] = value
    return types


def _check_images_match_texts(family, texts: list[str], images: list) -> None:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
        if family.image_token != IMAGE_PLACEHOLDER and IMAGE_PLACEHOLDER in text:
            raise ValueError(f"texts[{index}] still holds {IMAGE_PLACEHOLDER}; apply rewrite_image_tokens first")
    if not family.multimodal:
        if images:
            raise ValueError(f"family {family.name!r} is text-only, but {len(images)} images were given")
        return
    for index, text in enumerate(texts):
        if text.count(family.image_token) > 1:
            raise ValueError(f"texts[{index}] holds {family.image_token!r} more than once; one image per text")
        if family.video_token is not None and text.count(family.video_token) > 1:
            raise ValueError(f"texts[{index}] holds {family.video_token!r} more than once; one video per text")
    with_image = [family.image_token in text for text in texts]
    with_video = [family.video_token is not None and family.video_token in text for text in texts]
    if sum(with_image) + sum(with_video) != len(images):
        if not any(with_video) and not any(isinstance(item, Video) for item in images):
            raise ValueError(
                f"{sum(with_image)} texts hold the image token {family.image_token!r} but {len(images)} images were "
                "given; pass exactly one image per such text, in order"
            )
        raise ValueError(
            f"{sum(with_image)} texts hold the image token {family.image_token!r} and {sum(with_video)} the video "
            f"token, but {len(images)} images and videos were given; pass exactly one per such text, in order"
        )
    visual_rows = [row for row in range(len(texts)) if with_image[row] or with_video[row]]
    for row, item in zip(visual_rows, images, strict=True):
        if with_video[row] != isinstance(item, Video):
            wanted = "a Video" if with_video[row] else "an image"
            raise ValueError(f"texts[{row}] holds the {'video' if with_video[row] else 'image'} token, so it "
                             f"takes {wanted}, got {type(item).__name__}")  # fmt: skip


def _repad(batch: BatchFeature, span_ids: list[int], pad_id: int, padding_side: str, max_length) -> BatchFeature:
    """Rebuild every per-token tensor of a right-padded batch: truncated text-first, padded on the side
    asked. Per-token tensors are those shaped like `input_ids` (attention mask, mm_token_type_ids, ...)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    per_token = [key for key, value in batch.items() if torch.is_tensor(value) and value.shape == input_ids.shape]
    # Phi-3.5-V marks its image positions with negative ids instead of a token.
    lengths = mask.sum(dim=1)
    if (max_length is None or int(lengths.max()) <= max_length) and torch.equal(
        mask, torch.arange(mask.shape[1]) < lengths[:, None]
    ):
        return _repad_untruncated(batch, per_token, lengths, pad_id, padding_side)
    in_span = (torch.isin(input_ids, torch.tensor(span_ids, dtype=input_ids.dtype)) | (input_ids < 0)) & mask
    kept_rows = []
    for row in range(input_ids.shape[0]):
        kept = mask[row].nonzero().squeeze(1)
        if max_length is not None and kept.numel() > max_length:
            n_span = int(in_span[row].sum())
            if n_span > max_length:
                raise ValueError(
                    f"row {row}: its image span alone is {n_span} tokens, longer than max_length={max_length}; "
                    "raise max_length or use smaller images"
                )
            text_positions = kept[~in_span[row, kept]]
            dropped = text_positions[max_length - n_span :]
            kept = kept[~torch.isin(kept, dropped)]
        kept_rows.append(kept)
    length = max(kept.numel() for kept in kept_rows)
    out = {key: value for key, value in batch.items() if key not in per_token}
    for key in per_token:
        fill = pad_id if key == "input_ids" else 0
        source = batch[key]
        target = source.new_full((source.shape[0], length), fill)
        for row, kept in enumerate(kept_rows):
            start = length - kept.numel() if padding_side == "left" else 0
            target[row, start : start + kept.numel()] = source[row, kept]
        out[key] = target
    return BatchFeature(out, tensor_type=None)


def _repad_untruncated(batch: BatchFeature, per_token: list[str], lengths: torch.Tensor, pad_id: int,
                       padding_side: str) -> BatchFeature:  # fmt: skip
    """`_repad` of a batch whose rows are their real tokens then padding (the tokenizer's right padding) and
    are not truncated: every row moved at once (the loop per row was a third of preparing a text batch)."""
    length = int(lengths.max())
    columns = torch.arange(length).expand(len(lengths), -1)
    if padding_side == "left":
        columns = columns - (length - lengths[:, None])
    real = (columns >= 0) & (columns < lengths[:, None])
    index = columns.clamp(0, max(length - 1, 0))
    out = {key: value for key, value in batch.items() if key not in per_token}
    for key in per_token:
        gathered = batch[key].gather(1, index)
        out[key] = torch.where(real, gathered, torch.tensor(pad_id if key == "input_ids" else 0, dtype=gathered.dtype))
    return BatchFeature(out, tensor_type=None)


def _phi3_v_inputs(processor, texts: list[str], images: list) -> BatchFeature:
    """Phi-3.5-V's processor numbers images across the whole call, so each row is processed alone
    (its image is always `<|image_1|>`) and the rows are padded here. Untested offline: no tiny Phi-3.5-V
    can be built without its remote code."""
    tokenizer = tokenizer_of(processor)
    rows, pixel_values, image_sizes, image_iter = [], [], [], iter(images)
    for text in texts:
        has_image = IMAGE_PLACEHOLDER in text
        row = processor(text=text, images=[next(image_iter)] if has_image else None, return_tensors="pt")
        rows.append(row["input_ids"][0])
        if has_image:
            pixel_values.append(row["pixel_values"])
            image_sizes.append(row["image_sizes"])
    padded = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="right", return_tensors="pt")
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values)
        batch["image_sizes"] = torch.cat(image_sizes)
    return BatchFeature(batch)

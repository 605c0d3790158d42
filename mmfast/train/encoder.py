"""Encoder: a backbone, its processor and a prompt template, giving L2-normalised embeddings.

The embedding is the final-norm hidden state of each input's last real token, pooled by
`mmfast.last_token_pool` (the padding side does not matter, mixed padding works). Texts follow
the MMEB convention: "<|image_1|>" marks where the image goes, and the encoder rewrites it for its
backbone (`backbones.rewrite_image_tokens`).

A folder written by `save_pretrained` holds the model (or a PEFT adapter over a named base), the
processor and `mmfast_encoder.json`; `Encoder.from_pretrained` also takes a plain HF model folder.
An adapter trained over a merged adapter (UniME stage 2 continuing from stage 1) records the merged
adapter's folder (`merged_adapters`): loading folds it into the base again before applying its own,
so that folder must stay where it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import mmfast

from . import backbones
from .data import Input, load_image
from .model_source import check_model_source, portable_source, resolve_source
from .placeholder import IMAGE_PLACEHOLDER, placeholder_problem
from .video_inputs import Video

CONFIG_NAME = "mmfast_encoder.json"
# The multi-vector projection head (ColPali's custom_text_proj), saved beside the model or adapter.
PROJECTION_NAME = "mmfast_projection.safetensors"
# The sigmoid (SigLIP) loss's learnable logit scale and bias, saved beside the model or adapter.
SIGMOID_PARAMETERS_NAME = "mmfast_sigmoid_loss.safetensors"


class SigmoidParameters(torch.nn.Module):
    """SigLIP's learnable logit scale and bias (Zhai et al. 2023): the scale is held as its log, t' (t =
    exp(t'), positive whatever the optimiser does), both in float32 whatever the model's dtype. Part of
    the Encoder, so the Trainer's optimiser trains them, DDP reduces their gradients, checkpoints hold them."""

    def __init__(self, scale: float, bias: float, device=None):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.tensor(float(bias), dtype=torch.float32, device=device))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit scale t, logit bias b), as `mmfast.sigmoid_loss` takes them."""
        return self.log_scale.exp(), self.bias


POOLING = ("last", "mean")
# VLM2Vec V1's `image_resolution`: every image resized to this square (its aspect ratio not kept).
IMAGE_RESOLUTIONS = {"high": (1344, 1344), "mid": (672, 672), "low": (128, 128)}
IMAGE_TOKEN_STYLES = ("mmfast", "vlm2vec")


@contextmanager
def peft_over_transformers():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning
    the user cannot act on (peft's to change): that warning only, around peft's calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _name_adapter_base(folder: Path, base_model: str) -> None:
    """peft writes the base's absolute path into adapter_config.json and README.md; name it as
    mmfast_encoder.json does instead (the README's card takes a hub id only, so a folder is left out)."""
    from huggingface_hub import ModelCard

    adapter_config = folder / "adapter_config.json"
    saved = json.loads(adapter_config.read_text())
    saved["base_model_name_or_path"] = base_model
    adapter_config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
        hub_id = None if base_model.startswith(".") else base_model
        card.data.base_model = hub_id
        tags = [tag for tag in card.data.tags or [] if not tag.startswith("base_model:adapter:")]
        card.data.tags = sorted(tags + ([f"base_model:adapter:{hub_id}"] if hub_id else [])) or None
        card.save(readme)


@dataclass(frozen=True)
class EncoderConfig:
    """How inputs become embeddings; saved beside the model as mmfast_encoder.json.

    text_prompt / image_prompt: format strings with `{text}`, for inputs without / with an image.
    For an image input, the placeholder goes where the prompt puts it; if the prompt has none, where
    the text has it; if neither has one, before the text.
    base_model: for an adapter, the folder or hub id of the weights it was trained over (a full model
    loaded from a folder takes that folder's path, so an adapter trained over it is saved naming it).
    merged_adapters: for an adapter, the folders of earlier adapters folded into `base_model` (in
    order) before it was trained. In memory both are absolute paths or hub ids; the saved file names
    them portably (`model_source.portable_source`: a hub id, or a path relative to the folder).
    image_resolution: VLM2Vec V1's high / mid / low, every image resized to 1344² / 672² / 128² before
    the processor (None: as it is; V1 never resizes for Phi-3.5-V, so that family refuses it).
    min_pixels / max_pixels: the Qwen-VL image processor's pixel range (VLM2Vec V2: 3136 and 1003520);
    None keeps the processor's own.
    image_token_style: "mmfast" (Qwen's `<|image_1|>` becomes `<|vision_start|><|image_pad|><|vision_end|>`)
    or "vlm2vec", VLM2Vec's Qwen-VL inputs: a bare `<|image_pad|>`, and an image with a side under 28
    pixels resized to 56×56 first. Other families' tokens are VLM2Vec's already.
    All four are read on both sides, in training and in `mmfast-eval`, from this saved config.
    multi_vector: every token's final hidden state goes through a linear head to multi_vector_dim
    dimensions and is L2-normalised (ColPali / ColQwen2): an input's embedding is [L, multi_vector_dim]
    with its attention mask, scored by MaxSim (mmfast.late_interaction_loss / late_interaction_topk).
    mask_non_image_embeddings: multi-vector only: an input with an image keeps the vectors of its image
    (or video) tokens only, every other token masked as padding is (colpali-engine's ColQwen2 option of
    the same name); an input without one keeps all its tokens. A page's prompt and image-span markers are
    the same tokens on every page; a query token matched to one scores every page alike.
    """

    base_model: str
    text_prompt: str = "{text}"
    image_prompt: str = "{text}"
    max_length: int | None = None
    padding_side: str | None = None
    pooling: str = "last"
    adapter: bool = False
    merged_adapters: tuple[str, ...] = ()
    image_resolution: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    image_token_style: str = "mmfast"
    multi_vector: bool = False
    multi_vector_dim: int = 128
    mask_non_image_embeddings: bool = False

    def __post_init__(self):
        # None stands for an adapter merged before it was saved (see Encoder.merged).
        if isinstance(self.merged_adapters, str) or not all(
            p is None or isinstance(p, str) for p in self.merged_adapters
        ):
            raise ValueError(f"merged_adapters must be a list of folder paths, got {self.merged_adapters!r}")
        object.__setattr__(self, "merged_adapters", tuple(self.merged_adapters))  # a JSON list becomes a tuple
        for name in ("text_prompt", "image_prompt"):
            prompt = getattr(self, name)
            if not isinstance(prompt, str) or "{text}" not in prompt and IMAGE_PLACEHOLDER not in prompt:
                raise ValueError(f"{name} must be a string with {{text}} (or the image placeholder), got {prompt!r}")
        if self.text_prompt.count(IMAGE_PLACEHOLDER):
            raise ValueError(f"text_prompt must not hold the image placeholder {IMAGE_PLACEHOLDER}")
        if self.padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {self.padding_side!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        if self.image_resolution not in (None, *IMAGE_RESOLUTIONS):
            raise ValueError(f"image_resolution must be one of {', '.join(IMAGE_RESOLUTIONS)} or None, "
                             f"got {self.image_resolution!r}")  # fmt: skip
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        for name in ("multi_vector", "mask_non_image_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_non_image_embeddings and not self.multi_vector:
            raise ValueError("mask_non_image_embeddings masks token vectors: it needs multi_vector")
        dim = self.multi_vector_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"multi_vector_dim must be a positive integer, got {dim!r}")
        if self.image_token_style not in IMAGE_TOKEN_STYLES:
            raise ValueError(f"image_token_style must be one of {', '.join(IMAGE_TOKEN_STYLES)}, "
                             f"got {self.image_token_style!r}")  # fmt: skip

    def check_family(self, family) -> None:
        """The image options this backbone family cannot honour are errors, not silently ignored."""
        if not family.multimodal and self.image_resolution is not None:
            raise ValueError(f"image_resolution: a text-only {family.name} backbone reads no image")
        if family.name == "phi3_v" and self.image_resolution is not None:
            raise ValueError("image_resolution: VLM2Vec V1 never resizes Phi-3.5-V's images (its processor crops)")
        if self.mask_non_image_embeddings and family.image_fill_token is None:
            raise ValueError(f"mask_non_image_embeddings: a {family.name} backbone's image tokens have no token id "
                             "to find them by")  # fmt: skip
        if (self.min_pixels is not None or self.max_pixels is not None) and not family.mrope:
            raise ValueError(f"min_pixels / max_pixels set the Qwen-VL image processor's range; a {family.name} "
                             "backbone has no such setting")  # fmt: skip

    def sized(self, image: Image.Image | None, family) -> Image.Image | None:
        """An image resized as VLM2Vec would before its processor (see the class docstring)."""
        if image is None:
            return None
        if self.image_resolution is not None:
            image = image.resize(IMAGE_RESOLUTIONS[self.image_resolution])
        if self.image_token_style == "vlm2vec" and family.mrope and min(image.size) < 28:
            image = image.resize((56, 56))
        return image

    def render(self, item: Input) -> str:
        """The prompt text of one input, with the image placeholder still in MMEB form."""
        if item.image is None:
            return self.text_prompt.format(text=item.text)
        text = item.text
        if IMAGE_PLACEHOLDER in self.image_prompt:
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        rendered = self.image_prompt.format(text=text)
        if IMAGE_PLACEHOLDER not in rendered:
            return f"{IMAGE_PLACEHOLDER}\n{rendered}"
        problem = placeholder_problem(rendered, has_image=True)
        if problem:
            raise ValueError(f"{text!r:.100}: {problem}; one image per input is supported")
        return rendered


class InputBuilder:
    """Turns inputs into model-ready tensors (prompts, image tokens, padding); picklable, so data
    loader workers can run it. Images must already be loaded (PIL)."""

    def __init__(self, processor, family, config: EncoderConfig):
        self.processor, self.encoder_config = processor, config
        self.family = backbones.with_token_style(family, config.image_token_style)

    def __call__(self, items: Sequence[Input], images: Sequence[Image.Image | None]) -> Mapping:
        items = [self._fitted(item) for item in items]
        rendered = [self.encoder_config.render(item) for item in items]
        texts = [
            backbones.rewrite_image_tokens(text, self.family, video=isinstance(image, Video))
            for text, image in zip(rendered, images, strict=True)
        ]
        flat_images = [self._sized(image) for image in images if image is not None]
        padding_side = self.encoder_config.padding_side or getattr(self.processor, "padding_side", None) or "right"
        return backbones.processor_inputs(
            self.processor, self.family, texts, flat_images, padding_side=padding_side,
            max_length=self.encoder_config.max_length,
        )  # fmt: skip

    def _sized(self, image: Image.Image | Video) -> Image.Image | Video:
        if isinstance(image, Video):  # every frame as an image would be
            return Video(tuple(self.encoder_config.sized(frame, self.family) for frame in image.frames), image.label)
        return self.encoder_config.sized(image, self.family)

    def _fitted(self, item: Input) -> Input:
        """A text-only input over max_length loses tokens from the end of its text, not from the end
        of its template: a template that goes on after {text} (E5-V's "\nSummary above sentence in
        one word:") ends where last-token pooling reads, so cutting the prompt's end would pool a
        token in the middle of the sentence. Inputs with an image, templates that end with {text},
        and a template too long on its own keep the processor's rule (text cut from the end)."""
        limit, template = self.encoder_config.max_length, self.encoder_config.text_prompt
        if limit is None or item.image is not None or template.endswith("{text}"):
            return item
        tokenizer = backbones.tokenizer_of(self.processor)

        def length(text: str) -> int:
            return len(tokenizer(template.format(text=text))["input_ids"])

        if length(item.text) <= limit:
            return item
        text_ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
        # Token counts add up only roughly across the seam between text and template: step down.
        keep = min(len(text_ids), max(limit - (length(item.text) - len(text_ids)), 0))
        while keep > 0:
            text = tokenizer.decode(text_ids[:keep])
            if length(text) <= limit:
                return dataclasses.replace(item, text=text)
            keep -= 1
        return item


class Encoder(torch.nn.Module):
    """An embedding model: `forward({side: batch}) -> {side: [n, D] embeddings}`, `encode(...)`."""

    def __init__(self, model, processor, family, config: EncoderConfig, *, adapter_source: str | None = None):
        """adapter_source: the folder an adapter was loaded from (what `merged()` records)."""
        super().__init__()
        config.check_family(family)
        backbones.set_pixel_range(processor, config.min_pixels, config.max_pixels)
        self.model, self.processor, self.family, self.encoder_config = model, processor, family, config
        self.adapter_source = adapter_source
        self.builder = InputBuilder(processor, family, config)
        self.projection = None
        self.projection_is_fresh = False  # a multi-vector head drawn here, not loaded (`_load_projection`)
        self.sigmoid_parameters: SigmoidParameters | None = None
        # The ids of the tokens an image (or a video) expands into: what mask_non_image_embeddings keeps.
        self.image_token_ids = None
        if config.mask_non_image_embeddings:
            fills = [family.image_fill_token, family.video_token and backbones.VIDEO_FILL_TOKEN]
            tokenizer = backbones.tokenizer_of(processor)
            ids = [tokenizer.convert_tokens_to_ids(token) for token in fills if token]
            self.image_token_ids = torch.tensor([i for i in ids if i is not None and i >= 0])
        if config.multi_vector:
            hidden_size = model.config.get_text_config().hidden_size
            weight = next(model.parameters())
            self.projection = torch.nn.Linear(hidden_size, config.multi_vector_dim, device=weight.device,
                                              dtype=weight.dtype)  # fmt: skip
            self.projection_is_fresh = True

    @property
    def _no_split_modules(self) -> set[str] | list[str] | None:
        # The backbone's own: FSDP's TRANSFORMER_BASED_WRAP makes each of these layers an FSDP unit.
        return getattr(self.model, "_no_split_modules", None)

    # --- construction, saving, loading ---

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> Encoder:
        """Loads a folder from `save_pretrained`, or a plain HF model folder (a hub id already in the
        local cache works too). overrides: EncoderConfig fields (text_prompt, image_prompt, ...) and
        the loading options dtype, attn_implementation, trust_remote_code."""
        load_options = {
            k: overrides.pop(k) for k in ("dtype", "attn_implementation", "trust_remote_code") if k in overrides
        }
        unknown = set(overrides) - {f.name for f in dataclasses.fields(EncoderConfig)}
        if unknown:
            raise TypeError(f"Encoder.from_pretrained got unknown option(s): {', '.join(sorted(unknown))}")
        path = str(path)
        check_model_source(path)
        config_file = Path(path) / CONFIG_NAME
        if config_file.is_file():
            saved = json.loads(config_file.read_text())
            saved["base_model"] = resolve_source(saved["base_model"], path)
            saved["merged_adapters"] = [
                None if p is None else resolve_source(p, path) for p in saved.get("merged_adapters") or ()
            ]
            config = EncoderConfig(**{**saved, **overrides})
        else:
            config = EncoderConfig(base_model=path, **{k: v for k, v in overrides.items() if k != "base_model"})
        if config.adapter:
            from peft import PeftModel

            check_model_source(config.base_model, f"the adapter in {path}: base model")
            base, _, family = backbones.load_backbone(config.base_model, **load_options)
            for earlier in config.merged_adapters:
                if earlier is None or not (Path(earlier) / "adapter_config.json").is_file():
                    raise FileNotFoundError(
                        f"{path}: its adapter was trained over the adapter in {earlier}, merged into the base; "
                        "that folder holds no adapter_config.json (moved or deleted?)"
                    )
                with peft_over_transformers():
                    base = PeftModel.from_pretrained(base, earlier).merge_and_unload()
            with peft_over_transformers():
                model = PeftModel.from_pretrained(base, path)
            for adapter_config in model.peft_config.values():  # the file's may be relative to the folder
                adapter_config.base_model_name_or_path = config.base_model
            processor = backbones.load_processor(path, family)
            encoder = cls(model, processor, family, config, adapter_source=os.path.abspath(path))
            encoder._load_projection(Path(path))
            return encoder
        model, processor, family = backbones.load_backbone(path, **load_options)
        # These weights are the base of any adapter trained over them, whatever base they came from
        # (a hub id stays a hub id).
        base_model = os.path.abspath(path) if os.path.isdir(path) else path
        encoder = cls(model, processor, family, dataclasses.replace(config, base_model=base_model))
        encoder._load_projection(Path(path))
        return encoder

    def _load_projection(self, folder: Path) -> None:
        """The saved head of a multi-vector encoder; a folder without one (a backbone about to be
        trained as multi-vector) keeps the fresh head."""
        if self.projection is None or not (folder / PROJECTION_NAME).is_file():
            return
        from safetensors.torch import load_file

        saved = load_file(str(folder / PROJECTION_NAME))
        weight = self.projection.weight
        try:
            self.projection.load_state_dict({k: v.to(weight.dtype) for k, v in saved.items()})
            self.projection_is_fresh = False
        except RuntimeError as error:
            raise ValueError(f"{folder / PROJECTION_NAME} does not fit this encoder's head "
                             f"({tuple(weight.shape)}): {error}") from error  # fmt: skip

    def _save_projection(self, out_dir: Path, state_dict: Mapping | None) -> None:
        if self.projection is None:
            return
        from safetensors.torch import save_file

        if state_dict is not None and any(k.startswith("projection.") for k in state_dict):
            tensors = {k.removeprefix("projection."): v for k, v in state_dict.items() if k.startswith("projection.")}
        else:
            tensors = self.projection.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / PROJECTION_NAME))

    def add_sigmoid_parameters(self, scale: float, bias: float) -> None:
        """The sigmoid loss's learnable scale and bias, at their initial values (`--loss sigmoid`)."""
        self.sigmoid_parameters = SigmoidParameters(scale, bias, device=next(self.model.parameters()).device)

    def _save_sigmoid_parameters(self, out_dir: Path, state_dict: Mapping | None) -> None:
        if self.sigmoid_parameters is None:
            return
        from safetensors.torch import save_file

        prefix = "sigmoid_parameters."
        tensors = {k.removeprefix(prefix): v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
        tensors = tensors or self.sigmoid_parameters.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / SIGMOID_PARAMETERS_NAME))

    def _load_sigmoid_parameters(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / SIGMOID_PARAMETERS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no {SIGMOID_PARAMETERS_NAME} to resume the sigmoid loss's "
                                    "logit scale and bias from")  # fmt: skip
        saved = load_file(str(path))
        try:
            self.sigmoid_parameters.load_state_dict(saved)
        except RuntimeError as error:
            raise ValueError(f"{path} does not hold a logit scale and bias: {error}") from error

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: Mapping | None = None) -> None:
        """Writes the adapter (over `config.base_model`) or the full model, the processor and the
        mmfast config. state_dict: this Encoder's state dict, when a launcher (FSDP, DeepSpeed)
        gathered it."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._save_projection(out_dir, state_dict)
        self._save_sigmoid_parameters(out_dir, state_dict)
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()
                          if not k.startswith(("projection.", "sigmoid_parameters."))}  # fmt: skip
        if self.is_adapter and None in self.encoder_config.merged_adapters:
            raise ValueError(
                "this adapter was trained over an adapter merged before it was ever saved, so its base cannot be "
                "rebuilt from files: save the adapter before merging it (or save the merged encoder first and "
                "train the new adapter over that folder)"
            )
        if self.is_adapter:
            self.model.save_pretrained(out_dir)
        else:
            self.model.save_pretrained(out_dir, state_dict=state_dict)
        backbones.save_backbone_processor(self.processor, out_dir)
        # A full model already holds every merged adapter; only an adapter needs them named.
        merged = self.encoder_config.merged_adapters if self.is_adapter else ()
        # Named portably (a hub id, or a path relative to out_dir), so a copied folder still loads.
        config = dataclasses.replace(
            self.encoder_config, adapter=self.is_adapter,
            base_model=portable_source(self.encoder_config.base_model, out_dir),
            merged_adapters=tuple(portable_source(p, out_dir) for p in merged),
        )  # fmt: skip
        (out_dir / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        if self.is_adapter:
            _name_adapter_base(out_dir, config.base_model)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Loads the trained weights of a folder from `save_pretrained` into this encoder (resume)."""
        path = Path(path)
        if self.projection is not None and not (path / PROJECTION_NAME).is_file():
            raise FileNotFoundError(f"{path} holds no {PROJECTION_NAME} to resume the multi-vector head from")
        self._load_projection(path)
        if self.sigmoid_parameters is not None:
            self._load_sigmoid_parameters(path)
        if self.is_adapter:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            adapter_file = path / "adapter_model.safetensors"
            if not adapter_file.is_file():
                raise FileNotFoundError(f"{path} holds no adapter_model.safetensors to resume the adapter from")
            set_peft_model_state_dict(self.model, load_file(str(adapter_file)))
            return
        dtype = next(self.model.parameters()).dtype
        saved = type(self.model).from_pretrained(str(path), dtype=dtype, local_files_only=True)
        missing, unexpected = self.model.load_state_dict(saved.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")

    def merged(self) -> Encoder:
        """The same encoder with its adapter folded into the weights (peft's merge_and_unload).

        An adapter trained next over the merged weights is saved naming this adapter's folder (so it
        reloads over the same base); for an adapter never saved there is no folder to name, and
        saving such a second adapter is refused."""
        if not self.is_adapter:
            return self
        model = self.model.merge_and_unload()
        merged = (*self.encoder_config.merged_adapters, self.adapter_source)
        config = dataclasses.replace(self.encoder_config, adapter=False, merged_adapters=merged)
        encoder = Encoder(model, self.processor, self.family, config)
        encoder.projection, encoder.projection_is_fresh = self.projection, self.projection_is_fresh
        encoder.sigmoid_parameters = self.sigmoid_parameters
        return encoder

    @property
    def config(self):
        """The backbone's transformers config (what the Trainer and launchers read as `model.config`)."""
        return self.model.config

    @property
    def is_adapter(self) -> bool:
        return hasattr(self.model, "peft_config")

    # --- training options ---

    def add_adapter(self, *, r=16, alpha=32, dropout=0.1, target_modules=None, use_dora=False) -> None:
        """Wraps the backbone in a peft LoRA (or DoRA) adapter on the language model."""
        from peft import LoraConfig, get_peft_model

        targets = target_modules or backbones.lora_target_modules(self.model, self.family)
        if isinstance(targets, (list, tuple)) and len(targets) == 1:
            targets = targets[0]
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_dora=use_dora)
        with peft_over_transformers():
            self.model = get_peft_model(self.model, lora)

    def freeze_vision_tower(self) -> None:
        tower = backbones.vision_tower(self.model, self.family)
        if tower is None:
            raise ValueError(f"freeze_vision_tower: a {self.family.name} backbone has no vision tower")
        tower.requires_grad_(False)

    def parameters_without_gradient(self, *, images: bool) -> list[str]:
        """The trainable parameters an embedding step may give no gradient (what DDP's
        `find_unused_parameters` is for): the output head when it is not tied to the input embeddings
        (an embedding is the last hidden state: the logits never reach the loss), and, unless every
        step holds an image (`images`), every parameter outside the language model (the vision tower,
        its projector, LLaVA-NeXT's image_newline), which only an image reaches."""
        model = backbones.unwrap_model(self.model)
        language_model = _submodule_parameters(model, self.family.language_model_path)
        head = model.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        names = []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if id(parameter) in head_ids:
                if not tied:
                    names.append(name)
            elif id(parameter) not in language_model and not images:
                names.append(name)
        return names

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """Gradient (activation) checkpointing of the backbone; the Trainer calls it for
        --gradient_checkpointing. Non-reentrant by default: it replays dropout's RNG itself and
        composes with GradCache and DDP."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        backbones.unwrap_model(self.model).activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload
        )

    @property
    def is_activation_checkpointing(self) -> bool:
        return bool(getattr(backbones.unwrap_model(self.model), "is_activation_checkpointing", False))

    # --- embedding ---

    def embed(self, batch: Mapping) -> torch.Tensor:
        """[n, D] unit embeddings of one prepared batch (differentiable); multi-vector: [n, L, dim]
        unit token vectors, zero at padding (`token_mask` gives the mask back)."""
        if self.projection is not None:
            return self.embed_tokens(batch)[0]
        hidden = backbones.last_hidden_state(self.model, self.builder.family, batch)  # the family as styled
        pool = mmfast.last_token_pool if self.encoder_config.pooling == "last" else mmfast.mean_pool
        return pool(hidden, batch["attention_mask"], normalize=True)

    def embed_tokens(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-vector: ([n, L, dim] every token's projected, L2-normalised vector, zero at padding;
        [n, L] bool mask of the real tokens), as ColPali's custom_text_proj head gives them."""
        if self.projection is None:
            raise ValueError(
                "embed_tokens needs a multi-vector encoder (Encoder.from_pretrained(..., multi_vector=True))"
            )
        hidden = backbones.last_hidden_state(self.model, self.builder.family, batch)
        mask = batch["attention_mask"].bool()
        if self.image_token_ids is not None:
            mask = image_tokens_only(mask, batch["input_ids"], self.image_token_ids)
        vectors = torch.nn.functional.normalize(self.projection(hidden.to(self.projection.weight.dtype)), dim=-1)
        return vectors * mask[..., None].to(vectors.dtype), mask

    def forward(
        self, sides: Mapping[str, Mapping], blank_image_sides: Sequence[str] = (), placeholder_sides: Sequence[str] = ()
    ) -> dict[str, torch.Tensor]:
        """One call for every side of a (mini-)batch, so DDP sees one forward per backward.

        Under FSDP every rank must run the modules another rank runs, in the same order (`rank_alignment`):
        blank_image_sides: sides whose backbone pass is preceded by a pass of the vision tower over one
            blank image, its output weighted zero (the embeddings are unchanged; the vision tower's parameters
            get zero gradients): a side without images on this rank, with images on another.
        placeholder_sides: sides whose inputs are a placeholder run only to join the collectives of another
            rank's real inputs: their embeddings come back with no rows (still in the graph, so the backward
            runs through the backbone too, with zero gradients; multi-vector: no tokens either).
        Neither kind of pass draws random numbers (dropout): the real passes get the masks they get without them.
        """
        embeddings = {}
        for side, batch in sides.items():
            blank = None
            if side in blank_image_sides:
                with _random_state_kept(self.device):
                    blank = self.blank_image_pass()
            if side in placeholder_sides:
                with _random_state_kept(self.device):
                    embeddings[side] = nothing_of(self.embed(batch))
            else:
                embeddings[side] = self.embed(batch)
            if blank is not None:
                embeddings[side] = embeddings[side] + 0 * blank.to(embeddings[side].dtype)
        return embeddings

    @property
    def takes_blank_image(self) -> bool:
        """Whether `blank_image_pass` can run: a vision tower behind transformers' `get_image_features`."""
        inner = getattr(backbones.unwrap_model(self.model), "model", None)
        return self.family.multimodal and hasattr(inner, "get_image_features")

    def blank_image_pass(self) -> torch.Tensor:
        """The sum of the vision tower's outputs (its merger's or projector's included) for one small blank
        image (56 px, sized as the run's images are), through the backbone's own `get_image_features`."""
        if not self.takes_blank_image:
            raise ValueError(f"family {self.family.name!r}: no vision tower to run a blank image through")
        model = backbones.unwrap_model(self.model).model
        built = self.builder([Input(IMAGE_PLACEHOLDER, "<blank>")], [Image.new("RGB", (56, 56))])
        image_keys = ("pixel_values", "image_grid_thw", "image_sizes")
        inputs = {key: built[key].to(self.device) for key in image_keys if key in built}
        outputs = model.get_image_features(**inputs)
        # The image features the backbone puts into its input (pooler_output in transformers' outputs): the
        # vision tower's other outputs can reach parameters an image row never does (its last layers, when
        # the features are an earlier layer's).
        features = getattr(outputs, "pooler_output", None)
        return _sum_of_tensors(outputs if features is None else features)

    def prepare(self, items: Sequence[Input], images: Sequence[Image.Image | None] | None = None) -> Mapping:
        """Inputs -> model-ready tensors; images are loaded from the items' paths unless given."""
        if images is None:
            images = [None if item.image is None else load_image(item.image) for item in items]
        return self.builder(items, images)

    @torch.no_grad()
    def encode(
        self,
        texts: str | Sequence[str],
        images: Sequence[Image.Image | str | os.PathLike | None] | Image.Image | str | os.PathLike | None = None,
        *,
        batch_size: int = 32,
        show_progress: bool = True,
        dim: int | None = None,
    ) -> torch.Tensor:
        """[n, D] float32 unit embeddings on the CPU, one per text (with its image, if any); one string
        (with at most one image) gives one [D] embedding, as in sentence-transformers. A multi-vector
        encoder gives [n, L, dim] token vectors, zero-padded to the longest input (`token_mask`).

        A text marks where its image goes with <|image_1|> (added in front when absent). An empty text
        without an image is an error, not an embedding: it has no tokens of its own (training skips
        such rows too).

        dim: a Matryoshka prefix: the first `dim` dimensions of each embedding, L2-normalised again (as
        `--matryoshka_dims` trains them); None = the whole embedding. Single-vector encoders only."""
        if dim is not None:
            check_prefix_dim(dim, self.embedding_size, multi_vector=self.projection is not None)
        if isinstance(texts, str):
            image = images
            if isinstance(image, (list, tuple)):
                raise TypeError("with one text, give one image (or None), not a list")
            return self.encode([texts], [image], batch_size=batch_size, show_progress=show_progress, dim=dim)[0]
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"images must have one entry per text ({len(texts)}), got {len(images)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for i, text in enumerate(texts):
            _check_text(i, text, images[i])
        # Similar lengths together pad less; the embeddings do not depend on the batch, so the order is free.
        order = sorted(range(len(texts)), key=lambda i: (images[i] is not None, len(texts[i])))
        was_training = self.training
        self.eval()
        out = torch.empty(len(texts), 0)
        chunks = []
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", disable=not show_progress, unit="input")
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                items = [Input(texts[i], None if images[i] is None else "<given>") for i in rows]
                loaded = [_as_image(images[i], i) for i in rows]
                batch = _to_device(self.builder(items, loaded), self.device)
                chunks.append(self.embed(batch).float().cpu())
                bar.update(len(rows))
            bar.close()
        finally:
            self.train(was_training)
        if chunks:
            # Multi-vector chunks [b, L_b, dim]: zero-padded to the longest (token_mask reads it back).
            stacked = torch.cat(chunks) if chunks[0].dim() == 2 else cat_padded(chunks)
            out = torch.empty_like(stacked)
            out[torch.tensor(order)] = stacked
        return out if dim is None else prefix(out, dim)

    @property
    def embedding_size(self) -> int:
        """D of the embeddings `embed` gives: the projection's for a multi-vector encoder, else the
        language model's hidden size."""
        if self.projection is not None:
            return self.projection.out_features
        return backbones.unwrap_model(self.model).config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_prefix_dim(dim: object, embedding_size: int, *, multi_vector: bool = False, name: str = "dim") -> int:
    """A Matryoshka prefix size: a positive integer at most the embedding size."""
    if multi_vector:
        raise ValueError(f"{name}: a multi-vector encoder's token vectors are not Matryoshka-trained; give no {name}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{name} must be a positive integer, got {dim!r}")
    if dim > embedding_size:
        raise ValueError(f"{name} {dim} exceeds the embedding size {embedding_size}")
    return dim


def prefix(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` dimensions of [n, D] (or [D]) embeddings, L2-normalised again."""
    return torch.nn.functional.normalize(embeddings[..., :dim], dim=-1)


def _sum_of_tensors(outputs) -> torch.Tensor:
    """The sum of every floating-point tensor in a model output (a tensor, tuple, list or mapping of them)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().sum() if outputs.is_floating_point() else outputs.new_zeros((), dtype=torch.float32)
    parts = outputs.values() if isinstance(outputs, Mapping) else outputs if isinstance(outputs, (tuple, list)) else ()
    return sum((_sum_of_tensors(part) for part in parts if part is not None), torch.zeros(()))


def cat_padded(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Multi-vector embeddings [b_i, L_i, dim] as one [Σ b_i, max L_i, dim], zero-padded (`token_mask`)."""
    length = max(chunk.shape[1] for chunk in chunks)
    return torch.cat([torch.nn.functional.pad(chunk, (0, 0, 0, length - chunk.shape[1])) for chunk in chunks])


def image_tokens_only(mask: torch.Tensor, input_ids: torch.Tensor, image_token_ids: torch.Tensor) -> torch.Tensor:
    """[n, L] bool: in each row that holds image tokens, those tokens only; other rows keep `mask`."""
    image = mask & torch.isin(input_ids, image_token_ids.to(input_ids.device))
    return torch.where(image.any(dim=1, keepdim=True), image, mask)


def token_mask(vectors: torch.Tensor) -> torch.Tensor:
    """[n, L] bool: the real tokens of multi-vector embeddings [n, L, dim] (padding is a zero vector;
    a real token's is a unit vector)."""
    return vectors.ne(0).any(dim=-1)


def _check_text(i: int, text, image) -> None:
    """The errors of one encode input, quoting the text as the caller wrote it."""
    if not isinstance(text, str):
        raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    problem = placeholder_problem(text, has_image=image is not None)
    if problem:
        raise ValueError(f"texts[{i}] {text!r:.100}: {problem} (images[{i}] is {'None' if image is None else 'given'})")
    if image is None and not text.strip():
        raise ValueError(f"texts[{i}] is empty and has no image: there is nothing to embed")


def _as_image(image, index: int) -> Image.Image | Video | None:
    if image is None or isinstance(image, Image.Image):
        return None if image is None else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Video):
        return image.load()
    raise TypeError(f"images[{index}] must be a PIL image, a path, a Video or None, got {type(image).__name__}")


def nothing_of(embeddings: torch.Tensor) -> torch.Tensor:
    """No rows of `embeddings` (multi-vector: no tokens either, so it pads no other part to its length), still
    in the graph: a backward through it reaches everything the embeddings came from, with zero gradients."""
    return embeddings[(slice(0, 0),) * (embeddings.dim() - 1)]


def _random_state_kept(device: torch.device):
    """A block that leaves the RNG (the CPU's, and the device's) as it found it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _to_device(batch: Mapping, device: torch.device) -> Mapping:
    return type(batch)({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})


def _submodule_parameters(model: torch.nn.Module, path: str) -> set[int]:
    """The ids of the parameters under `path` in `model`."""
    return {id(p) for p in model.get_submodule(path).parameters()}

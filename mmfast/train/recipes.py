"""The published recipes, each one frozen `Recipe` built on the core's option dataclasses.

A recipe fixes the objective (its loss options), the prompts, the kind of data it trains on, and
defaults for the model and training arguments taken from the public scripts (see
`../shared/docs/methods.md`). Every default is only a default: a field the user sets, in a config
file or on the command line, wins (`mmfast.train.arguments.parse_arguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from mmfast import ContrastiveLossOptions, DistillationLossOptions, LateInteractionLossOptions

# The one-word prompts of E5-V and UniME. "<|image_1|>" is the MMEB image placeholder; the encoder
# rewrites it for its backbone.
ONE_WORD_TEXT_PROMPT = "{text}\nSummary above sentence in one word:"
ONE_WORD_IMAGE_PROMPT = "<|image_1|>\nSummary above image in one word:"
# VLM2Vec and LLaVE train on MMEB rows whose text already carries the instruction.
PLAIN_PROMPT = "{text}"
# ColPali / ColQwen2: a query is the bare question, a page the bare image (no instruction).
PAGE_PROMPT = "<|image_1|>"

DataKind = Literal["mmeb", "nli", "nli_teacher"]


def _frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Recipe:
    """One published training method.

    loss: the core's options for `mmfast.contrastive_loss` or `mmfast.distillation_loss`.
    data: "mmeb" (MMEB-train rows), "nli" (sent0/sent1/hard_neg triplets), or "nli_teacher" (text
        pairs plus precomputed teacher embeddings, UniME stage 1).
    text_prompt / image_prompt: format strings with `{text}` for inputs without / with an image.
    model_defaults / training_defaults: ModelArguments / TrainingArguments fields from the paper's
        public script, applied unless the user sets the field.
    default_run_loss: the loss of a run on the embedded default (its tiny model from scratch, or one
        trained from it, on the default data: `run_config.trains_default`) where the published one does
        not learn there; None: `loss`.
    """

    name: str
    summary: str  # the method's name only: what a run does comes from its resolved options (plan.py)
    loss: ContrastiveLossOptions | DistillationLossOptions | LateInteractionLossOptions
    data: DataKind
    text_prompt: str = PLAIN_PROMPT
    image_prompt: str = PLAIN_PROMPT
    model_defaults: MappingProxyType = field(default_factory=lambda: _frozen({}))
    training_defaults: MappingProxyType = field(default_factory=lambda: _frozen({}))
    default_run_loss: ContrastiveLossOptions | LateInteractionLossOptions | None = None

    @property
    def is_distillation(self) -> bool:
        return isinstance(self.loss, DistillationLossOptions)

    @property
    def is_multi_vector(self) -> bool:
        """Token-level embeddings scored by MaxSim (the encoder gets its projection head)."""
        return isinstance(self.loss, LateInteractionLossOptions)


RECIPES: MappingProxyType = _frozen(
    {
        recipe.name: recipe
        for recipe in (
            Recipe(
                name="vlm2vec",
                summary="VLM2Vec",
                loss=ContrastiveLossOptions(temperature=0.02, cross_device=True),
                data="mmeb",
                model_defaults=_frozen({"lora": True, "lora_r": 16, "lora_alpha": 64, "use_dora": True}),
                training_defaults=_frozen(
                    {
                        "per_device_train_batch_size": 128,
                        "gradcache_mini_batch_size": 32,
                        "learning_rate": 2e-5,
                        "lr_scheduler_type": "linear",
                        "warmup_steps": 200,
                        "max_steps": 2000,
                    }
                ),
            ),
            Recipe(
                name="llave",
                summary="LLaVE",
                loss=ContrastiveLossOptions(temperature=0.02, hardness=9.0, symmetric=True, cross_device=True),
                data="mmeb",
                model_defaults=_frozen({"lora": False, "freeze_vision_tower": True}),
                training_defaults=_frozen(
                    {
                        "per_device_train_batch_size": 4,
                        "learning_rate": 1e-5,
                        "lr_scheduler_type": "cosine",
                        "warmup_steps": 0.03,
                        "num_train_epochs": 1.0,
                    }
                ),
            ),
            Recipe(
                name="unime-stage1",
                summary="UniME stage 1",
                loss=DistillationLossOptions(student_temperature=0.02, teacher_temperature=0.02, cross_device=True),
                data="nli_teacher",
                text_prompt=ONE_WORD_TEXT_PROMPT,
                image_prompt=ONE_WORD_IMAGE_PROMPT,
                model_defaults=_frozen({"lora": True, "lora_r": 16, "lora_alpha": 32}),
                training_defaults=_frozen({"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.03}),
            ),
            Recipe(
                name="unime-stage2",
                summary="UniME stage 2",
                loss=ContrastiveLossOptions(temperature=0.02, false_negative_margin=0.1, topk=8, cross_device=True),
                # On the embedded default top-8 holds stage 2 at ln 9 (the tiny model starts, or falls, collapsed
                # and 8 negatives carry too little of the batch's spread to leave it); the margin alone, every
                # negative, learns: the example's Flickr t2i R@1 after stage 2 is 24.5 at 100 + 100 steps
                # (top-8: 1.6; README).
                default_run_loss=ContrastiveLossOptions(temperature=0.02, false_negative_margin=0.1, cross_device=True),
                data="mmeb",
                text_prompt=ONE_WORD_TEXT_PROMPT,
                image_prompt=ONE_WORD_IMAGE_PROMPT,
                model_defaults=_frozen({"lora": True, "lora_r": 16, "lora_alpha": 32}),
                training_defaults=_frozen({"learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.03}),
            ),
            Recipe(
                name="e5v",
                summary="E5-V",
                loss=ContrastiveLossOptions(temperature=0.05, cross_device=True),
                data="nli",
                text_prompt=ONE_WORD_TEXT_PROMPT,
                image_prompt=ONE_WORD_IMAGE_PROMPT,
                model_defaults=_frozen(
                    {"lora": True, "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "max_length": 32}
                ),
                training_defaults=_frozen(
                    {"per_device_train_batch_size": 24, "learning_rate": 4e-4, "num_train_epochs": 2.0}
                ),
            ),
            Recipe(
                name="colpali",
                summary="ColQwen2 (ColPali)",
                # ColPali's loss: softplus(hardest in-batch negative's MaxSim − the positive's), unscaled.
                loss=LateInteractionLossOptions(loss="pairwise", temperature=1.0, cross_device=True),
                # From scratch the pairwise loss has a trivial minimum, ln 2: every token vector one point, every
                # score alike, no gradient; the tiny default reaches it within 20 steps. colpali-engine's
                # ColbertLoss (InfoNCE, τ 0.02) sits at ln N there and leaves it (README, "Why the multi-vector
                # default learns").
                default_run_loss=LateInteractionLossOptions(loss="infonce", temperature=0.02, cross_device=True),
                data="mmeb",
                image_prompt=PAGE_PROMPT,
                # ColPali (Faysse et al. 2024, §4): LoRA r 32, α 32, dropout 0.1 on the language model,
                # the 128-d projection head trained in full; batch 32, lr 5e-5, 2.5% warm-up, 1 epoch.
                # A page is scored by its image tokens only (ColQwen2's mask_non_image_embeddings): the tokens
                # around them are the same on every page, and from scratch every query token collapsed onto
                # them (README, "Why the multi-vector default learns").
                model_defaults=_frozen(
                    {
                        "lora": True,
                        "lora_r": 32,
                        "lora_alpha": 32,
                        "lora_dropout": 0.1,
                        "mask_non_image_embeddings": True,
                    }
                ),  # fmt: skip
                # GradCache by default, as vlm2vec: 4 mini-batches of 8 per step (vlm2vec's 128 / 32 split). A page is
                # up to 768 image tokens (colpali-engine's colqwen2 config), so 8 pages are ~6k tokens of backbone
                # activations per graph instead of ~25k for the 32, and the loss still sees all 32 (exact: the
                # recipe's GradCache step is tested equal to one graph). The embedded default's profile turns it
                # off (its tiny model's whole batch is one small graph).
                training_defaults=_frozen(
                    {
                        "per_device_train_batch_size": 32,
                        "gradcache_mini_batch_size": 8,
                        "learning_rate": 5e-5,
                        "lr_scheduler_type": "linear",
                        "warmup_steps": 0.025,
                        "num_train_epochs": 1.0,
                    }
                ),
            ),
        )
    }
)


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an unknown name is an error that lists the known ones."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are: {', '.join(RECIPES)}")
    return RECIPES[name]

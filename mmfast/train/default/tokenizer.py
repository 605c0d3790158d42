"""A small byte-level BPE tokenizer trained offline, shared by every tiny backbone family.

One tokenizer serves all families: it carries every family's image and vision tokens as special tokens
(seven ids out of a few hundred), so a model of any family can be built on it without retraining.
BPE training is deterministic for a given corpus and order, so the same corpus gives the same vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
# LLaVA-1.5 / NeXT / OneVision expand "<image>"; Qwen2-VL and Qwen2.5-VL frame "<|image_pad|>" with the
# vision start/end tokens. The video tokens are never used in prompts, but the Qwen processors and configs
# need ids for them, and an id shared with a real token would make the model treat that token as video.
IMAGE_TOKENS = ("<image>", "<video>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *IMAGE_TOKENS)

# MMEB's image placeholders are rewritten to a family's image token before tokenization, so the tokenizer
# never sees them: learning merges for them would waste vocabulary.
_MMEB_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (any iterable of strings) and wrap it for transformers.

    The vocabulary holds the 256 byte symbols, the special tokens and the merges learned up to
    `vocab_size`. The result adds no BOS/EOS on encode (prompts decide where an embedding is read).
    """
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be an int of at least {256 + len(SPECIAL_TOKENS)} (the 256 bytes plus "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    texts = [_MMEB_PLACEHOLDER.sub(" ", text) for text in _checked_texts(corpus)]
    if not any(text.strip() for text in texts):
        raise ValueError("corpus must contain at least one non-empty string")

    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(IMAGE_TOKENS),
    )


def _checked_texts(corpus: Iterable[str]) -> list[str]:
    if isinstance(corpus, str):
        raise TypeError("corpus must be an iterable of strings, not a single string")
    texts = list(corpus)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"corpus item {index} is {type(text).__name__}, expected str")
    return texts

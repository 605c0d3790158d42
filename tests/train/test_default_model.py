"""The embedded default's tokenizer and tiny-backbone builder: determinism, sizes and errors."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mmfast.train.backbones import load_backbone, processor_inputs
from mmfast.train.default.model import build_tiny_backbone, default_corpus
from mmfast.train.default.tokenizer import SPECIAL_TOKENS, train_tokenizer
from mmfast.train.processors import tokenizer_of


def test_train_tokenizer_is_deterministic_with_single_id_special_tokens():
    corpus = [*default_corpus(), "<|image_1|> Represent the given image."]
    first, second = train_tokenizer(corpus, vocab_size=400), train_tokenizer(corpus, vocab_size=400)
    assert first.get_vocab() == second.get_vocab() and len(first) <= 400
    for token in SPECIAL_TOKENS:
        assert first.tokenize(f"a{token}b") == ["a", token, "b"]
    assert first.eos_token == "<|endoftext|>" and first.pad_token == "<|pad|>" and first.unk_token == "<|unk|>"
    assert "<|image_1|>" not in first.get_vocab()
    text = "three purple triangles at the bottom right\nSummary above sentence in one word:"
    assert first.decode(first(text)["input_ids"]) == text
    # A vocabulary learned from the corpus: its words take few tokens.
    assert len(first.tokenize(" triangles")) <= 2


def test_train_tokenizer_errors():
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("a red circle")
    with pytest.raises(TypeError, match="corpus item 1 is int"):
        train_tokenizer(["a", 3])
    with pytest.raises(ValueError, match="vocab_size must be an int of at least 265"):
        train_tokenizer(["a"], vocab_size=100)
    with pytest.raises(ValueError, match="at least one non-empty string"):
        train_tokenizer(["", "  "])


@pytest.mark.parametrize(
    ("family", "image_size", "tokens"),
    [("qwen2_vl", 56, 4), ("qwen2_vl", 112, 16), ("qwen2_5_vl", 56, 4), ("llava", 56, 16), ("llava_next", 56, 36),
     ("llava_onevision", 56, 36)],
)  # fmt: skip
def test_image_tokens_per_image(tmp_path, shared_tokenizer, family, image_size, tokens):
    """For a square image of any size (Qwen keeps the aspect ratio, so other shapes may take more)."""
    folder = build_tiny_backbone(family, tmp_path, tokenizer=shared_tokenizer, image_size=image_size)
    model, processor, fam = load_backbone(folder)
    batch = processor_inputs(processor, fam, [fam.image_token], [Image.new("RGB", (70, 70))])
    fill = tokenizer_of(processor).convert_tokens_to_ids(fam.image_fill_token)
    assert int((batch["input_ids"] == fill).sum()) == tokens


def test_build_is_seeded(tmp_path, shared_tokenizer):
    def weights(seed, name):
        build_tiny_backbone("qwen2_vl", tmp_path / name, tokenizer=shared_tokenizer, seed=seed)
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_build_from_corpus_trains_its_tokenizer(tmp_path):
    folder = build_tiny_backbone("causal_lm", tmp_path, corpus=["zebra zebra zebra quagga"] * 20, text_model="llama")
    model, tokenizer, family = load_backbone(folder)
    assert family.name == "causal_lm" and model.config.model_type == "llama"
    assert tokenizer.tokenize(" zebra") == ["Ġzebra"]
    assert model.config.vocab_size == len(tokenizer)


def test_build_errors(tmp_path, shared_tokenizer):
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_backbone("phi3_v", tmp_path)
    with pytest.raises(ValueError, match="text_model applies to causal_lm only"):
        build_tiny_backbone("llava", tmp_path, text_model="qwen2")
    with pytest.raises(ValueError, match="text_model must be one of"):
        build_tiny_backbone("causal_lm", tmp_path, text_model="gpt2")
    with pytest.raises(ValueError, match="either tokenizer or corpus"):
        build_tiny_backbone("causal_lm", tmp_path, tokenizer=shared_tokenizer, corpus=["a"])
    with pytest.raises(ValueError, match="image_size must be a multiple of 28 for qwen2_vl"):
        build_tiny_backbone("qwen2_vl", tmp_path, tokenizer=shared_tokenizer, image_size=42)
    with pytest.raises(ValueError, match="hidden_size / num_heads"):
        build_tiny_backbone("llava", tmp_path, tokenizer=shared_tokenizer, hidden_size=64, num_heads=3)
    bare = Tokenizer(models.BPE(unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.add_special_tokens(["<unk>", "<pad>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=bare, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")
    with pytest.raises(ValueError, match="the tokenizer has no '<image>' token, which llava needs"):
        build_tiny_backbone("llava", tmp_path, tokenizer=plain)

"""`Encoder.encode` against a manual forward of the HF model, per backbone family.

The embedding of each input, encoded in one mixed batch (lengths from 1 word to ~20, image and
text-only rows, left or right padding), equals the L2-normalised final-norm output (the family's
language-model `norm` applied to the last decoder layer's output, caught by a hook) of its last token
when the HF model runs that input alone, unpadded, with its own default positions. Measured: at most
1.5e-7 apart in fp32 (every family, both sides; tolerance 1e-6).

And `EncoderConfig.max_length` reaches the encoder's batches: an input whose image span alone exceeds
it is an error naming the row; a longer text is cut, never the image span (the rule itself:
tests/train/test_backbones.py::test_truncation_cuts_text_never_an_image_span).
"""

import pytest
import torch
from PIL import Image

from mmfast.train.data import Input
from mmfast.train.encoder import Encoder
from mmfast.train.processors import tokenizer_of
from tests.train.conftest import CASES

TEXTS = [
    "<|image_1|> a red circle",
    "two blue squares at the top left, and many more words to make this row long enough",
    "<|image_1|>\nSummary above image in one word:",
    "hi",
    "Find an image <|image_1|> that matches: a green star",
    "Summary above sentence in one word:",
]


def _image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


def _inputs(family):
    if not family.multimodal:
        return [text.replace("<|image_1|>", "").strip() for text in TEXTS], [None] * len(TEXTS)
    images = [_image(56, 56, 0), None, _image(90, 60, 1), None, _image(60, 100, 2), None]
    return TEXTS, images


def _manual_embedding(encoder, text, image):
    """One input alone through the HF model's own forward: final norm of the last layer, last token."""
    language_model = encoder.model.get_submodule(encoder.family.language_model_path)
    batch = encoder.builder([Input(text, None if image is None else "<given>")], [image])
    assert batch["attention_mask"].all()  # alone, so unpadded: the model's default positions are right
    captured = {}
    hook = language_model.layers[-1].register_forward_hook(lambda module, args, out: captured.update(out=out))
    try:
        with torch.no_grad():
            encoder.model(**batch, use_cache=False)
    finally:
        hook.remove()
    layer_out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    return torch.nn.functional.normalize(language_model.norm(layer_out)[0, -1].float(), dim=-1)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", CASES)
def test_embedding_is_the_final_norm_of_the_last_real_token(tiny_dirs, case, padding_side):
    encoder = Encoder.from_pretrained(tiny_dirs[case], padding_side=padding_side).eval()
    texts, images = _inputs(encoder.family)
    got = encoder.encode(texts, images, batch_size=len(texts), show_progress=False)
    want = torch.stack([_manual_embedding(encoder, text, image) for text, image in zip(texts, images, strict=True)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Mixed lengths for real: the batch pads some rows by most of its length.
    lengths = [encoder.builder([Input(t, None if i is None else "<given>")], [i])["input_ids"].shape[1]
               for t, i in zip(texts, images, strict=True)]  # fmt: skip
    assert max(lengths) >= 3 * min(lengths)


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("causal_lm")])
def test_max_length_cuts_text_not_the_image_span(tiny_dirs, case):
    encoder = Encoder.from_pretrained(tiny_dirs[case])
    family, tokenizer = encoder.family, tokenizer_of(encoder.processor)
    long_text = "a red circle above a blue square, " * 6 + "<|image_1|> and then more words"
    image = _image(56, 56, 3)
    full = encoder.builder([Input(long_text, "<given>")], [image])
    span_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in family.image_span_tokens])
    n_span = int(torch.isin(full["input_ids"], span_ids).sum())
    truncating = Encoder.from_pretrained(tiny_dirs[case], max_length=n_span + 4)
    cut = truncating.builder([Input(long_text, "<given>")], [image])
    assert cut["input_ids"].shape[1] == n_span + 4 < full["input_ids"].shape[1]
    assert int(torch.isin(cut["input_ids"], span_ids).sum()) == n_span
    embedding = truncating.encode([long_text, "short"], [image, None], show_progress=False)
    assert torch.isfinite(embedding).all()
    too_short = Encoder.from_pretrained(tiny_dirs[case], max_length=n_span - 1)
    with pytest.raises(ValueError, match=rf"row 0: its image span alone is {n_span} tokens"):
        too_short.encode([long_text], [image], show_progress=False)


ONE_WORD = "{text}\nSummary above sentence in one word:"


@pytest.mark.parametrize("case", CASES)
def test_max_length_cuts_the_text_not_the_end_of_its_template(tiny_dirs, case):
    """E5-V's template goes on after the text and ends where last-token pooling reads: a too-long
    text is shortened so that the template's ending survives; a short text is left as it is."""
    limit = 24
    encoder = Encoder.from_pretrained(tiny_dirs[case], text_prompt=ONE_WORD, max_length=limit, padding_side="right")
    plain = Encoder.from_pretrained(tiny_dirs[case], text_prompt=ONE_WORD, padding_side="right")
    tokenizer = tokenizer_of(encoder.processor)
    long_text, short_text = "a red circle above a blue square " * 8, "a red circle"
    ending = tokenizer("\nSummary above sentence in one word:", add_special_tokens=False)["input_ids"][-4:]
    cut = encoder.builder([Input(long_text), Input(short_text)], [None, None])
    real = cut["attention_mask"][0].bool()
    assert int(real.sum()) <= limit < plain.builder([Input(long_text)], [None])["input_ids"].shape[1]
    assert cut["input_ids"][0][real][-4:].tolist() == ending
    short_alone = plain.builder([Input(short_text)], [None])["input_ids"][0]
    assert cut["input_ids"][1][cut["attention_mask"][1].bool()].tolist() == short_alone.tolist()
    # The shortened text is a prefix of the text: a row keeps its start, as the old rule did.
    fitted = encoder.builder._fitted(Input(long_text))
    assert long_text.startswith(fitted.text.strip()[:20]) and len(fitted.text) < len(long_text)
    embeddings = encoder.encode([long_text, short_text], show_progress=False)
    alone = encoder.encode([long_text], show_progress=False)
    torch.testing.assert_close(embeddings[:1], alone, rtol=0, atol=1e-5)

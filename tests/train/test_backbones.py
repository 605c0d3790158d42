"""mmfast.train.backbones on a tiny model of every family: batching, embeddings, invariance, LoRA, training."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers import AutoProcessor, Qwen2VLConfig

from mmfast.train.backbones import (
    FAMILIES,
    attn_implementation,
    family_of,
    last_hidden_state,
    load_backbone,
    lora_target_modules,
    position_ids,
    processor_inputs,
    rewrite_image_tokens,
    unwrap_model,
    vision_tower,
)
from mmfast.train.processors import save_backbone_processor, tokenizer_of
from tests.train.conftest import CASES

MULTIMODAL = [case for case in CASES if not case.startswith("causal_lm")]


def image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


def rows(family):
    """Mixed lengths, images of three sizes, image and text-only rows interleaved."""
    mixed = [
        ("<|image_1|> a red circle", image(56, 56, 0)),
        ("two blue squares at the top left, and many more words to make this row long", None),
        ("<|image_1|>\nSummary above image in one word:", image(90, 60, 1)),
        ("hi", None),
        ("Find an image <|image_1|> that matches: a green star", image(60, 100, 2)),
        ("Summary above sentence in one word:", None),
    ]
    if not family.multimodal:
        return [(text.replace("<|image_1|>", "").strip(), None) for text, _ in mixed]
    return [(rewrite_image_tokens(text, family), im) for text, im in mixed]


def encode(model, processor, family, batch_rows, padding_side="right", max_length=None):
    texts = [text for text, _ in batch_rows]
    images = [im for _, im in batch_rows if im is not None]
    batch = processor_inputs(processor, family, texts, images, padding_side=padding_side, max_length=max_length)
    return batch, last_hidden_state(model, family, batch)


def last_token(hidden, mask):
    """The hidden state at each row's last real token, read from the mask (either padding side)."""
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values
    return hidden[torch.arange(hidden.shape[0]), last]


@pytest.fixture(params=CASES)
def backbone(request, tiny_dirs):
    model, processor, family = load_backbone(tiny_dirs[request.param])
    return model.eval(), processor, family


def test_family_of_maps_every_model_type_and_rejects_others():
    for family in FAMILIES.values():
        for model_type in family.model_types:
            assert family_of({"model_type": model_type}) is family
    assert family_of(Qwen2VLConfig()).name == "qwen2_vl"
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*llava_next.*qwen2_vl"):
        family_of({"model_type": "bert"})
    with pytest.raises(ValueError, match="unsupported model_type None"):
        family_of({})


def test_rewrite_image_tokens_rules():
    qwen, llava, text_only, phi = (FAMILIES[name] for name in ("qwen2_vl", "llava", "causal_lm", "phi3_v"))
    assert rewrite_image_tokens("<|image_1|> a cat", qwen) == "<|vision_start|><|image_pad|><|vision_end|> a cat"
    assert rewrite_image_tokens("a cat <|image_1|>", llava) == "a cat <image>"
    assert rewrite_image_tokens("<|image_1|> a cat", phi) == "<|image_1|> a cat"
    for family in (qwen, llava, text_only):
        assert rewrite_image_tokens("no image here", family) == "no image here"
    with pytest.raises(ValueError, match="text-only"):
        rewrite_image_tokens("<|image_1|> a cat", text_only)
    with pytest.raises(ValueError, match=r"several <\|image_1\|> in one text; one image per text"):
        rewrite_image_tokens("<|image_1|> and <|image_1|>", llava)
    with pytest.raises(TypeError, match="str"):
        rewrite_image_tokens(None, llava)


def test_attn_implementation_choice_and_errors():
    flash_works = attn_implementation() == "flash_attention_2"
    assert attn_implementation() == ("flash_attention_2" if flash_works else "sdpa")
    assert attn_implementation("eager") == "eager"
    assert attn_implementation("sdpa") == "sdpa"
    if not flash_works:
        with pytest.raises(ValueError, match="flash-attn package and a CUDA device"):
            attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="'flash_attention_2', 'sdpa', 'eager'"):
        attn_implementation("fast")


def test_load_backbone_errors(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3_v"}))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_backbone(tmp_path)
    with pytest.raises(ValueError, match="attn_implementation"):
        load_backbone(tiny_dirs["llava"], attn_implementation="fast")


def test_hidden_state_is_final_norm_of_last_layer(backbone):
    """Against a manual forward: the last decoder layer's output through the final norm."""
    model, processor, family = backbone
    language_model = model.get_submodule(family.language_model_path)
    captured = {}
    hook = language_model.layers[-1].register_forward_hook(lambda m, i, out: captured.update(out=out))
    for side in ("left", "right"):
        batch, hidden = encode(model, processor, family, rows(family), padding_side=side)
        layer_out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
        assert hidden.shape == (*batch["input_ids"].shape, model.config.get_text_config().hidden_size)
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(hidden[mask], language_model.norm(layer_out)[mask], atol=0, rtol=0)
    hook.remove()
    if family.multimodal:
        # One image token span per image row, filled with that image's features.
        fill = tokenizer_of(processor).convert_tokens_to_ids(family.image_fill_token)
        assert ((batch["input_ids"] == fill).any(dim=1)).tolist() == [im is not None for _, im in rows(family)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_invariance(backbone, padding_side):
    """A row's last-token state is the same alone or batched: mixed, text-only and image-only batches."""
    model, processor, family = backbone
    all_rows = rows(family)
    with torch.no_grad():
        alone = []
        for row in all_rows:
            batch, hidden = encode(model, processor, family, [row])
            alone.append(last_token(hidden, batch["attention_mask"])[0])
        alone = torch.stack(alone)
        subsets = [list(range(len(all_rows))), [i for i, (_, im) in enumerate(all_rows) if im is None]]
        if family.multimodal:
            subsets.append([i for i, (_, im) in enumerate(all_rows) if im is not None])
        for subset in subsets:
            batch, hidden = encode(model, processor, family, [all_rows[i] for i in subset], padding_side)
            torch.testing.assert_close(last_token(hidden, batch["attention_mask"]), alone[subset], atol=1e-5, rtol=0)


def test_position_ids_count_each_rows_real_tokens(backbone):
    """Left padding does not shift a row's positions; for Qwen the M-RoPE ids of image rows too."""
    model, processor, family = backbone
    all_rows = rows(family)
    texts, images = [t for t, _ in all_rows], [im for _, im in all_rows if im is not None]
    batch = processor_inputs(processor, family, texts, images, padding_side="left")
    batched = position_ids(model, family, batch)
    for index, (text, im) in enumerate(all_rows):
        single = processor_inputs(processor, family, [text], [im] if im else [])
        expected = position_ids(model, family, single)
        mask = batch["attention_mask"][index].bool()
        got = batched[:, index, mask] if family.mrope else batched[index, mask]
        assert torch.equal(got, expected[:, 0] if family.mrope else expected[0])


# Position ids without M-RoPE are the text positions already.
MROPE_CASES = [case for case in CASES if case in FAMILIES and FAMILIES[case].mrope]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("backbone", MROPE_CASES, indirect=True)
def test_text_only_mrope_positions_equal_get_rope_index(backbone, padding_side):
    """A text-only M-RoPE batch skips get_rope_index's loop per row: the whole [3, B, T] tensor (padding
    included) is the one get_rope_index gives, and so is every hidden state."""
    model, processor, family = backbone
    assert family.mrope
    texts = [text for text, im in rows(family) if im is None] + ["a red circle " * 9, "x"]
    batch = processor_inputs(processor, family, texts, padding_side=padding_side)
    assert not batch["mm_token_type_ids"].any() and not batch["attention_mask"].all()
    expected, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                             attention_mask=batch["attention_mask"])  # fmt: skip
    got = position_ids(model, family, batch)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    with torch.no_grad():
        hidden = last_hidden_state(model, family, batch)
        inputs = dict(batch) | {"position_ids": expected}
        reference = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    assert torch.equal(hidden[mask], reference[mask])


@pytest.mark.parametrize("text_only", [False, True])
@pytest.mark.parametrize("backbone", CASES, indirect=True)
def test_left_padding_moves_each_rows_real_tokens_whole(backbone, text_only):
    """Untruncated rows are moved all at once: left-padded, each row holds the right-padded row's real tokens
    (the processor's own, by the test below) at its end, every per-token tensor alike, padding before them."""
    model, processor, family = backbone
    batch_rows = [(t, im) for t, im in rows(family) if im is None or not text_only] + [("x", None)]
    texts, images = [t for t, _ in batch_rows], [im for _, im in batch_rows if im is not None]
    right = processor_inputs(processor, family, texts, images)
    left = processor_inputs(processor, family, texts, images, padding_side="left", max_length=10_000)
    assert sorted(left) == sorted(right)
    lengths = right["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) > 1 and right["attention_mask"].shape[1] == max(lengths)
    for key, value in right.items():
        if not torch.is_tensor(value) or value.shape != right["input_ids"].shape:
            assert torch.equal(left[key], value), key
            continue
        fill = tokenizer_of(processor).pad_token_id if key == "input_ids" else 0
        for row, n in enumerate(lengths):
            padding = value.shape[1] - n
            assert torch.equal(left[key][row, padding:], value[row, :n]), key
            assert (left[key][row, :padding] == fill).all() and left[key].dtype == value.dtype, key


@pytest.mark.parametrize("text_only", [False, True])
@pytest.mark.parametrize("backbone", MULTIMODAL, indirect=True)  # a text-only family's batch is the tokenizer's
def test_processor_inputs_equal_the_processors_own_call(backbone, text_only):
    """Right-padded and untruncated, processor_inputs gives exactly the processor's own tensors, its
    mm_token_type_ids (built batched here, per row in transformers) included; image rows and text-only batches."""
    model, processor, family = backbone
    assert family.multimodal
    batch_rows = [(t, im) for t, im in rows(family) if im is None or not text_only]
    texts, images = [t for t, _ in batch_rows], [im for _, im in batch_rows if im is not None]
    got = processor_inputs(processor, family, texts, images)
    expected = processor(text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt")
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    if "mm_token_type_ids" in expected and not text_only:
        assert (expected["mm_token_type_ids"] == 1).any()


def test_long_left_padding_keeps_embedding(tiny_dirs):
    """A short row next to a 1400-token one: with positions counted from its first real token, its state
    does not move; with the model's default positions (shifted by the padding) it drifted ~4e-6 here."""
    model, processor, family = load_backbone(tiny_dirs["causal_lm"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(6)  # sharper attention, as in a trained model
        short = ("two blue squares at the top left and a red circle in the middle", None)
        batch, hidden = encode(model, processor, family, [short])
        alone = last_token(hidden, batch["attention_mask"])
        batch, hidden = encode(model, processor, family, [short, (" red circle" * 700, None)], "left")
        assert batch["input_ids"].shape[1] >= 1400
        torch.testing.assert_close(last_token(hidden, batch["attention_mask"])[:1], alone, atol=1.5e-6, rtol=0)


def test_save_reload_round_trip(backbone, tmp_path):
    model, processor, family = backbone
    model.save_pretrained(tmp_path)
    save_backbone_processor(processor, tmp_path)
    model2, processor2, family2 = load_backbone(tmp_path)
    assert family2 is family and type(processor2) is type(processor) and type(model2) is type(model)
    if family.multimodal:
        # Registered: even AutoProcessor gives the no-video subclass, not a bare tokenizer; no torchvision needed.
        assert type(AutoProcessor.from_pretrained(tmp_path, local_files_only=True)) is type(processor)
        assert type(processor2.image_processor).__name__.endswith("ImageProcessorPil")
    batch, hidden = encode(model, processor, family, rows(family), "left")
    batch2, hidden2 = encode(model2.eval(), processor2, family2, rows(family), "left")
    assert batch.keys() == batch2.keys()
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    torch.testing.assert_close(hidden2, hidden, atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_truncation_cuts_text_never_an_image_span(backbone, padding_side):
    model, processor, family = backbone
    tokenizer = tokenizer_of(processor)
    long_text = "a red circle above a blue square, " * 4
    row = (f"{long_text}{family.image_token} and then more words" if family.multimodal else long_text, None)
    row = (row[0], image(56, 56, 3) if family.multimodal else None)
    full, _ = encode(model, processor, family, [row])
    span_ids = [tokenizer.convert_tokens_to_ids(t) for t in family.image_span_tokens]
    n_span = int(torch.isin(full["input_ids"], torch.tensor(span_ids, dtype=torch.long)).sum())
    max_length = n_span + 5
    assert full["input_ids"].shape[1] > max_length
    batch, hidden = encode(model, processor, family, [row, ("short", None)], padding_side, max_length)
    assert batch["input_ids"].shape == (2, max_length)
    ids = batch["input_ids"][0]
    assert int(torch.isin(ids, torch.tensor(span_ids, dtype=torch.long)).sum()) == n_span
    text_ids = full["input_ids"][0][~torch.isin(full["input_ids"][0], torch.tensor(span_ids, dtype=torch.long))]
    # The text kept is the text's beginning, in order.
    assert torch.equal(ids[~torch.isin(ids, torch.tensor(span_ids, dtype=torch.long))], text_ids[:5])
    assert torch.isfinite(hidden).all()
    assert batch["attention_mask"][1].sum() == tokenizer("short", return_tensors="pt")["input_ids"].shape[1]
    if family.multimodal:
        with pytest.raises(ValueError, match=rf"row 0: its image span alone is {n_span} tokens"):
            encode(model, processor, family, [row], max_length=n_span - 1)


def test_processor_inputs_errors(tiny_dirs):
    model, processor, family = load_backbone(tiny_dirs["llava"])
    red = image(56, 56, 0)
    with pytest.raises(ValueError, match="1 texts hold the image token '<image>' but 2 images"):
        processor_inputs(processor, family, ["<image> a", "b"], [red, red])
    with pytest.raises(ValueError, match=r"texts\[1\] holds '<image>' more than once"):
        processor_inputs(processor, family, ["a", "<image><image>"], [red, red])
    with pytest.raises(ValueError, match="padding_side"):
        processor_inputs(processor, family, ["a"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        processor_inputs(processor, family, ["a"], max_length=0)
    with pytest.raises(ValueError, match=r"texts\[0\] still holds <\|image_1\|>; apply rewrite_image_tokens"):
        processor_inputs(processor, family, ["<|image_1|> a"], [red])
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        processor_inputs(processor, family, ["a", None])
    with pytest.raises(ValueError, match="at least one prompt"):
        processor_inputs(processor, family, [])
    _, tokenizer, text_family = load_backbone(tiny_dirs["causal_lm"])
    with pytest.raises(ValueError, match="text-only, but 1 images"):
        processor_inputs(tokenizer, text_family, ["a"], [red])


class FakePhi3VProcessor:
    """Mimics Phi-3.5-V's processor: `<|image_1|>` becomes negative ids, one crop stack per image."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, images=None, return_tensors="pt"):
        before, image_marker, after = text.partition("<|image_1|>")
        ids = self.tokenizer(before)["input_ids"] + [-1] * 3 * bool(image_marker) + self.tokenizer(after)["input_ids"]
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if images:
            out["pixel_values"] = torch.full((1, 2, 3, 4, 4), float(len(ids)))
            out["image_sizes"] = torch.tensor([[4, 4]])
        return out


def test_phi3_v_rows_are_processed_one_by_one(shared_tokenizer):
    family, processor = FAMILIES["phi3_v"], FakePhi3VProcessor(shared_tokenizer)
    texts = ["<|image_1|> a red circle", "two blue squares", "a cat <|image_1|>"]
    batch = processor_inputs(processor, family, texts, [image(8, 8, 0), image(8, 8, 1)], padding_side="left")
    lengths = [processor(t)["input_ids"].shape[1] for t in texts]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (2, 2, 3, 4, 4) and batch["image_sizes"].shape == (2, 2)
    assert (batch["input_ids"] < 0).sum(1).tolist() == [3, 0, 3]
    truncated = processor_inputs(processor, family, texts[:1], [image(8, 8, 0)], max_length=4)
    assert truncated["input_ids"][0, :3].tolist() == [-1, -1, -1]


def test_vision_tower(backbone):
    model, _, family = backbone
    tower = vision_tower(model, family)
    if not family.multimodal:
        assert tower is None
        return
    tower_params = {id(p) for p in tower.parameters()}
    language_params = {id(p) for p in model.get_submodule(family.language_model_path).parameters()}
    assert tower_params and not tower_params & language_params
    assert tower_params <= {id(p) for p in model.parameters()}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_targets_only_the_language_model(backbone):
    model, processor, family = backbone
    reference = last_hidden_state(model, family, processor_inputs(processor, family, ["a red circle"]))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model, family)))
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    layers = model.config.get_text_config().num_hidden_layers
    assert len(adapted) == 7 * layers, adapted  # q, k, v, o, gate, up, down
    assert all(family.language_model_path + ".layers." in name for name in adapted)
    tower = vision_tower(peft_model, family)
    if tower is not None:
        assert not any(isinstance(module, LoraLayer) for module in tower.modules())
    assert unwrap_model(peft_model) is model
    # LoRA starts at zero: the wrapped model gives the same states through the same call.
    after = last_hidden_state(peft_model, family, processor_inputs(processor, family, ["a red circle"]))
    torch.testing.assert_close(after, reference, atol=0, rtol=0)
    attention_only = lora_target_modules(model, family, include_mlp=False)
    assert "gate_proj" not in attention_only and "q_proj" in attention_only


def test_one_adamw_step_changes_parameters(backbone):
    model, processor, family = backbone
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch, hidden = encode(model, processor, family, rows(family), "left")
    embeddings = torch.nn.functional.normalize(last_token(hidden, batch["attention_mask"]), dim=-1)
    loss = torch.nn.functional.cross_entropy(embeddings[:3] @ embeddings[3:].T / 0.05, torch.arange(3))
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    language_prefix = family.language_model_path + ".layers."
    assert any(name.startswith(language_prefix) for name in changed)
    tower = vision_tower(model, family)
    if tower is not None:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_bf16_load(tiny_dirs):
    model, processor, family = load_backbone(tiny_dirs["qwen2_vl"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _, hidden = encode(model, processor, family, rows(family), "left")
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()

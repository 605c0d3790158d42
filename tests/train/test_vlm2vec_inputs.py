"""Images and tokens as VLM2Vec processes them (issue 19): `image_token_style="vlm2vec"`,
`image_resolution`, `min_pixels` / `max_pixels`, recorded in the saved encoder so evaluation embeds as
training did.

The reference below rebuilds VLM2Vec's Qwen2-VL rule from its source (read at 6e1e1d4, not copied):
- `src/data/dataset/mmeb_dataset.py` replaces Phi-3's `<|image_1|>` by `VLM_IMAGE_TOKENS[QWEN2_VL]`,
  which `src/model/processor.py` defines as the bare `<|image_pad|>`;
- `Qwen2_VL_process_fn` processes each row alone: a text-only row through `processor(text=[text])`,
  an image row through `processor(text=[text], images=[image])` after resizing an image with a side under
  28 px to 56×56;
- `load_processor` builds the Qwen2-VL image processor with `size={"shortest_edge": min_pixels,
  "longest_edge": max_pixels}` (V2's `resize_min_pixels` / `resize_max_pixels`);
- V1's `process_image` resizes to (1344, 1344) / (672, 672) / (128, 128) for high / mid / low;
- its vendored Qwen2-VL `get_rope_index` counts a row's images by the `<|vision_start|>` tokens in it:
  with the bare `<|image_pad|>` there are none, and every token gets text positions on all three axes.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmfast.train.arguments import parse_arguments
from mmfast.train.backbones import position_ids, with_token_style
from mmfast.train.data import Input
from mmfast.train.encoder import Encoder, EncoderConfig
from mmfast.train.processors import NO_VIDEO_PROCESSORS
from mmfast.train.run import build_encoder

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 9  # small, so the tiny model's images stay small


def images():
    """Odd sizes, one with a side under 28 px (VLM2Vec's 56×56 case), one that max_pixels shrinks."""
    return [Image.new("RGB", size, (40 * i % 255, 90, 160)) for i, size in enumerate([(60, 45), (20, 70), (131, 97)])]


ROWS = [
    ("<|image_1|>\nRepresent the given image for classification\n", 0),
    ("plane, carpenter's plane, woodworking plane", None),
    ("<|image_1|>\nRepresent the given image with the following question: what is it?", 1),
    ("Find me an everyday image that matches the given caption: a dog.", None),
    ("<|image_1|>\nRepresent the given image.", 2),
]


def vlm2vec_ids(folder, rows, pictures, *, resolution=None):
    """Token ids and image grids as VLM2Vec's code gives them, one row at a time."""
    processor_class = NO_VIDEO_PROCESSORS["qwen2_vl"][1]  # Qwen2VLProcessor without torchvision's video part
    processor = processor_class.from_pretrained(folder, local_files_only=True)
    image_processor = type(processor.image_processor).from_pretrained(
        folder, size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, local_files_only=True
    )
    processor = processor_class(image_processor=image_processor, tokenizer=processor.tokenizer)
    out = []
    for text, picture in zip(rows, pictures, strict=True):
        text = text.replace("<|image_1|>", "<|image_pad|>")
        if picture is None:
            inputs = processor(text=[text], images=None, return_tensors="pt")
        else:
            if resolution is not None:
                picture = picture.resize(resolution)
            if picture.size[0] < 28 or picture.size[1] < 28:
                picture = picture.resize((56, 56))
            inputs = processor(text=[text], images=[picture], return_tensors="pt")
        out.append((inputs["input_ids"][0].tolist(), inputs.get("image_grid_thw"), inputs.get("pixel_values")))
    return out


def mmfast_rows(encoder, rows, pictures):
    batch = encoder.prepare(
        [Input(t, None if p is None else "<given>") for t, p in zip(rows, pictures, strict=True)], pictures
    )
    mask = batch["attention_mask"].bool()
    return [batch["input_ids"][r][mask[r]].tolist() for r in range(len(rows))], batch


@pytest.mark.parametrize("resolution", [None, "low"])
def test_qwen2_vl_token_ids_match_vlm2vec_row_by_row(tiny_dirs, resolution):
    folder = tiny_dirs["qwen2_vl"]
    texts = [text for text, _ in ROWS]
    pictures = [None if i is None else images()[i] for _, i in ROWS]
    encoder = Encoder.from_pretrained(folder, image_token_style="vlm2vec", min_pixels=MIN_PIXELS,
                                      max_pixels=MAX_PIXELS, image_resolution=resolution)  # fmt: skip
    ours, batch = mmfast_rows(encoder, texts, pictures)
    size = None if resolution is None else (128, 128)
    theirs = vlm2vec_ids(folder, texts, pictures, resolution=size)
    for row, (mine, (reference, _, _)) in enumerate(zip(ours, theirs, strict=True)):
        assert mine == reference, f"row {row}: {texts[row]!r}"
    grids = torch.cat([grid for _, grid, _ in theirs if grid is not None])
    assert torch.equal(batch["image_grid_thw"], grids)
    assert torch.equal(batch["pixel_values"], torch.cat([p for _, _, p in theirs if p is not None]))
    # The rule is not a no-op: mmfast's own style wraps the image in vision start/end tokens.
    own_style = Encoder.from_pretrained(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                        image_resolution=resolution)  # fmt: skip
    default, _ = mmfast_rows(own_style, texts[:1], pictures[:1])
    tokenizer = encoder.processor.tokenizer
    start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert start in default[0] and start not in ours[0] and len(default[0]) == len(ours[0]) + 2


def test_pixel_range_and_resolution_reach_the_processor(tiny_dirs):
    folder = tiny_dirs["qwen2_vl"]
    plain = Encoder.from_pretrained(folder)
    ranged = Encoder.from_pretrained(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    picture = Image.new("RGB", (131, 97), (1, 2, 3))
    grid = {name: enc.prepare([Input("<|image_1|>x", "<given>")], [picture])["image_grid_thw"]
            for name, enc in (("plain", plain), ("ranged", ranged))}  # fmt: skip
    assert not torch.equal(grid["plain"], grid["ranged"])  # the range changes the image's patches
    config = EncoderConfig(base_model="x", image_resolution="mid")
    family = ranged.family
    assert config.sized(Image.new("RGB", (30, 500)), family).size == (672, 672)
    assert EncoderConfig(base_model="x", image_resolution="high").sized(picture, family).size == (1344, 1344)
    assert EncoderConfig(base_model="x").sized(Image.new("RGB", (20, 90)), family).size == (20, 90)
    styled = EncoderConfig(base_model="x", image_token_style="vlm2vec")
    assert styled.sized(Image.new("RGB", (20, 90)), family).size == (56, 56)


def test_options_are_saved_and_read_back_for_evaluation(tiny_dirs, tmp_path):
    options = {"image_token_style": "vlm2vec", "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
               "image_resolution": "low"}  # fmt: skip
    argv = ["--model_name_or_path", str(tiny_dirs["qwen2_vl"]), "--recipe", "vlm2vec", "--output_dir",
            str(tmp_path / "run"), *(token for k, v in options.items() for token in (f"--{k}", str(v)))]  # fmt: skip
    trained = build_encoder(parse_arguments(argv))
    assert {k: getattr(trained.encoder_config, k) for k in options} == options
    trained.save_pretrained(tmp_path / "saved")
    evaluated = Encoder.from_pretrained(tmp_path / "saved")  # what mmfast-eval does with --model
    assert {k: getattr(evaluated.encoder_config, k) for k in options} == options
    texts = [text for text, _ in ROWS]
    pictures = [None if i is None else images()[i] for _, i in ROWS]
    assert mmfast_rows(evaluated, texts, pictures)[0] == mmfast_rows(trained, texts, pictures)[0]
    torch.testing.assert_close(evaluated.encode(texts, pictures, show_progress=False),
                               trained.encode(texts, pictures, show_progress=False))  # fmt: skip


def test_bad_options_are_clear_errors(tiny_dirs):
    for options, error in [
        ({"image_resolution": "huge"}, "image_resolution must be one of high, mid, low"),
        ({"min_pixels": 0}, "min_pixels must be a positive integer"),
        ({"min_pixels": 100, "max_pixels": 10}, r"min_pixels \(100\) must not exceed max_pixels \(10\)"),
        ({"image_token_style": "qwen"}, "image_token_style must be one of mmfast, vlm2vec"),
    ]:
        with pytest.raises(ValueError, match=error):
            EncoderConfig(base_model="x", **options)
    with pytest.raises(ValueError, match="min_pixels / max_pixels set the Qwen-VL image processor's range"):
        Encoder.from_pretrained(tiny_dirs["llava"], max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="image_resolution: a text-only causal_lm backbone reads no image"):
        Encoder.from_pretrained(tiny_dirs["causal_lm"], image_resolution="low")


def test_token_style_leaves_other_families_as_they_are(tiny_dirs):
    llava = Encoder.from_pretrained(tiny_dirs["llava"], image_token_style="vlm2vec")
    assert with_token_style(llava.family, "vlm2vec") == llava.family and llava.builder.family.image_token == "<image>"
    qwen = Encoder.from_pretrained(tiny_dirs["qwen2_5_vl"], image_token_style="vlm2vec")
    assert qwen.builder.family.image_token == "<|image_pad|>" and qwen.family.image_token.startswith("<|vision_start|>")


def test_vlm2vec_style_gives_vlm2vecs_text_positions(tiny_dirs):
    folder = tiny_dirs["qwen2_vl"]
    texts = [text for text, _ in ROWS]
    pictures = [None if i is None else images()[i] for _, i in ROWS]
    styled = Encoder.from_pretrained(folder, image_token_style="vlm2vec", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ids, batch = mmfast_rows(styled, texts, pictures)
    positions = position_ids(styled.model, styled.builder.family, batch)
    mask = batch["attention_mask"].bool()
    for row, row_ids in enumerate(ids):
        expected = torch.arange(len(row_ids)).expand(3, -1)  # VLM2Vec's rule: no vision start, text positions
        assert torch.equal(positions[:, row][:, mask[row]], expected)
    own = Encoder.from_pretrained(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    _, own_batch = mmfast_rows(own, texts[:1], pictures[:1])
    own_positions = position_ids(own.model, own.family, own_batch)
    assert not torch.equal(own_positions[1], own_positions[2])  # mmfast's style: the image's 2-D positions
    embeddings = styled.encode(texts, pictures, show_progress=False)
    assert embeddings.shape[0] == len(texts) and torch.isfinite(embeddings).all()

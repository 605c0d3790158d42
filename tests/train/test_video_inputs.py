"""A video as ONE input through Qwen-VL's video path (mmfast.train.video_inputs), without torchvision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.train import backbones
from mmfast.train.data import Input
from mmfast.train.encoder import Encoder
from mmfast.train.evaluate.cache import input_key
from mmfast.train.video_inputs import FrameVideoProcessor, Video, sample_frame_positions

VIDEO_TEXT = "<|image_1|> Understand the content of the provided video."


def frames(count: int, size=(90, 60), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def qwen(tiny_dirs):
    return Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]))


def test_v2_frame_sampling():
    # V2: np.linspace(0, n - 1, 8) rounded down, every frame when there are at most 8.
    assert sample_frame_positions(64) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert sample_frame_positions(10) == [0, 1, 2, 3, 5, 6, 7, 9]
    assert sample_frame_positions(5) == [0, 1, 2, 3, 4]
    assert sample_frame_positions(3, 2) == [0, 2]
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        sample_frame_positions(5, 0)


def test_two_equal_frames_are_the_image(qwen):
    image_processor = qwen.processor.image_processor
    picture = frames(1)[0]
    image = image_processor(images=[picture], return_tensors="pt")
    video = FrameVideoProcessor(image_processor)([[picture, picture]])
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()


@pytest.mark.parametrize("count", [1, 3, 4])
def test_consecutive_frames_fill_the_temporal_axis(qwen, count):
    """Checked element by element against each frame's own patches (an odd count repeats the last)."""
    image_processor = qwen.processor.image_processor
    clip = frames(count, seed=count)
    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    out = FrameVideoProcessor(image_processor)([clip])
    grid_t, grid_h, grid_w = out["video_grid_thw"][0].tolist()
    assert grid_t == -(-count // temporal)
    per_frame = [image_processor(images=[f], return_tensors="pt")["pixel_values"].double() for f in clip]
    per_frame += [per_frame[-1]] * (grid_t * temporal - count)
    video = out["pixel_values_videos"].double().view(grid_t, grid_h * grid_w, 3, temporal, patch, patch)
    for t in range(grid_t):
        for k in range(temporal):
            source = per_frame[t * temporal + k].view(grid_h * grid_w, 3, temporal, patch, patch)
            for s in range(grid_h * grid_w):
                assert torch.equal(video[t, s, :, k], source[s, :, 0])


def test_frames_of_other_sizes_take_the_first_frames_size(qwen):
    clip = frames(2, size=(90, 60)) + frames(1, size=(40, 70), seed=5)
    out = FrameVideoProcessor(qwen.processor.image_processor)([clip])
    single = FrameVideoProcessor(qwen.processor.image_processor)([clip[:2]])
    assert out["video_grid_thw"][0, 1:].tolist() == single["video_grid_thw"][0, 1:].tolist()


@pytest.mark.parametrize("style", ["mmfast", "vlm2vec"])
def test_video_tokens_and_their_rope_type(tiny_dirs, style):
    encoder = Encoder.from_pretrained(str(tiny_dirs["qwen2_vl"]), image_token_style=style)
    clip = Video(tuple(frames(3)), "clip")
    batch = encoder.builder([Input(VIDEO_TEXT, "<given>")], [clip])
    tokenizer = backbones.tokenizer_of(encoder.processor)
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ids = batch["input_ids"][0]
    merge = encoder.processor.image_processor.merge_size
    assert int((ids == video_pad).sum()) == int(batch["video_grid_thw"][0].prod()) // merge**2
    assert torch.equal(batch["mm_token_type_ids"][0] == 2, ids == video_pad)
    assert int((ids == vision_start).sum()) == (1 if style == "mmfast" else 0)  # VLM2Vec: a bare <|video_pad|>
    assert "pixel_values" not in batch


def test_a_video_embeds_as_it_would_alone(qwen):
    """Batch invariance, with text and image rows beside the video, on either padding side."""
    clip = Video(tuple(frames(3)), "clip")
    alone = qwen.encode([VIDEO_TEXT], [clip], show_progress=False)[0]
    mixed = qwen.encode(
        ["a red circle", VIDEO_TEXT, "<|image_1|> an image", VIDEO_TEXT],
        [None, clip, frames(1, seed=9)[0], Video(tuple(frames(5, seed=3)), "other")],
        batch_size=4,
        show_progress=False,
    )
    assert torch.allclose(mixed[1], alone, atol=1e-6)
    assert torch.allclose(alone.norm(), torch.tensor(1.0), atol=1e-6)
    # Differs from the first frame as an image: the video path, not a frame, was embedded.
    assert not torch.allclose(alone, qwen.encode(["<|image_1|> x"], [clip.frames[0]], show_progress=False)[0])


def test_a_family_without_video_input_says_so(tiny_dirs):
    family = backbones.FAMILIES["llava_onevision"]
    with pytest.raises(ValueError, match="takes no video input in mmfast.*Qwen2-VL"):
        backbones.rewrite_image_tokens(VIDEO_TEXT, family, video=True)


def test_a_video_where_an_image_goes_is_named(qwen):
    family = qwen.builder.family
    text = backbones.rewrite_image_tokens(VIDEO_TEXT, family)  # the image token
    with pytest.raises(ValueError, match=r"texts\[0\] holds the image token, so it takes an image, got Video"):
        backbones.processor_inputs(qwen.processor, family, [text], [Video(tuple(frames(2)))])
    with pytest.raises(ValueError, match="holds no frame"):
        Video(())


def test_cache_key_follows_the_frames(tmp_path):
    paths = []
    for index, frame in enumerate(frames(3)):
        paths.append(tmp_path / f"{index}.png")
        frame.save(paths[-1])
    key = input_key(VIDEO_TEXT, Video(tuple(paths)))
    assert key == input_key(VIDEO_TEXT, Video(tuple(paths), "another label"))
    assert key != input_key(VIDEO_TEXT, Video(tuple(paths[:2])))
    assert key != input_key(VIDEO_TEXT, Video(tuple(reversed(paths))))
    frames(1, seed=7)[0].save(paths[1])  # a frame rewritten: another input
    assert key != input_key(VIDEO_TEXT, Video(tuple(paths)))

"""Video inputs: a video embedded as ONE input through the backbone's own video path (MMEB-V2).

VLM2Vec V2 samples 8 frames of a video (`np.linspace(0, n - 1, 8)` over the frames in natural sort
order; every frame when there are fewer) and hands them to the Qwen2-VL processor as one video:
consecutive frames are paired (`temporal_patch_size` 2, the last frame repeated for an odd count), and
the text's video token becomes one `<|video_pad|>` per merged patch.

transformers' Qwen2-VL video processor needs torchvision, which never loads next to this CPU torch.
`FrameVideoProcessor` stands in for it: every frame goes through the backbone's own image processor
(the same resize, rescale and normalisation as an image, with the run's pixel range), and only the
temporal pairing is done here. The image processor writes each frame's patch twice along its temporal
axis; a video patch holds two consecutive frames there instead. A video of two equal frames therefore
gives exactly the pixel values of the image (tested). The frames of one video are resized to one size
(the first frame's), as the video processor resizes a video as one tensor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from .data import load_image

V2_NUM_FRAMES = 8


def sample_frame_positions(num_available: int, num_frames: int = V2_NUM_FRAMES) -> list[int]:
    """VLM2Vec V2's frame sampling: `num_frames` positions spread evenly from the first frame to the
    last (rounded down), or every frame when fewer are available."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_available <= num_frames:
        return list(range(num_available))
    return [int(position) for position in np.linspace(0, num_available - 1, num_frames, dtype=int)]


@dataclass(frozen=True, eq=False)
class Video:
    """One video input: its frames in order (paths, PIL images, or image sources with `load()`)."""

    frames: tuple
    label: str = ""

    def __post_init__(self):
        if not self.frames:
            raise ValueError(f"video {self.label or '(unnamed)'}: it holds no frame")

    def load(self) -> Video:
        """The same video with every frame decoded (RGB)."""
        return Video(tuple(_load_frame(frame) for frame in self.frames), self.label)

    def __repr__(self) -> str:
        return f"Video({self.label or 'unnamed'}, {len(self.frames)} frames)"


def _load_frame(frame) -> Image.Image:
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if isinstance(frame, (str, os.PathLike)):
        return load_image(frame)
    return frame.load().convert("RGB")


class FrameVideoProcessor:
    """Qwen-VL video inputs (`pixel_values_videos`, `video_grid_thw`) from the image processor; see
    the module note. Picklable, so data loader workers can use it."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.patch_size = image_processor.patch_size

    def __call__(self, videos: Sequence, return_tensors=None, **_) -> BatchFeature:
        patches, grids = [], []
        for index, frames in enumerate(videos):
            video_patches, grid = self.video_patches(list(frames), index)
            patches.append(video_patches)
            grids.append(grid)
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        return BatchFeature(data)

    def video_patches(self, frames: list[Image.Image], index: int = 0) -> tuple[torch.Tensor, list[int]]:
        """[grid_t · grid_h · grid_w, C · temporal · patch²] patches of one video, and (t, h, w)."""
        if not frames:
            raise ValueError(f"videos[{index}] holds no frame")
        size = frames[0].size
        # One size for the whole video: frames of another size are resized to the first's first.
        frames = [frame if frame.size == size else frame.resize(size, Image.Resampling.BICUBIC) for frame in frames]
        out = self.image_processor(images=frames, return_tensors="pt")
        grid = out["image_grid_thw"][0].tolist()
        _, grid_h, grid_w = grid
        temporal, patch = self.temporal_patch_size, self.patch_size
        per_frame = out["pixel_values"].view(len(frames), grid_h * grid_w, -1, temporal, patch, patch)[:, :, :, 0]
        if pad := -len(frames) % temporal:  # an odd count repeats the last frame, as the video processor does
            per_frame = torch.cat([per_frame, per_frame[-1:].expand(pad, *per_frame.shape[1:])])
        grid_t = per_frame.shape[0] // temporal
        # [t, temporal, hw, C, p, p] -> [t, hw, C, temporal, p, p]: frames 2g and 2g+1 fill patch g's time axis.
        paired = per_frame.view(grid_t, temporal, grid_h * grid_w, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
        return paired.reshape(grid_t * grid_h * grid_w, -1), [grid_t, grid_h, grid_w]


def with_video_processor(processor):
    """The processor, able to take `videos=` (lists of PIL frames): `FrameVideoProcessor` is attached
    once. It is not among the processor's saved parts, so `save_pretrained` is unchanged."""
    if getattr(processor, "video_processor", None) is None:
        processor.video_processor = FrameVideoProcessor(processor.image_processor)
    return processor

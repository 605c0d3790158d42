"""Drawing the default's visual world: bold flat shapes in saturated colours on a plain light
background, drawn at 4x and box-filtered down (smooth edges, deterministic bytes).

Coordinates are fractions of the image side, so one scene renders at any size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Far apart in hue or brightness, so a 64-px JPEG keeps them apart.
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 20),
    "green": (40, 160, 60),
    "cyan": (20, 185, 205),
    "blue": (35, 70, 215),
    "purple": (145, 55, 190),
    "black": (30, 30, 30),
}
# Silhouettes that stay distinct at ~20 px.
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
SUPERSAMPLE = 4
JPEG_QUALITY = 92


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [
        (
            (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / points),
            -(1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / points),
        )
        for k in range(2 * points)
    ]


def _heart() -> list[tuple[float, float]]:
    ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    xs, ys = 16 * np.sin(ts) ** 3, -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
    return [(float(x) / 17, float(y) / 17 + 0.1) for x, y in zip(xs, ys, strict=True)]


# Outlines in a unit frame (radius 1, y down); circle and ring are drawn as ellipses.
_OUTLINES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)],
    "diamond": [(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)],
    "star": _star(5, 0.45),
    "cross": [
        (-0.3, -1.0),
        (0.3, -1.0),
        (0.3, -0.3),
        (1.0, -0.3),
        (1.0, 0.3),
        (0.3, 0.3),
        (0.3, 1.0),
        (-0.3, 1.0),
        (-0.3, 0.3),
        (-1.0, 0.3),
        (-1.0, -0.3),
        (-0.3, -0.3),
    ],  # fmt: skip
    "heart": _heart(),
}


@dataclass(frozen=True)
class Obj:
    """One shape: centre (x, y) and radius r as fractions of the image side; angle in degrees."""

    shape: str
    colour: str
    x: float
    y: float
    r: float
    angle: float = 0.0
    rgb: tuple[int, int, int] | None = None  # jittered colour; None = the named colour
    outline: bool = False  # drawn as a line, not filled (the "rendition" style)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self, margin: float = 1.35) -> tuple[float, float, float, float]:
        m = self.r * margin
        return (max(0.0, self.x - m), max(0.0, self.y - m), min(1.0, self.x + m), min(1.0, self.y + m))


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (240, 240, 240)


def jitter_colour(colour: str, rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-amount, amount + 1, 3), 0, 255))


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    level = int(rng.integers(226, 251))
    return tuple(int(np.clip(level + rng.integers(-4, 5), 0, 255)) for _ in range(3))


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.r * side
    fill = obj.rgb or COLOURS[obj.colour]
    line = max(2, round(0.22 * r)) if obj.outline else 0
    if obj.shape in ("circle", "ring"):
        rr = 0.92 * r
        box = (cx - rr, cy - rr, cx + rr, cy + rr)
        if obj.shape == "ring" or obj.outline:
            width = round(0.4 * rr) if obj.shape == "ring" and not obj.outline else line
            draw.ellipse(box, outline=fill, width=max(1, width))
            if obj.shape == "ring" and obj.outline:  # a ring's rendition: two thin circles
                inner = 0.5 * rr
                draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), outline=fill, width=line)
        else:
            draw.ellipse(box, fill=fill)
        return
    a = math.radians(obj.angle)
    cos, sin = math.cos(a), math.sin(a)
    points = [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)) for u, v in _OUTLINES[obj.shape]]
    if obj.outline:
        draw.line(points + points[:1], fill=fill, width=line, joint="curve")
    else:
        draw.polygon(points, fill=fill)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of size x size pixels."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, side)
    return image.reduce(SUPERSAMPLE)  # a box filter, fast


def render_crop(scene: Scene, obj: Obj, size: int) -> Image.Image:
    """The square region around one object of the scene, resized to size x size (grounding targets)."""
    big = render(scene, size * 2)
    x0, y0, x1, y1 = obj.box()
    half = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    box = [round(v * size * 2) for v in (cx - half, cy - half, cx + half, cy + half)]
    return big.crop(box).resize((size, size), Image.Resampling.BOX)


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)

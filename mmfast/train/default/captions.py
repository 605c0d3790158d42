"""The default world's language and its scenes: what each picture shows and how it is said.

A single-object picture is identified by (shape, colour, quadrant): 8 x 8 x 4 = 256 distinct pictures,
every caption naming all three, in paraphrases that vary the sentence and the position words
("top left" / "upper left"). Scenes of several objects (counts, two shapes in a relation) feed VQA,
grounding, the compositional set and the NLI triplets."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from mmfast.train.default.render import COLOURS, SHAPES, Obj, Scene, background, jitter_colour

COLOUR_NAMES = tuple(COLOURS)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
_QUADRANT_CENTRES = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
NUMBERS = ("one", "two", "three", "four")
RELATIONS = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
_VERTICAL = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}

# The MMEB instructions, as in MMEB-train and MMEB-eval.
CLASSIFY = "<|image_1|>\nRepresent the given image for classification\n"
ASK = "<|image_1|>\nRepresent the given image with the following question: {}\n"
FIND_IMAGE = "Find me an everyday image that matches the given caption: {}\n"
IMAGE = "<|image_1|>\nRepresent the given image.\n"
FIND_CAPTION = "<|image_1|>\nFind an image caption describing the given everyday image.\n"
GROUND = '<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{}"\n'
REFER = '<|image_1|>\nSelect the portion of the image that follows the language expression: "{}"\n'
CROP = "<|image_1|>\nRepresent the given cropped image of the object\n"
EDIT = "<|image_1|>\nFind an image to match the given image and the change: {}\n"

SINGLE_TEMPLATES = (
    "a {c} {s} in the {p} corner",
    "a {c} {s} in the {p}",
    "there is a {c} {s} at the {p}",
    "a {s}, coloured {c}, in the {p} corner",
    "{p}: a {c} {s}",
    "the {p} of the picture shows a {c} {s}",
    "one {c} {s} placed {p}",
    "a single {c} {s}, {p}",
)


@dataclass(frozen=True)
class Single:
    """What a single-object picture shows: the identity of the 256 pictures."""

    shape: str
    colour: str
    quadrant: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


ALL_SINGLES = tuple(Single(s, c, q) for s in SHAPES for c in COLOUR_NAMES for q in QUADRANTS)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") else "s")


def articles(text: str) -> str:
    """English articles: "a orange" -> "an orange"."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def count_phrase(count: int, colour: str, shape: str) -> str:
    return f"{NUMBERS[count - 1]} {colour} {shape if count == 1 else plural(shape)}"


def position_words(quadrant: str, rng: np.random.Generator) -> str:
    vertical, horizontal = quadrant.split()
    return f"{_VERTICAL[vertical][int(rng.integers(2))]} {horizontal}"


def position_variants(quadrant: str) -> tuple[str, ...]:
    """Every wording of a quadrant ("top left", "upper left")."""
    vertical, horizontal = quadrant.split()
    return tuple(f"{word} {horizontal}" for word in _VERTICAL[vertical])


def single_caption(single: Single, rng: np.random.Generator, template: int | None = None) -> str:
    index = int(rng.integers(len(SINGLE_TEMPLATES))) if template is None else template
    return articles(
        SINGLE_TEMPLATES[index].format(c=single.colour, s=single.shape, p=position_words(single.quadrant, rng))
    )


def near_misses(single: Single) -> list[Single]:
    """Every picture that differs from this one in exactly one attribute (7 + 7 + 3 = 17)."""
    return (
        [replace(single, colour=c) for c in COLOUR_NAMES if c != single.colour]
        + [replace(single, shape=s) for s in SHAPES if s != single.shape]
        + [replace(single, quadrant=q) for q in QUADRANTS if q != single.quadrant]
    )


def label_miss(single: Single, rng: np.random.Generator) -> str:
    """Another class label (colour shape) sharing the shape or the colour."""
    options = [m.label for m in near_misses(single) if m.label != single.label]
    return options[int(rng.integers(len(options)))]


def ranked_misses(single: Single, rng: np.random.Generator) -> list[Single]:
    """Every other picture, the near misses first (shuffled), then the rest (shuffled)."""
    near = near_misses(single)
    taken = {single, *near}
    rest = [s for s in ALL_SINGLES if s not in taken]
    return [near[i] for i in rng.permutation(len(near))] + [rest[i] for i in rng.permutation(len(rest))]


def near_miss(single: Single, rng: np.random.Generator) -> Single:
    options = near_misses(single)
    return options[int(rng.integers(len(options)))]


def another(value: str, options: tuple[str, ...], rng: np.random.Generator) -> str:
    """A uniformly drawn option other than `value`."""
    return options[(options.index(value) + int(rng.integers(1, len(options)))) % len(options)]


def random_single(rng: np.random.Generator) -> Single:
    return ALL_SINGLES[int(rng.integers(len(ALL_SINGLES)))]


def distinct_singles(n: int, rng: np.random.Generator) -> list[Single]:
    if n > len(ALL_SINGLES):
        raise ValueError(f"the default world has {len(ALL_SINGLES)} distinct single-object pictures, {n} asked")
    return [ALL_SINGLES[i] for i in rng.choice(len(ALL_SINGLES), n, replace=False)]


def _obj(shape: str, colour: str, x: float, y: float, r: float, rng: np.random.Generator, **kw) -> Obj:
    return Obj(shape, colour, x, y, r, float(rng.uniform(-12, 12)), jitter_colour(colour, rng), **kw)


def single_scene(single: Single, rng: np.random.Generator, *, outline: bool = False, anywhere: bool = False) -> Scene:
    """One big shape in its quadrant (or, `anywhere`, centred at random and larger)."""
    if anywhere:
        x, y, r = *rng.uniform(0.3, 0.7, 2), float(rng.uniform(0.2, 0.28))
    else:
        cx, cy = _QUADRANT_CENTRES[single.quadrant]
        x, y, r = (
            cx + float(rng.uniform(-0.04, 0.04)),
            cy + float(rng.uniform(-0.04, 0.04)),
            float(rng.uniform(0.17, 0.22)),
        )
    return Scene((_obj(single.shape, single.colour, float(x), float(y), r, rng, outline=outline),), background(rng))


def _spread(n: int, low: float, high: float, gap: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """n centres in [low, high]^2 at least `gap` apart (starting over when a layout jams)."""
    while True:
        centres: list[tuple[float, float]] = []
        for _ in range(200):
            x, y = (float(v) for v in rng.uniform(low, high, 2))
            if all((x - a) ** 2 + (y - b) ** 2 > gap**2 for a, b in centres):
                centres.append((x, y))
                if len(centres) == n:
                    return centres


def count_scene(shape: str, colour: str, count: int, rng: np.random.Generator) -> Scene:
    """`count` equal small shapes that do not touch."""
    centres = _spread(count, 0.16, 0.84, 0.29, rng)
    return Scene(
        tuple(_obj(shape, colour, x, y, float(rng.uniform(0.11, 0.13)), rng) for x, y in centres), background(rng)
    )


def two_labels(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two (shape, colour) pairs differing in both shape and colour (so each names one object)."""
    s1, s2 = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    c1, c2 = (COLOUR_NAMES[i] for i in rng.choice(len(COLOUR_NAMES), 2, replace=False))
    return (s1, c1), (s2, c2)


def relation_scene(first: tuple[str, str], relation: str, second: tuple[str, str], rng: np.random.Generator) -> Scene:
    """`first` <relation> `second`, e.g. a red circle to the left of a blue square."""
    a, b = float(rng.uniform(0.25, 0.3)), float(rng.uniform(0.7, 0.75))
    across = [float(v) for v in rng.uniform(0.35, 0.65, 2)]
    place = {
        "to the left of": ((a, across[0]), (b, across[1])),
        "to the right of": ((b, across[0]), (a, across[1])),
        "above": ((across[0], a), (across[1], b)),
        "below": ((across[0], b), (across[1], a)),
    }[relation]
    objects = tuple(
        _obj(s, c, x, y, float(rng.uniform(0.15, 0.18)), rng)
        for (s, c), (x, y) in zip((first, second), place, strict=True)
    )
    return Scene(objects, background(rng))


def relation_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    return articles(f"a {first[1]} {first[0]} {relation} a {second[1]} {second[0]}")


def random_relation(rng: np.random.Generator) -> str:
    return tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]


def scattered_scene(labels: list[tuple[str, str]], rng: np.random.Generator) -> Scene:
    """Several distinct objects (shape, colour) apart from each other (grounding scenes)."""
    centres = _spread(len(labels), 0.2, 0.8, 0.36, rng)
    objects = (
        _obj(s, c, x, y, float(rng.uniform(0.14, 0.17)), rng) for (s, c), (x, y) in zip(labels, centres, strict=True)
    )
    return Scene(tuple(objects), background(rng))


def question(rng: np.random.Generator) -> tuple[Scene, str, str, str]:
    """A VQA item: (scene, question, answer, answer kind); kinds: colour, shape, position, number."""
    kind = int(rng.integers(6))
    if kind < 3:
        single = random_single(rng)
        scene = single_scene(single, rng)
        if kind == 0:
            return scene, f"What colour is the {single.shape}?", single.colour, "colour"
        if kind == 1:
            return scene, f"What shape is the {single.colour} object?", single.shape, "shape"
        return scene, f"Where is the {single.label}?", single.quadrant, "position"
    if kind == 3:
        shape, colour, count = SHAPES[int(rng.integers(8))], COLOUR_NAMES[int(rng.integers(8))], int(rng.integers(1, 5))
        scene = count_scene(shape, colour, count, rng)
        return scene, f"How many {plural(shape)} are there?", NUMBERS[count - 1], "number"
    first, second = two_labels(rng)
    scene = relation_scene(first, random_relation(rng), second, rng)
    asked, other = (first, second) if rng.integers(2) else (second, first)
    if kind == 4:
        return scene, f"What colour is the {asked[0]} next to the {other[0]}?", asked[1], "colour"
    return scene, f"Which shape is {asked[1]}?", asked[0], "shape"


def relational_question(rng: np.random.Generator) -> tuple[Scene, str, str, str]:
    """A GQA-style item: what is in a relation to a named object."""
    first, second = two_labels(rng)
    relation = random_relation(rng)
    scene = relation_scene(first, relation, second, rng)
    if rng.integers(2):
        return scene, f"What shape is {relation} the {second[1]} {second[0]}?", first[0], "shape"
    return scene, f"What colour is the shape {relation} the {second[1]} {second[0]}?", first[1], "colour"


ANSWERS = {"colour": COLOUR_NAMES, "shape": SHAPES, "position": QUADRANTS, "number": NUMBERS}

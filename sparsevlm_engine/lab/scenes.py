"""Seeded synthetic scenes of coloured shapes, with single-word visual questions about them.

Every example is a pure function of (split, index): the scene, the question and the rendered
image are the same on every run and machine.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 384
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 170, 50),
    "blue": (30, 70, 235),
    "yellow": (245, 215, 0),
    "purple": (145, 40, 190),
    "orange": (255, 130, 0),
}
SHAPES = ("circle", "square", "star", "cross")

SMALL_RADIUS = (20, 28)
LARGE_RADIUS = (34, 46)
MIN_OBJECTS, MAX_OBJECTS = 3, 8
SPACING = 0.75  # centres at least SPACING * (r1 + r2) apart
EDGE_GAP = 2  # extra pixels between an object's extent and the image border
PLACEMENT_TRIES = 200

SQUARE_HALF_SIDE = 0.85
STAR_INNER = 0.45
CROSS_HALF_WIDTH = 0.3

RELATION_MIN_OFFSET = 40
RELATION_DOMINANCE = 2
COUNT_PRESENT_SHARE = 0.75  # count questions ask about a colour in the scene this often

KINDS = ("colour", "shape", "count", "exists", "relation")
ANSWERS = (
    *COLOURS,
    *SHAPES,
    *(str(n) for n in range(MAX_OBJECTS + 1)),
    "yes",
    "no",
    "left",
    "right",
    "above",
    "below",
)

SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 100_000, "validation": 200, "test": 1000}


@dataclass(frozen=True)
class SceneObject:
    """One filled shape: its centre and radius are in pixels."""

    shape: str
    colour: str
    cx: int
    cy: int
    radius: int


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order; later ones are drawn on top."""

    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 384x384 RGB image on a white background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return image


def label_map(scene: Scene) -> Image.Image:
    """A 384x384 "L" image: 0 on the background, i + 1 where object i is the visible one."""
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        _draw_object(draw, obj, fill=i + 1)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill=None) -> None:
    fill = COLOURS[obj.colour] if fill is None else fill
    x, y, r = obj.cx, obj.cy, obj.radius
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        h = SQUARE_HALF_SIDE * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif obj.shape == "star":
        points = []
        for i in range(10):
            angle = -math.pi / 2 + i * math.pi / 5
            length = r if i % 2 == 0 else STAR_INNER * r
            points.append((x + length * math.cos(angle), y + length * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif obj.shape == "cross":
        w = CROSS_HALF_WIDTH * r
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def make_scene(rng: random.Random) -> Scene:
    """Draw 3 to 8 random objects, spaced so that each stays recognisable."""
    while True:
        scene = _try_scene(rng)
        if scene is not None:
            return scene


def _try_scene(rng: random.Random) -> Scene | None:
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    objects: list[SceneObject] = []
    for _ in range(count):
        shape = rng.choice(SHAPES)
        colour = rng.choice(tuple(COLOURS))
        low, high = SMALL_RADIUS if rng.random() < 0.5 else LARGE_RADIUS
        radius = rng.randint(low, high)
        margin = radius + EDGE_GAP
        for _ in range(PLACEMENT_TRIES):
            cx = rng.randint(margin, IMAGE_SIZE - 1 - margin)
            cy = rng.randint(margin, IMAGE_SIZE - 1 - margin)
            if all(
                math.hypot(cx - o.cx, cy - o.cy) >= SPACING * (radius + o.radius) for o in objects
            ):
                objects.append(SceneObject(shape, colour, cx, cy, radius))
                break
        else:
            return None
    return Scene(tuple(objects))


def ask(scene: Scene, rng: random.Random, kind: str) -> Question | None:
    """A random question of `kind` about the scene, or None when the scene cannot support one."""
    try:
        asker = _ASKERS[kind]
    except KeyError:
        raise ValueError(f"unknown question kind {kind!r}") from None
    return asker(scene, rng)


def questions_for_scene(
    scene: Scene, rng: random.Random, kinds: tuple[str, ...] = KINDS
) -> list[Question]:
    """One question for each kind in `kinds` that the scene supports."""
    questions = []
    for kind in kinds:
        question = ask(scene, rng, kind)
        if question is not None:
            questions.append(question)
    return questions


def _ask_colour(scene: Scene, rng: random.Random) -> Question | None:
    shapes = [obj.shape for obj in scene.objects]
    unique = [obj for obj in scene.objects if shapes.count(obj.shape) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return Question("colour", f"What colour is the {obj.shape}?", obj.colour)


def _ask_shape(scene: Scene, rng: random.Random) -> Question | None:
    colours = [obj.colour for obj in scene.objects]
    unique = [obj for obj in scene.objects if colours.count(obj.colour) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return Question("shape", f"What shape is the {obj.colour} object?", obj.shape)


def _ask_count(scene: Scene, rng: random.Random) -> Question:
    # Mostly ask about colours in the scene: uniform colours would make 0 the commonest answer.
    if rng.random() < COUNT_PRESENT_SHARE:
        colour = rng.choice(scene.objects).colour
    else:
        colour = rng.choice(tuple(COLOURS))
    count = sum(obj.colour == colour for obj in scene.objects)
    return Question("count", f"How many {colour} objects are there?", str(count))


def _ask_exists(scene: Scene, rng: random.Random) -> Question:
    present = sorted({(obj.colour, obj.shape) for obj in scene.objects})
    if rng.random() < 0.5:
        colour, shape = rng.choice(present)
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = rng.choice(absent)
        answer = "no"
    return Question("exists", f"Is there a {colour} {shape}?", answer)


def _ask_relation(scene: Scene, rng: random.Random) -> Question | None:
    keys = [(obj.colour, obj.shape) for obj in scene.objects]
    unique = [obj for obj in scene.objects if keys.count((obj.colour, obj.shape)) == 1]
    pairs = [(a, b) for a in unique for b in unique if a is not b]
    rng.shuffle(pairs)
    for first, second in pairs:
        answer = _relation(first, second)
        if answer is not None:
            text = (
                f"Where is the {first.colour} {first.shape} "
                f"relative to the {second.colour} {second.shape}?"
            )
            return Question("relation", text, answer)
    return None


def _relation(first: SceneObject, second: SceneObject) -> str | None:
    """Where `first` lies from `second` along a clearly dominant axis, or None."""
    dx, dy = first.cx - second.cx, first.cy - second.cy
    if abs(dx) >= RELATION_MIN_OFFSET and abs(dx) >= RELATION_DOMINANCE * abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) >= RELATION_MIN_OFFSET and abs(dy) >= RELATION_DOMINANCE * abs(dx):
        return "below" if dy > 0 else "above"  # image y grows downward
    return None


_ASKERS = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "exists": _ask_exists,
    "relation": _ask_relation,
}


@dataclass(frozen=True)
class Example:
    """One scene and one question about it, at a fixed place in a split."""

    split: str
    index: int
    scene: Scene
    question: Question

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


def example(split: str, index: int) -> Example:
    """The example at `index` of `split`; the same on every call and run."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    # train is unbounded in practice; its size is only the nominal epoch length
    if index < 0 or (split != "train" and index >= SPLIT_SIZES[split]):
        raise IndexError(f"{split} index {index} out of range")
    rng = random.Random(f"{split}:{index}")
    kind = KINDS[index % len(KINDS)]
    while True:
        scene = make_scene(rng)
        question = ask(scene, rng, kind)
        if question is not None:
            return Example(split, index, scene, question)


def examples(split: str, start: int = 0, count: int | None = None) -> list[Example]:
    """`count` consecutive examples from `start`; by default to the end of the split."""
    if count is None:
        count = SPLIT_SIZES[split] - start
    return [example(split, index) for index in range(start, start + count)]

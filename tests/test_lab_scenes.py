"""The synthetic scene-VQA generator: determinism, answer correctness, balance and rendering.

Answers are recomputed here from the scene objects and the question text, independently of the
generator's own answer logic.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from sparsevlm_engine.lab import scenes
from sparsevlm_engine.lab.scenes import (
    ANSWERS,
    COLOURS,
    IMAGE_SIZE,
    KINDS,
    SHAPES,
    SPLIT_SIZES,
    example,
    examples,
    make_scene,
    questions_for_scene,
    render,
)

N_CHECKED = 1000  # 200 of each kind

# Radius of the circle around the centre that contains each drawn shape, per unit radius.
BOUNDING = {
    "circle": 1.0,
    "square": 0.85 * math.sqrt(2),
    "star": 1.0,
    "cross": math.hypot(1.0, 0.3),
}


@pytest.fixture(scope="module")
def checked():
    return examples("train", 0, N_CHECKED)


def _objects_with(scene, colour=None, shape=None):
    return [
        o
        for o in scene.objects
        if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
    ]


def _only(scene, colour=None, shape=None):
    found = _objects_with(scene, colour, shape)
    assert len(found) == 1, (colour, shape, scene)
    return found[0]


def _expected_answer(ex):
    """Answer the question from its text and the scene's objects alone."""
    scene, text = ex.scene, ex.question.text
    if m := re.fullmatch(r"What colour is the (\w+)\?", text):
        return _only(scene, shape=m[1]).colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        return _only(scene, colour=m[1]).shape
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        assert m[1] in COLOURS
        return str(len(_objects_with(scene, colour=m[1])))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", text):
        assert m[1] in COLOURS and m[2] in SHAPES
        return "yes" if _objects_with(scene, m[1], m[2]) else "no"
    if m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", text):
        a = _only(scene, m[1], m[2])
        b = _only(scene, m[3], m[4])
        dx, dy = a.cx - b.cx, a.cy - b.cy
        horizontal = abs(dx) > abs(dy)
        major, minor = (dx, dy) if horizontal else (dy, dx)
        assert abs(major) >= 40 and abs(major) >= 2 * abs(minor), (dx, dy)
        if horizontal:
            return "right" if dx > 0 else "left"
        return "below" if dy > 0 else "above"
    raise AssertionError(f"unrecognised question {text!r}")


def test_same_split_and_index_is_deterministic():
    for split, index in [("train", 0), ("train", 12345), ("validation", 7), ("test", SPLIT_SIZES["test"] - 1)]:
        a, b = example(split, index), example(split, index)
        assert a == b
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_splits_and_indices_differ():
    scenes_by_split = {split: [example(split, i).scene for i in range(20)] for split in scenes.SPLITS}
    for i in range(20):
        assert len({scenes_by_split[s][i] for s in scenes.SPLITS}) == 3
    assert len(set(scenes_by_split["train"])) == 20


def test_answers_match_the_scene(checked):
    kinds = Counter()
    for ex in checked:
        kinds[ex.question.kind] += 1
        assert ex.question.answer == _expected_answer(ex), ex
    assert all(kinds[k] >= 150 for k in KINDS), kinds


def test_answers_are_in_the_vocabulary(checked):
    assert len(ANSWERS) == len(set(ANSWERS)) == 6 + 4 + 9 + 2 + 4
    seen = {ex.question.answer for ex in checked}
    assert seen <= set(ANSWERS)
    # every answer word is reachable, so the closed vocabulary is not oversized
    assert set(ANSWERS) - seen <= {"4", "5", "6", "7", "8"}  # high counts are rare


def test_kinds_are_balanced(checked):
    counts = Counter(ex.question.kind for ex in checked)
    assert counts == {kind: N_CHECKED // len(KINDS) for kind in KINDS}
    for ex in checked:
        assert ex.question.kind == KINDS[ex.index % len(KINDS)]


def test_yes_no_balanced(checked):
    answers = Counter(ex.question.answer for ex in checked if ex.question.kind == "exists")
    assert set(answers) == {"yes", "no"}
    total = sum(answers.values())
    assert total == 200
    assert 0.4 <= answers["yes"] / total <= 0.6, answers


def test_counts_not_dominated_by_zero(checked):
    answers = Counter(ex.question.answer for ex in checked if ex.question.kind == "count")
    total = sum(answers.values())
    assert answers["0"] > 0
    assert answers["0"] / total < 0.25, answers
    assert answers.most_common(1)[0][0] != "0"


def test_relation_answers_cover_all_directions(checked):
    answers = Counter(ex.question.answer for ex in checked if ex.question.kind == "relation")
    assert set(answers) == {"left", "right", "above", "below"}


def test_scene_layout():
    rng = random.Random(0)
    sizes = Counter()
    for _ in range(500):
        scene = make_scene(rng)
        objs = scene.objects
        sizes[len(objs)] += 1
        for o in objs:
            assert o.shape in SHAPES and o.colour in COLOURS
            assert 20 <= o.radius <= 28 or 34 <= o.radius <= 46
            assert o.cx - o.radius >= 0 and o.cx + o.radius <= IMAGE_SIZE - 1
            assert o.cy - o.radius >= 0 and o.cy + o.radius <= IMAGE_SIZE - 1
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= 0.75 * (a.radius + b.radius)
    assert set(sizes) == set(range(3, 9)), sizes


def _covered_by_later(objs, i, x, y):
    """Whether (x, y) may be painted by an object drawn after objs[i] (i = -1: by any object)."""
    return any(
        math.hypot(x - o.cx, y - o.cy) <= BOUNDING[o.shape] * o.radius + 1.5 for o in objs[i + 1 :]
    )


def test_rendering():
    rng = random.Random(1)
    checked_centres = Counter()
    for _ in range(150):
        scene = make_scene(rng)
        image = render(scene)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        pixels = np.asarray(image)
        objs = scene.objects
        for i, o in enumerate(objs):
            if not _covered_by_later(objs, i, o.cx, o.cy):
                assert tuple(pixels[o.cy, o.cx]) == COLOURS[o.colour], o
                checked_centres[o.shape] += 1
        for x, y in [(0, 0), (0, IMAGE_SIZE - 1), (IMAGE_SIZE - 1, 0), (IMAGE_SIZE - 1, IMAGE_SIZE - 1)]:
            if not _covered_by_later(objs, -1, x, y):
                assert tuple(pixels[y, x]) == (255, 255, 255)
    assert all(checked_centres[s] > 50 for s in SHAPES), checked_centres


def test_shapes_render_distinctly():
    """A lone object of each shape covers a different share of its bounding box."""
    coverage = {}
    for shape in SHAPES:
        obj = scenes.SceneObject(shape, "red", 192, 192, 40)
        pixels = np.asarray(render(scenes.Scene((obj,))))
        box = pixels[152:233, 152:233]
        coverage[shape] = np.all(box == COLOURS["red"], axis=-1).mean()
        assert np.all(pixels[0:140] == 255)  # nothing drawn far from the object
    # shares of the 2r x 2r box: areas r^2 * (pi, 4 * 0.85^2, 2.4 - 0.36, 5 * 0.45 * sin 36deg) / 4
    assert coverage["circle"] == pytest.approx(math.pi / 4, abs=0.03)
    assert coverage["square"] == pytest.approx(0.85**2, abs=0.03)
    assert coverage["cross"] == pytest.approx(2.04 / 4, abs=0.03)
    assert coverage["star"] == pytest.approx(5 * 0.45 * math.sin(math.radians(36)) / 4, abs=0.03)


def test_questions_for_scene():
    rng = random.Random(2)
    for _ in range(50):
        scene = make_scene(rng)
        questions = questions_for_scene(scene, rng)
        kinds = [q.kind for q in questions]
        assert len(kinds) == len(set(kinds))
        assert {"count", "exists"} <= set(kinds)  # always possible
        for q in questions:
            ex = scenes.Example("train", 0, scene, q)
            assert q.answer == _expected_answer(ex)
    assert questions_for_scene(scene, rng, kinds=("count",))[0].kind == "count"


def test_index_range():
    for split in ("validation", "test"):
        size = SPLIT_SIZES[split]
        assert example(split, size - 1).index == size - 1
        with pytest.raises(IndexError):
            example(split, size)
        with pytest.raises(IndexError):
            example(split, -1)
    assert example("train", SPLIT_SIZES["train"] + 3).split == "train"
    assert len(examples("validation", SPLIT_SIZES["validation"] - 5)) == 5
    assert [e.index for e in examples("test", 10, 3)] == [10, 11, 12]

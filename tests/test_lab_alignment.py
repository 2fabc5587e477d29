"""Patch alignment targets of the lab VLM's projector."""
import torch

from sparsevlm_engine.lab.alignment import (alignment_loss, patch_labels, place_positions, position_alignment_loss,
                                            position_axes, position_coordinates, word_targets)
from sparsevlm_engine.lab.language import answer_token
from sparsevlm_engine.lab.scenes import Scene, SceneObject, example


def test_patch_labels_name_the_object_covering_each_patch():
    scene = Scene((SceneObject("square", "red", 100, 100, 40), SceneObject("circle", "blue", 120, 100, 30)))
    labels = patch_labels(scene, 24).view(24, 24)
    assert labels[6, 4] == 0  # x 64..79, y 96..111: only the square
    assert labels[6, 7] == 1  # x 112..127: the circle, drawn on top of the square
    assert labels[0, 0] == -1 and labels[23, 23] == -1
    assert (labels >= 0).sum() < 0.2 * 576


def test_every_object_of_a_test_scene_is_named_somewhere():
    for index in range(10):
        scene = example("test", index).scene
        labels = patch_labels(scene, 24)
        for i, obj in enumerate(scene.objects):
            if obj.shape != "cross":  # thin arms may cover no patch by a quarter
                assert (labels == i).any(), (index, obj)


def test_word_targets_and_loss():
    scene = Scene((SceneObject("star", "green", 50, 50, 30),))
    embeddings = torch.randn(49152, 8)
    labels = torch.tensor([-1, 0, 0])
    targets = word_targets(embeddings, scene, labels)
    expected = embeddings[answer_token("green")] + embeddings[answer_token("star")]
    torch.testing.assert_close(targets[1], expected)
    torch.testing.assert_close(targets[0], embeddings[answer_token("white")])
    assert alignment_loss(targets * 3.0, targets, labels) < 1e-6
    assert alignment_loss(-targets, targets, labels) > 2.0


def test_position_axes_run_from_the_first_word_to_the_last_and_are_orthogonal():
    embeddings = torch.randn(49152, 16)
    axes = position_axes(embeddings)
    torch.testing.assert_close(axes["rows"], embeddings[answer_token("below")] - embeddings[answer_token("above")])
    right = embeddings[answer_token("right")] - embeddings[answer_token("left")]
    assert abs(float(axes["cols"] @ axes["rows"])) < 1e-5 * float(axes["cols"].norm() * axes["rows"].norm())
    assert float(axes["cols"] @ right) > 0


def test_placed_positions_read_as_linear_coordinates_and_zero_the_loss():
    torch.manual_seed(0)
    embeddings = torch.randn(49152, 16)
    rows, cols = torch.randn(24, 16), torch.randn(24, 16)
    before = position_alignment_loss(rows, cols, embeddings, 3.0)
    assert before > 0.1
    axis = position_axes(embeddings)["cols"]
    free_part = cols - (cols @ axis)[:, None] * axis / axis.norm() ** 2  # what placing must leave alone
    place_positions(rows, cols, embeddings, 3.0)
    assert position_alignment_loss(rows, cols, embeddings, 3.0) < 1e-8
    for table, name in ((rows, "rows"), (cols, "cols")):
        along, target = position_coordinates(table, position_axes(embeddings)[name], 3.0)
        torch.testing.assert_close(along, target, atol=1e-5, rtol=0)
        assert target[0] == -3.0 and target[-1] == 3.0 and bool((target.diff() > 0).all())
    torch.testing.assert_close(cols - (cols @ axis)[:, None] * axis / axis.norm() ** 2, free_part, atol=1e-5, rtol=0)

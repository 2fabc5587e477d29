"""Patch alignment targets of the lab VLM's projector."""
import torch

from sparsevlm_engine.lab.alignment import alignment_loss, patch_labels, word_targets
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

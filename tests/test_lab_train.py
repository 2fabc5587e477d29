"""The lab VLM's training step and the weights it saves."""
import random

import pytest
import torch

from sparsevlm_engine.lab import lora
from sparsevlm_engine.lab.model import build_lab_vlm, encode, load_lab_vlm, save_lab_vlm
from sparsevlm_engine.lab.scenes import example, make_scene
from sparsevlm_engine.lab.train import image_loss, kind_counts, position_scale, resume, scene_questions


@pytest.fixture(scope="module")
def training():
    torch.manual_seed(0)
    model = build_lab_vlm()
    adapters = lora.attach(model.model.language_model, model.config.lora_targets, model.config.lora_rank,
                           model.config.lora_alpha)
    return model, adapters


def test_scene_questions_are_distinct_and_cover_the_kinds():
    scene = example("test", 3).scene
    questions = scene_questions(scene, random.Random(0), per_kind=3)
    texts = [q.text for q in questions]
    assert len(set(texts)) == len(texts)
    assert {"count", "exists"} <= {q.kind for q in questions}
    assert len(questions) > len(scene_questions(scene, random.Random(0), per_kind=1))


def test_extra_questions_weight_the_named_kinds():
    scene = example("test", 3).scene
    plain = scene_questions(scene, random.Random(0), per_kind=1)
    weighted = scene_questions(scene, random.Random(0), per_kind=1, extra={"relation": 3, "count": 2})
    def count(qs, kind):
        return sum(q.kind == kind for q in qs)
    assert count(weighted, "relation") > count(plain, "relation") and count(weighted, "count") > count(plain, "count")
    assert len({q.text for q in weighted}) == len(weighted)
    assert kind_counts("relation=2,count=1") == {"relation": 2, "count": 1}
    with pytest.raises(ValueError, match="'size=2' must be KIND=N"):
        kind_counts("size=2")


def test_one_step_reaches_the_projector_and_adapters(training):
    model, adapters = training
    scene = make_scene(random.Random(5))
    questions = scene_questions(scene, random.Random(5), per_kind=1)
    answer_loss, align_loss = image_loss(model, scene, questions, "cpu")
    assert torch.isfinite(answer_loss) and torch.isfinite(align_loss)
    (answer_loss + align_loss).backward()
    projector = model.model.projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(a.up.grad is not None and a.up.grad.abs().sum() > 0 for a in adapters.values())
    assert all(not p.requires_grad for p in model.model.vision.parameters())
    model.zero_grad(set_to_none=True)


def test_the_position_scale_is_a_share_of_the_object_tokens_norm(training):
    model, _ = training
    quarter, half = position_scale(model, 0.25, "cpu", scenes=1), position_scale(model, 0.5, "cpu", scenes=1)
    assert quarter > 0
    assert abs(half - 2 * quarter) < 1e-6 * half


def test_saved_weights_load_as_the_trained_model(training, tmp_path):
    model, adapters = training
    with torch.no_grad():  # trained-looking weights, exactly representable in the float16 file
        for a in adapters.values():
            a.up.normal_(std=0.02)
            a.up.copy_(a.up.half().float())
            a.down.copy_(a.down.half().float())
        for p in model.model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.02)
            p.copy_(p.half().float())
    path = tmp_path / "lab.pt"
    save_lab_vlm(model, adapters, path, {"images": 3})
    chosen = example("test", 0)
    batch = encode(model.config, [chosen.question.text], [chosen.image])
    with torch.no_grad():
        expected = model(batch.input_ids, pixel_values=batch.pixel_values)[0]
        loaded = load_lab_vlm(path)
        got = loaded(batch.input_ids, pixel_values=batch.pixel_values)[0]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    saved_up = {name: a.up.detach().clone() for name, a in adapters.items()}
    with torch.no_grad():
        for a in adapters.values():
            a.up.zero_()
    assert resume(model, adapters, path) == 3
    assert all(torch.equal(adapters[name].up, up) for name, up in saved_up.items())

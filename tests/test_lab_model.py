"""The lab VLM: adapters, batching, the engine on it, the text-agnostic baselines, and the
committed evaluation (a test-split subset re-run here must give the committed answers)."""
import json
from pathlib import Path

import pytest
import torch

import sparsevlm_engine as sve
from sparsevlm_engine.lab import lora
from sparsevlm_engine.lab.baselines import keep_for_average, layer_average, text_agnostic_pruning
from sparsevlm_engine.lab.evaluate import evaluate, summarise
from sparsevlm_engine.lab.model import encode, load_lab_vlm
from sparsevlm_engine.lab.report import results_table, targets, targets_table
from sparsevlm_engine.lab.scenes import example

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "accuracy_lab.json"


@pytest.fixture(scope="module")
def lab():
    return load_lab_vlm()


def _inputs(model, indices, questions=None):
    chosen = [example("test", i) for i in indices]
    texts = questions or [e.question.text for e in chosen]
    batch = encode(model.config, texts, [e.image for e in chosen])
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0][:, -1]


# ---------------------------------------------------------------- adapters and budgets

def _tiny_llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaModel(cfg).eval()


def test_merged_adapters_compute_what_the_parametrized_ones_did():
    trained, fresh = _tiny_llama(), _tiny_llama()
    targets_ = ("q_proj", "v_proj")
    adapters = lora.attach(trained, targets_, rank=4, alpha=8.0)
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = trained(ids).last_hidden_state
        plain = fresh(ids).last_hidden_state
    lora.merge(fresh, lora.adapter_state(adapters), targets_, 4, 8.0)
    with torch.no_grad():
        merged = fresh(ids).last_hidden_state
    assert not torch.allclose(plain, expected, atol=1e-3)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    lora.detach_merged(trained)
    with torch.no_grad():
        torch.testing.assert_close(trained(ids).last_hidden_state, expected, atol=1e-6, rtol=1e-6)


def test_adapters_that_do_not_fit_the_decoder_are_refused():
    model = _tiny_llama()
    state = lora.adapter_state(lora.attach(_tiny_llama(), ("q_proj",), 4, 8.0))
    with pytest.raises(ValueError, match="missing"):
        lora.merge(model, state, ("q_proj", "v_proj"), 4, 8.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora.merge(model, state, ("q_proj",), 2, 8.0)


@pytest.mark.parametrize("target", [64.0, 128.0, 150.3, 192.0])
def test_baseline_keep_matches_the_layer_average(target):
    keep = keep_for_average(target, 576, 2, 30)
    assert abs(layer_average(keep, 576, 2, 30) - target) <= 0.5 * 27 / 30
    assert keep_for_average(10.0, 576, 2, 30) == 1  # below the dense layers' share: the least possible


def test_summary_arithmetic():
    records = [{"kind": "colour", "answer_token": 1, "predictions": {
        "dense": {"token": t_dense, "equivalent_tokens": 576.0},
        "v1_5@64": {"token": t_sparse, "equivalent_tokens": 80.0}}}
        for t_dense, t_sparse in [(1, 1), (1, 2), (2, 2), (1, 1)]]
    rows = {r["method"]: r for r in summarise(records)}
    assert rows["dense"]["accuracy"] == 0.75 and rows["v1_5"]["accuracy"] == 0.5
    assert rows["v1_5"]["retained"] == pytest.approx(2 / 3) and rows["v1_5"]["agreement"] == 0.75
    assert rows["v1_5"]["budget"] == 64 and rows["v1_5"]["equivalent_tokens"] == 80.0


# ---------------------------------------------------------------- the model

def test_batch_rows_equal_single_runs(lab):
    inputs = _inputs(lab, [0, 4])  # questions of different lengths: the first row is left-padded
    assert (inputs["attention_mask"] == 0).any()
    batched = _logits(lab, inputs)
    for row, index in enumerate([0, 4]):
        torch.testing.assert_close(batched[row], _logits(lab, _inputs(lab, [index]))[0], atol=1e-4, rtol=1e-4)


def test_image_placeholders_must_match_the_images(lab):
    inputs = _inputs(lab, [0])
    inputs["input_ids"] = inputs["input_ids"][:, 5:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 5:]
    inputs["input_ids"][0, 0] = lab.config.image_token_id  # still one image, one placeholder too many
    with pytest.raises(ValueError, match="exactly 576 image placeholders"):
        _logits(lab, inputs)


def test_engine_prunes_the_lab_vlm_and_unsparsify_restores_it(lab):
    inputs = _inputs(lab, [1, 2])
    dense = _logits(lab, inputs)
    sve.sparsify(lab, sve.SparseVLMConfig.preset("v1.5", 64))
    try:
        sparse = _logits(lab, inputs)
        trace = sve.last_trace(lab)
    finally:
        sve.unsparsify(lab)
    assert trace.pruning_layers == (2, 6, 14)
    for sample in trace.samples:
        entering = sample.visual_entering
        assert entering[:3] == (576, 576, 576)
        assert entering[3] > entering[7] > entering[15] > 0 and entering[15] == entering[-1]
        assert sample.flops.reduction_paper > 0.5
    assert not torch.allclose(sparse, dense)
    assert torch.equal(_logits(lab, inputs), dense)


def test_sparse_generate_continues_its_own_prefill(lab):
    inputs = _inputs(lab, [3])
    sve.sparsify(lab, sve.SparseVLMConfig.preset("v2", 128))
    try:
        first = _logits(lab, inputs).argmax(-1)
        out = lab.generate(**inputs, max_new_tokens=4)
    finally:
        sve.unsparsify(lab)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt], inputs["input_ids"])
    assert out[0, prompt] == first[0]


# ---------------------------------------------------------------- baselines

def test_fastv_keeps_the_visual_tokens_the_last_token_attends_to_most(lab):
    inputs = _inputs(lab, [0, 4])
    text = lab.config.text_config
    captured = {}

    def keep_weights(module, args, output):
        captured["weights"] = output[1]

    hook = lab.model.language_model.layers[2].self_attn.register_forward_hook(keep_weights)
    previous, text._attn_implementation = text._attn_implementation, "eager"
    try:
        with text_agnostic_pruning(lab, "fastv", keep=40, layer=2) as kept:
            _logits(lab, inputs)
    finally:
        text._attn_implementation = previous
        hook.remove()
    visual = inputs["input_ids"] == lab.config.image_token_id
    scores = captured["weights"][:, :, -1, :].mean(1).masked_fill(~visual, -1.0)
    expected = torch.zeros_like(visual).scatter(-1, scores.topk(40, dim=-1).indices, True)
    assert torch.equal(kept[0], expected)


def test_baselines_keeping_everything_are_dense(lab):
    inputs = _inputs(lab, [0, 4])
    dense = _logits(lab, inputs)
    for method in ("fastv", "random"):
        with text_agnostic_pruning(lab, method, keep=576):
            torch.testing.assert_close(_logits(lab, inputs), dense, atol=1e-4, rtol=1e-4)
        with text_agnostic_pruning(lab, method, keep=8):
            assert not torch.allclose(_logits(lab, inputs), dense, atol=1e-3)


def test_random_baseline_is_seeded_and_keeps_only_visual_tokens(lab):
    inputs = _inputs(lab, [0, 4])
    visual = inputs["input_ids"] == lab.config.image_token_id
    masks = []
    for seed in (7, 7, 8):
        with text_agnostic_pruning(lab, "random", keep=50, seed=seed) as kept:
            _logits(lab, inputs)
        masks.append(kept[0])
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert (masks[0].sum(-1) == 50).all() and not (masks[0] & ~visual).any()


# ---------------------------------------------------------------- committed evaluation

def test_a_test_subset_reproduces_the_committed_answers(lab):
    committed = json.loads(RESULTS.read_text())
    assert committed["split"] == "test" and committed["examples"] == len(committed["records"])
    fresh = evaluate(lab, "test", 0, 5, budgets=(128, 64))
    for new, old in zip(fresh["records"], committed["records"]):
        assert new["index"] == old["index"] and new["answer"] == old["answer"]
        for key, prediction in new["predictions"].items():
            before = old["predictions"][key]
            assert prediction["equivalent_tokens"] == pytest.approx(before["equivalent_tokens"], abs=0.01)
            if before["margin"] > 1e-3:  # a near-tie may flip between CPUs
                assert prediction["token"] == before["token"], (new["index"], key)


def test_readme_figures_come_from_the_committed_json():
    committed = json.loads(RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    assert results_table(committed["summary"], committed["examples"]) in readme
    assert committed["targets"] == targets(committed["summary"])
    assert targets_table(committed["targets"]) in readme


def test_demo_answers_a_test_question_dense_and_sparse(lab, monkeypatch, tmp_path, capsys):
    from sparsevlm_engine import cli
    from sparsevlm_engine.lab import demo

    monkeypatch.setattr(demo, "load_lab_vlm", lambda: lab)
    code = cli.main(["demo", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "meaningless" not in out and "the lab VLM" in out
    chosen = example("test", demo.DEFAULT_INDEX)
    assert repr(chosen.question.text) in out and f"expected answer: {chosen.question.answer!r}" in out
    assert "dense output:" in out and "sparse output:" in out
    assert (tmp_path / cli.PNG_NAME).is_file()
    assert not sve.is_sparsified(lab)

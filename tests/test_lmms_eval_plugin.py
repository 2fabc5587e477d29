"""The lmms-eval plugin (sparsevlm_engine.models) run through lmms-eval's own CLI, offline, on a
tiny random-weight LLaVA-1.5-shaped checkpoint. The tests that need lmms-eval run in .venv-eval
(`bash run.sh test`); elsewhere they are skipped, and only the import check runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparsevlm_engine as sve

BUDGET = 64
MODEL_ARGS = f"preset=v1.5,budget={BUDGET}"


def test_core_never_imports_lmms_eval_and_plugin_names_its_install_command():
    """`import sparsevlm_engine` leaves lmms_eval alone; without lmms-eval the plugin package
    raises an ImportError whose one line names the install command."""
    code = ("import sys\nimport sparsevlm_engine\nassert 'lmms_eval' not in sys.modules\n"
            "sys.modules['lmms_eval'] = None  # as if not installed\n"
            "try:\n    import sparsevlm_engine.models\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["the sparsevlm_engine lmms-eval plugin needs lmms-eval: "
                                "pip install 'sparsevlm-engine[eval]'"]


@pytest.fixture(scope="module")
def lmms():
    return pytest.importorskip("lmms_eval", reason="the lmms-eval plugin tests run in .venv-eval (run.sh test)")


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory, lmms):
    from sparsevlm_engine.demo_model import save_demo_checkpoint

    path = tmp_path_factory.mktemp("llava") / "ckpt"
    save_demo_checkpoint(path, depth=4)  # 576 visual tokens, a 4-layer decoder
    return path


@pytest.mark.parametrize("plugins_env", [True, False], ids=["LMMS_EVAL_PLUGINS", "entry-point"])
def test_lmms_eval_finds_both_models_as_subclasses_of_its_own(lmms, plugins_env):
    """Through LMMS_EVAL_PLUGINS=sparsevlm_engine, and without it through the installed package's
    `lmms_eval.models` entry point."""
    code = ("from lmms_eval.models import get_model\n"
            "from lmms_eval.models.simple.llava_hf import LlavaHf\n"
            "from lmms_eval.models.simple.qwen2_vl import Qwen2_VL\n"
            "llava, qwen = get_model('sparsevlm_llava_hf'), get_model('sparsevlm_qwen2_vl')\n"
            "print(llava.__module__, issubclass(llava, LlavaHf), qwen.__module__, issubclass(qwen, Qwen2_VL))\n")
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}
    if plugins_env:
        env["LMMS_EVAL_PLUGINS"] = "sparsevlm_engine"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1].split() == ["sparsevlm_engine.models.sparsevlm_llava_hf", "True",
                                            "sparsevlm_engine.models.sparsevlm_qwen2_vl", "True"]


def plain_loop(checkpoint, images, config):
    """Per image: load-once, sparsify, one `generate` per prompt (the prompt llava_hf builds);
    (answers, the SparseVLM record of each prefill)."""
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from lmms_eval_probe import MAX_NEW_TOKENS, QUESTIONS
    from sparsevlm_engine.models.trace_log import sample_record

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    sve.sparsify(model, config)
    eos = processor.tokenizer.eos_token_id
    answers, records = [], []
    for path, question in zip(images, QUESTIONS):
        messages = [{"role": "user", "content": f"<image>\n{question}"}]
        text = processor.tokenizer.apply_chat_template(messages, chat_template=VICUNA_CHAT_TEMPLATE, tokenize=False,
                                                       add_generation_prompt=True)
        inputs = processor(images=[Image.open(path).convert("RGB")], text=[text], return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=eos,
                             eos_token_id=eos)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        records.append(sample_record(sve.last_trace(model)[0], batch_rows=1))
    return answers, records


def test_cli_batch_of_two_scores_and_logs_what_a_plain_loop_gets(tmp_path, llava_checkpoint):
    """lmms-eval's CLI at --batch_size 2 gives every sample the answer, score and SparseVLM
    record (equivalent visual tokens, FLOPs) of a plain per-sample loop over the same checkpoint."""
    from lmms_eval_probe import probe_images, read_outputs, run_lmms_eval, write_task

    images = probe_images(tmp_path)
    answers, records = plain_loop(llava_checkpoint, images, sve.SparseVLMConfig.v1_5(budget=BUDGET))
    # Even docs expect the plain loop's answer, odd docs an answer no model gives: 3 of 5 right.
    targets = [a.strip() if i % 2 == 0 else "<never>" for i, a in enumerate(answers)]
    task_dir = write_task(tmp_path, images, targets)
    done = run_lmms_eval(tmp_path, "sparsevlm_llava_hf", f"pretrained={llava_checkpoint},{MODEL_ARGS}", task_dir, 2)
    assert "Error during evaluation" not in done.stdout + done.stderr, done.stderr[-3000:]
    results, samples = read_outputs(tmp_path)

    assert [s["filtered_resps"] for s in samples] == [a.strip() for a in answers]  # llava_hf keeps the raw text
    assert [s["exact_match"] for s in samples] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert results["results"]["sparsevlm_probe"]["exact_match,none"] == pytest.approx(0.6)
    logged = [s["token_counts"][0]["sparsevlm"] for s in samples]
    assert sorted(r.pop("batch_rows") for r in logged) == [1, 2, 2, 2, 2]  # really batched
    for r in records:
        r.pop("batch_rows")
    assert logged == records
    assert all(r["equivalent_visual_tokens"] < 576 for r in logged)
    means = results["throughput"]
    assert means["avg_sparsevlm_equivalent_visual_tokens"] == pytest.approx(
        sum(r["equivalent_visual_tokens"] for r in records) / len(records))


def test_cli_bad_model_arg_fails_with_one_line_naming_it(tmp_path, llava_checkpoint):
    from lmms_eval_probe import probe_images, run_lmms_eval, write_task

    task_dir = write_task(tmp_path, probe_images(tmp_path), ["x"] * 5)
    done = run_lmms_eval(tmp_path, "sparsevlm_llava_hf", f"pretrained={llava_checkpoint},budget=abc", task_dir, 2)
    expected = "sparsevlm_llava_hf: model_arg budget='abc' (preset v1.5): budget must be an int, got 'abc'"
    assert done.stderr.strip().splitlines()[-1] == f"ValueError: {expected}"
    assert f"Error during evaluation: {expected}." in done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["sparsevlm_llava_hf", "sparsevlm_qwen2_vl"])
@pytest.mark.parametrize("args, message", [
    ({"budgett": 64}, "unknown model_arg 'budgett'; SparseVLM takes preset, budget, keep_fraction, positions, backend"),
    ({"preset": "v3"}, "model_arg preset='v3': choose from v1, v1.5, v2"),
    ({"preset": "v1", "keep_fraction": 0.25}, "model_arg keep_fraction=0.25 (preset v1): keep_fraction needs schedule"),
    ({"positions": "sorted"}, "model_arg positions='sorted': choose from renumber, original"),
])
def test_bad_model_args_are_refused_before_loading(lmms, model, args, message):
    import importlib

    from sparsevlm_engine.models import AVAILABLE_MODELS

    cls = getattr(importlib.import_module(f"sparsevlm_engine.models.{model}"), AVAILABLE_MODELS[model])
    with pytest.raises(ValueError) as info:
        cls(pretrained="/nonexistent", **args)
    assert str(info.value).startswith(f"{model}: {message}")
    assert "\n" not in str(info.value)


def test_qwen_without_qwen_vl_utils_names_what_to_install(lmms, monkeypatch):
    from lmms_eval.models.simple import qwen2_vl

    from sparsevlm_engine.models.sparsevlm_qwen2_vl import SparseVLMQwen2VL

    monkeypatch.setattr(qwen2_vl, "process_vision_info", None)
    with pytest.raises(ImportError, match="pip install qwen-vl-utils torchvision$"):
        SparseVLMQwen2VL(pretrained="/nonexistent", budget=64)


def images_only_vision_info(conversations):
    """qwen-vl-utils' process_vision_info for images given as data URLs, without torchvision."""
    import base64
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(base64.b64decode(part["image"].split("base64,", 1)[1]))).convert("RGB")
              for conversation in conversations for message in conversation if isinstance(message["content"], list)
              for part in message["content"] if part.get("type") == "image"]
    return images or None, None


def qwen_wrapper(batch_size: int):
    """A SparseVLMQwen2VL over a tiny Qwen2-VL, set up as Qwen2_VL.__init__ would (which needs
    torchvision for AutoProcessor here, so the loading is skipped)."""
    from lmms_eval.api.model import lmms as lmms_base

    from sparsevlm_engine.demo_qwen import build_demo_qwen
    from sparsevlm_engine.models.sparsevlm_qwen2_vl import SparseVLMQwen2VL

    model, processor = build_demo_qwen(depth=4)
    processor.tokenizer.padding_side = "left"
    lm = object.__new__(SparseVLMQwen2VL)
    lmms_base.__init__(lm)
    lm.__dict__.update(_model=sve.sparsify(model, sve.SparseVLMConfig.v1_5(budget=BUDGET)), processor=processor,
                       _tokenizer=processor.tokenizer, _device=torch.device("cpu"), device_map="cpu", _rank=0,
                       _world_size=1, batch_size_per_gpu=batch_size, use_cache=True, max_pixels=602112,
                       min_pixels=3136, max_num_frames=32, system_prompt="You are a helpful assistant.",
                       interleave_visuals=False, reasoning_prompt=None)
    return lm


def test_qwen_batches_pair_each_answer_with_its_own_prefill(lmms, monkeypatch, tmp_path):
    """lmms-eval's batched Qwen2_VL.generate_until under the plugin: with images of five sizes (so
    five visual token counts), batch 3 gives every request the answer and record it gets at batch 1."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.simple import qwen2_vl
    from PIL import Image

    from lmms_eval_probe import QUESTIONS, probe_images

    monkeypatch.setattr(qwen2_vl, "process_vision_info", images_only_vision_info)
    docs = [{"image": Image.open(p).convert("RGB")} for p in probe_images(tmp_path)]

    def run(batch_size):
        lm = qwen_wrapper(batch_size)
        lm.task_dict = {"probe": {"test": docs}}
        requests = [Instance("generate_until", (q, {"max_new_tokens": 3, "until": ["\n\n"]}, lambda d: [d["image"]],
                                                i, "probe", "test"), i, {"task": "probe", "doc_id": i, "repeats": 1})
                    for i, q in enumerate(QUESTIONS)]
        return [(r.text, r.token_counts.to_dict()["sparsevlm"]) for r in lm.generate_until(requests)]

    batched, alone = run(3), run(1)
    assert sorted(rec.pop("batch_rows") for _, rec in batched) == [2, 2, 3, 3, 3]
    for _, rec in alone:
        assert rec.pop("batch_rows") == 1
    assert batched == alone
    assert len({rec["visual_tokens"] for _, rec in alone}) == len(docs)  # rows cannot be swapped unnoticed

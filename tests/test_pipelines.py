"""transformers' `pipeline("image-text-to-text")` on a sparsified model: it prunes, and it answers
what the model's own generate answers on the processor's inputs."""
import pytest
import torch
from transformers import pipeline

import sparsevlm_engine as sve
from sparsevlm_engine.demo_model import build_demo_llava, build_demo_processor, draw_demo_image
from sparsevlm_engine.demo_qwen import build_demo_qwen

NEW_TOKENS = 5
GREEDY = {"max_new_tokens": NEW_TOKENS, "do_sample": False}


def _llava():
    model, tokenizer = build_demo_llava(depth=8)
    return model, build_demo_processor(tokenizer)


def _generated_text(model, processor, inputs) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_llava_pipeline_prunes_and_answers_as_generate():
    model, processor = _llava()
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(128))
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = draw_demo_image()
    prompt = "USER: <image>\nwhat colour is the square? ASSISTANT:"
    answer = pipe(images=image, text=prompt, generate_kwargs=GREEDY, return_full_text=False)[0]["generated_text"]
    trace = sve.last_trace(model)
    assert trace.samples[0].visual_entering[-1] < trace.samples[0].n_visual == 576
    expected = _generated_text(model, processor, processor(images=image, text=prompt, return_tensors="pt"))
    assert answer.strip() == expected and expected
    sve.unsparsify(model)
    dense = pipe(images=image, text=prompt, generate_kwargs=GREEDY, return_full_text=False)[0]["generated_text"]
    with pytest.raises(RuntimeError, match="not sparsified"):
        sve.last_trace(model)
    assert dense.strip() == _generated_text(model, processor, processor(images=image, text=prompt, return_tensors="pt"))


def test_llava_pipeline_batches_prompts():
    model, processor = _llava()
    processor.tokenizer.padding_side = "left"
    sve.sparsify(model, sve.SparseVLMConfig.v2(64))
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = draw_demo_image()
    prompts = ["USER: <image>\nwhat colour is the square? ASSISTANT:", "USER: <image>\nhow many shapes? ASSISTANT:"]
    batched = pipe(images=[image, image], text=prompts, batch_size=2, generate_kwargs=GREEDY, return_full_text=False)
    assert len(sve.last_trace(model).samples) == 2  # one prefill of both prompts
    for prompt, out in zip(prompts, batched):
        out = out[0] if isinstance(out, list) else out  # one answer per prompt, listed or not by version
        single = _generated_text(model, processor, processor(images=image, text=prompt, return_tensors="pt"))
        assert out["generated_text"].strip() == single


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_pipeline_with_chat_messages_prunes_and_answers_as_generate(family):
    model, processor = build_demo_qwen(family, depth=8)
    sve.sparsify(model, sve.SparseVLMConfig.v1_5(64))
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = draw_demo_image()
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what colour is the square?"}]}]
    out = pipe(text=messages, generate_kwargs=GREEDY, return_full_text=False)[0]["generated_text"]
    trace = sve.last_trace(model)
    assert trace.samples[0].visual_entering[-1] < trace.samples[0].n_visual
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = _generated_text(model, processor, processor(images=[image], text=[text], return_tensors="pt"))
    assert out.strip() == expected and expected

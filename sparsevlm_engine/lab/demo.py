"""The `sparsevlm demo` default: the trained lab VLM answering a scene-VQA test question."""
from __future__ import annotations

from .model import encode, load_lab_vlm
from .scenes import SPLIT_SIZES, example

DEFAULT_INDEX = 14  # a relation question (two objects and where they are) that dense and v1.5 @ 128 answer right


def lab_demo_setup(index: int | None, question: str | None):
    """(model, tokenizer, image, inputs, header, expected answer or None) for test example `index`."""
    from .language import load_tokenizer

    index = DEFAULT_INDEX if index is None else index
    if not 0 <= index < SPLIT_SIZES["test"]:
        raise ValueError(f"--index must be in 0..{SPLIT_SIZES['test'] - 1} (the test split), got {index}")
    chosen = example("test", index)
    image = chosen.image
    text = chosen.question.text if question is None else question
    model = load_lab_vlm()
    batch = encode(model.config, [text], [image])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "pixel_values": batch.pixel_values}
    lm = model.config.text_config
    header = (f"SparseVLM demo: the lab VLM (EfficientNet-Lite0 -> trained projector -> SmolLM2-135M-Instruct, "
              f"{lm.num_hidden_layers} decoder layers of width {lm.hidden_size}; {inputs['input_ids'].shape[1]} "
              f"prompt tokens, {model.config.num_visual_tokens} visual)\n"
              f"scene-VQA test example {index}: {len(chosen.scene.objects)} objects; question: {text!r}")
    expected = chosen.question.answer if question is None else None
    return model, load_tokenizer(), image, inputs, header, expected

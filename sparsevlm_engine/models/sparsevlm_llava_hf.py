"""`sparsevlm_llava_hf`: lmms-eval's `llava_hf`, sparsified right after loading, run in batches.

Loading, the processor, the prompt (image tokens prepended, the chat template or Vicuna's) and
the generation defaults are lmms-eval's. Its `generate_until` runs one request at a time; this
one sends `batch_size` requests through the sparsified model in one left-padded `generate`, and
returns each answer with its prefill's SparseVLM record (see trace_log).
"""
from __future__ import annotations

import PIL.Image
from accelerate import PartialState
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf
from tqdm import tqdm

from ..api import last_trace, sparsify
from .model_args import split_model_args
from .trace_log import RunLog, generated_lengths

MODEL_NAME = "sparsevlm_llava_hf"
GENERATION_DEFAULTS = {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "num_beams": 1}  # llava_hf's


class SparseVLMLlavaHf(LlavaHf):
    """lmms-eval's LlavaHf with SparseVLM; model_args: LlavaHf's, plus preset, budget,
    keep_fraction, positions and backend (see model_args)."""

    def __init__(self, **kwargs) -> None:
        self.sparse_config, own = split_model_args(MODEL_NAME, LlavaHf, kwargs)
        if not own.get("device_map") and PartialState().num_processes == 1:
            # llava_hf's default device_map "" is refused by transformers 5's from_pretrained.
            own["device_map"] = str(own.get("device", "cuda"))
        super().__init__(**own)
        sparsify(self.model, self.sparse_config)

    def _prompt(self, context: str, n_images: int) -> str:
        """llava_hf's prompt: "<image>" per image prepended unless present, then the chat template."""
        if DEFAULT_IMAGE_TOKEN not in context and n_images:
            context = " ".join([DEFAULT_IMAGE_TOKEN] * n_images) + "\n" + context
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        """The request's images (a list; empty for a text-only request)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = visuals if isinstance(visuals, list) else [visuals]
        if not all(isinstance(v, PIL.Image.Image) for v in visuals):
            raise ValueError(f"{MODEL_NAME} takes images only (doc {doc_id} of {task} has {type(visuals[0]).__name__})")
        return visuals

    def _generate_batch(self, chunk, log: RunLog) -> list[GenerationResult]:
        """One left-padded generate for a chunk of request args that share gen_kwargs."""
        contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
        visuals = [self._visuals(fn, d, t, s) for fn, d, t, s in zip(doc_to_visual, doc_ids, tasks, splits)]
        texts = [self._prompt(c, len(v)) for c, v in zip(contexts, visuals)]
        images = [image for per_doc in visuals for image in per_doc] or None
        inputs = self._image_processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self._device, self.model.dtype)
        gen_kwargs = {**GENERATION_DEFAULTS, **all_gen_kwargs[0]}
        gen_kwargs.pop("until", None)  # llava_hf does not cut at stop strings either
        do_sample = gen_kwargs["temperature"] > 0
        with log.timed():
            out = self.model.generate(
                **inputs, do_sample=do_sample, temperature=gen_kwargs["temperature"] if do_sample else None,
                top_p=gen_kwargs["top_p"], num_beams=gen_kwargs["num_beams"],
                max_new_tokens=gen_kwargs["max_new_tokens"], use_cache=self.use_cache,
                pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        answers = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        lengths = generated_lengths(new_tokens, self.eot_token_id)
        trace = last_trace(self.model)
        results = []
        for row, (context, answer) in enumerate(zip(contexts, answers)):
            results.append(GenerationResult(text=answer, token_counts=log.counts(trace, row, lengths[row])))
            self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[row]), answer)
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in request order, batch_size requests per generate (grouped by gen_kwargs and
        sorted by prompt length, longest first, as llava_hf sorts them)."""
        reorder = utils.Collator([r.args for r in requests], lambda x: (-len(self.tok_encode(x[0])), x[0]),
                                 grouping=True)
        log, results = RunLog(), []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            results.extend(self._generate_batch(chunk, log))
            pbar.update(len(chunk))
        pbar.close()
        log.report()
        return reorder.get_original(results)

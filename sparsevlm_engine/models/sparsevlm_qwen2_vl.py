"""`sparsevlm_qwen2_vl`: lmms-eval's `qwen2_vl`, sparsified right after loading.

lmms-eval's Qwen2_VL already batches; this class hands it one batch at a time (so that each
batch is exactly one `generate`) and pairs the batch's rows with its prefill trace. It sorts and
groups the requests as Qwen2_VL does (by gen_kwargs, then longest prompt first), so Qwen2_VL's own
sort leaves each batch in the order it was given.
"""
from __future__ import annotations

import copy
import dataclasses

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.models.simple import qwen2_vl
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

from ..api import last_trace, sparsify
from .model_args import split_model_args
from .trace_log import RunLog

MODEL_NAME = "sparsevlm_qwen2_vl"


class SparseVLMQwen2VL(Qwen2_VL):
    """lmms-eval's Qwen2_VL with SparseVLM; model_args: Qwen2_VL's, plus preset, budget,
    keep_fraction, positions and backend (see model_args)."""

    def __init__(self, **kwargs) -> None:
        self.sparse_config, own = split_model_args(MODEL_NAME, Qwen2_VL, kwargs)
        if qwen2_vl.process_vision_info is None:
            raise ImportError(f"{MODEL_NAME} needs qwen-vl-utils (with a torchvision matching torch), which lmms-eval's "
                              "qwen2_vl reads images with: pip install qwen-vl-utils torchvision")
        super().__init__(**own)
        self.processor.tokenizer.padding_side = "left"
        sparsify(self.model, self.sparse_config)

    def _qwen2_vl_order(self, args: tuple):
        """Qwen2_VL.generate_until's sort key: longest prompt first, then the prompt."""
        return -len(self.tokenizer.encode(args[0])), args[0]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        keyed = [(r.args[0], r.args[1], i) for i, r in enumerate(requests)]
        reorder = utils.Collator(keyed, self._qwen2_vl_order, grouping=True)
        log, results = RunLog(), []
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            batch = [requests[i] for _, _, i in chunk]
            # Qwen2_VL pops "until" from the gen_kwargs it is given: give it copies.
            batch = [dataclasses.replace(r, arguments=(r.args[0], copy.deepcopy(r.args[1]), *r.args[2:])) for r in batch]
            with log.timed():
                answers = super().generate_until(batch)
            trace = last_trace(self.model)
            if len(trace) != len(batch):
                raise RuntimeError(f"{MODEL_NAME}: a batch of {len(batch)} requests gave a prefill of {len(trace)} rows")
            results.extend(GenerationResult(text=a, token_counts=log.counts(trace, row, None))
                           for row, a in enumerate(answers))
        log.report()
        return reorder.get_original(results)

"""Scene-VQA accuracy of the lab VLM: dense, SparseVLM presets and text-agnostic baselines.

Every answer is one token, so a prediction is the greedy first token of one prefill; exact match
compares it with the answer's token.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import SparseVLMConfig
from ..api import last_trace, sparsify, unsparsify
from .baselines import keep_for_average, layer_average, text_agnostic_pruning
from .language import answer_token
from .model import LabVLM, encode
from .scenes import KINDS, Example, examples, render

BUDGETS = (192, 128, 96, 64)
# method: (preset, positions); the committed evaluation ran v1.5 with original positions
SPARSEVLM_PRESETS = {"v1_5": ("v1.5", "original"), "v2": ("v2", "original")}
BASELINE_LAYER = 2  # SparseVLM's first pruning layer on this 30-layer decoder


@dataclass(frozen=True)
class Prediction:
    """One method's answers on a batch: token ids [B], top-1 minus top-2 logit margins [B],
    and the layer-averaged visual tokens per sample [B]."""

    tokens: torch.Tensor
    margins: torch.Tensor
    equivalent_tokens: torch.Tensor


@torch.no_grad()
def _predict(model: LabVLM, inputs, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, _ = model(inputs.input_ids, attention_mask=inputs.attention_mask, visual_embeds=visual)
    top = logits[:, -1].float().topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def evaluate_batch(model: LabVLM, batch: list[Example], budgets=BUDGETS, seed: int = 0) -> dict:
    """{(method, budget): Prediction} for dense (budget None), v1_5, v2, fastv and random."""
    inputs = encode(model.config, [e.question.text for e in batch], [render(e.scene) for e in batch])
    with torch.no_grad():
        visual = model.model.visual_embeddings(inputs.pixel_values)
    n_visual = model.config.num_visual_tokens
    depth = model.config.text_config.num_hidden_layers
    out = {}
    tokens, margins = _predict(model, inputs, visual)
    out[("dense", None)] = Prediction(tokens, margins, torch.full((len(batch),), float(n_visual)))
    for budget in budgets:
        for name, (preset, positions) in SPARSEVLM_PRESETS.items():
            sparsify(model, SparseVLMConfig.preset(preset, budget, positions=positions))
            try:
                tokens, margins = _predict(model, inputs, visual)
                trace = last_trace(model)
            finally:
                unsparsify(model)
            entering = torch.tensor([sum(s.visual_entering) / len(s.visual_entering) for s in trace.samples])
            out[(name, budget)] = Prediction(tokens, margins, entering)
        target = float(out[("v1_5", budget)].equivalent_tokens.mean())
        keep = keep_for_average(target, n_visual, BASELINE_LAYER, depth)
        for method in ("fastv", "random"):
            with text_agnostic_pruning(model, method, keep, BASELINE_LAYER, seed=seed + batch[0].index):
                tokens, margins = _predict(model, inputs, visual)
            average = layer_average(keep, n_visual, BASELINE_LAYER, depth)
            out[(method, budget)] = Prediction(tokens, margins, torch.full((len(batch),), average))
    return out


def answer_ids(batch: list[Example]) -> torch.Tensor:
    return torch.tensor([answer_token(e.question.answer) for e in batch])


def dense_accuracy(model: LabVLM, split: str, count: int, device="cpu", batch_size: int = 5) -> float:
    """Exact-match accuracy of the dense model on the first `count` examples of a split."""
    chosen, correct = examples(split, 0, count), 0
    for i in range(0, count, batch_size):
        batch = chosen[i:i + batch_size]
        inputs = encode(model.config, [e.question.text for e in batch], [render(e.scene) for e in batch])
        logits, _ = model(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                          pixel_values=inputs.pixel_values.to(device))
        correct += int((logits[:, -1].argmax(-1).cpu() == answer_ids(batch)).sum())
    return correct / count


def evaluate(model: LabVLM, split: str = "test", start: int = 0, count: int | None = None,
             budgets=BUDGETS, batch_size: int = 5, progress=None) -> dict:
    """Per-example records and a summary per method (see `summarise`)."""
    chosen = examples(split, start, count)
    records = []
    for i in range(0, len(chosen), batch_size):
        batch = chosen[i:i + batch_size]
        predictions = evaluate_batch(model, batch, budgets)
        truth = answer_ids(batch)
        for j, example in enumerate(batch):
            records.append({
                "index": example.index, "kind": example.question.kind, "question": example.question.text,
                "answer": example.question.answer, "answer_token": int(truth[j]),
                "predictions": {_key(m, b): {"token": int(p.tokens[j]), "margin": round(float(p.margins[j]), 4),
                                             "equivalent_tokens": round(float(p.equivalent_tokens[j]), 2)}
                                for (m, b), p in predictions.items()},
            })
        if progress is not None:
            progress(len(records), len(chosen))
    return {"split": split, "start": start, "examples": len(records), "budgets": list(budgets),
            "summary": summarise(records), "records": records}


def _key(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method}@{budget}"


def summarise(records: list[dict]) -> list[dict]:
    """Per method: accuracy, by kind, share of dense accuracy retained, agreement with dense, tokens."""
    dense_correct = [r["predictions"]["dense"]["token"] == r["answer_token"] for r in records]
    dense_accuracy_ = sum(dense_correct) / len(records)
    rows = []
    for key in records[0]["predictions"]:
        method, _, budget = key.partition("@")
        correct = [r["predictions"][key]["token"] == r["answer_token"] for r in records]
        agree = [r["predictions"][key]["token"] == r["predictions"]["dense"]["token"] for r in records]
        by_kind = defaultdict(list)
        for r, c in zip(records, correct):
            by_kind[r["kind"]].append(c)
        accuracy = sum(correct) / len(records)
        rows.append({
            "method": method, "budget": int(budget) if budget else None,
            "equivalent_tokens": round(sum(r["predictions"][key]["equivalent_tokens"] for r in records) / len(records), 1),
            "accuracy": accuracy,
            "retained": accuracy / dense_accuracy_ if dense_accuracy_ else None,
            "agreement": sum(agree) / len(records),
            "by_kind": {k: sum(v) / len(v) for k in KINDS if (v := by_kind.get(k))},
        })
    return rows

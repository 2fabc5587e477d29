"""Scene-VQA accuracy of the lab VLM: dense, SparseVLM presets and text-agnostic baselines.

Every answer is one token, so a prediction is the greedy first token of one prefill; exact match
compares it with the answer's token. Questions run in left-padded batches through the engine
(each row pruned on its own) under bf16 autocast by default, the precision VLMs are served in.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..api import last_trace, sparsify, unsparsify
from ..config import SparseVLMConfig
from ..schedule import RANK_COEFFICIENTS
from .baselines import keep_for_average, layer_average, text_agnostic_pruning
from .language import answer_token
from .model import LabVLM, encode
from .scenes import KINDS, Example, example, examples, render
from .stats import mcnemar_exact, paired_bootstrap_ratio, wilson_interval

BUDGETS = (192, 128, 96, 64)
PRECISIONS = ("bf16", "fp32")
# method: (preset, positions)
SPARSEVLM_METHODS = {"v1": ("v1", "renumber"), "v1_5": ("v1.5", "renumber"),
                     "v1_5_original": ("v1.5", "original"), "v2": ("v2", "original")}
MATCHED_METHOD = "v1_5"  # the baselines keep the layer-averaged visual tokens this method measured
BASELINE_LAYER = 2  # SparseVLM's first pruning layer on this 30-layer decoder


@dataclass(frozen=True)
class Prediction:
    """One method's answers on a batch: token ids [B], top-1 minus top-2 logit margins [B],
    and the layer-averaged visual tokens per sample [B]."""

    tokens: torch.Tensor
    margins: torch.Tensor
    equivalent_tokens: torch.Tensor


def rank_coefficients(budget: int) -> tuple[float, float]:
    """v1's (scale, bias): the published ones, else interpolated linearly between the nearest published budgets."""
    if budget in RANK_COEFFICIENTS:
        return RANK_COEFFICIENTS[budget]
    low = max((b for b in RANK_COEFFICIENTS if b < budget), default=None)
    high = min((b for b in RANK_COEFFICIENTS if b > budget), default=None)
    if low is None or high is None:
        raise ValueError(f"v1 has coefficients for budgets {sorted(RANK_COEFFICIENTS)}; {budget} is outside them")
    t = (budget - low) / (high - low)
    return tuple(a + t * (b - a) for a, b in zip(RANK_COEFFICIENTS[low], RANK_COEFFICIENTS[high]))


def sparsevlm_config(method: str, budget: int) -> SparseVLMConfig:
    preset, positions = SPARSEVLM_METHODS[method]
    extra = dict(zip(("scale", "bias"), rank_coefficients(budget))) if preset == "v1" else {}
    return SparseVLMConfig.preset(preset, budget, positions=positions, **extra)


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _predict(model: LabVLM, inputs, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answer tokens [B] and top-1 minus top-2 margins [B]; the head runs in fp32, so bf16's coarse
    logits cannot tie."""
    hidden = model.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                         visual_embeds=visual).last_hidden_state[:, -1]
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(hidden.float(), model.lm_head.weight.float())
    top = logits.topk(2, dim=-1)
    return top.indices[:, 0].cpu(), (top.values[:, 0] - top.values[:, 1]).cpu()


def evaluate_batch(model: LabVLM, batch: list[Example], budgets=BUDGETS, seed: int = 0,
                   precision: str = "bf16") -> dict:
    """{(method, budget): Prediction} for dense (budget None), the SparseVLM methods, fastv and random."""
    device = next(model.parameters()).device
    encoded = encode(model.config, [e.question.text for e in batch], [render(e.scene) for e in batch])
    inputs = type(encoded)(*(t.to(device) for t in (encoded.input_ids, encoded.attention_mask,
                                                      encoded.pixel_values)))
    n_visual = model.config.num_visual_tokens
    depth = model.config.text_config.num_hidden_layers
    out = {}
    with _autocast(device, precision):
        with torch.no_grad():
            visual = model.model.visual_embeddings(inputs.pixel_values)
        tokens, margins = _predict(model, inputs, visual)
        out[("dense", None)] = Prediction(tokens, margins, torch.full((len(batch),), float(n_visual)))
        for budget in budgets:
            for method in SPARSEVLM_METHODS:
                sparsify(model, sparsevlm_config(method, budget))
                try:
                    tokens, margins = _predict(model, inputs, visual)
                    trace = last_trace(model)
                finally:
                    unsparsify(model)
                entering = torch.tensor([sum(s.visual_entering) / len(s.visual_entering) for s in trace.samples])
                out[(method, budget)] = Prediction(tokens, margins, entering)
            target = float(out[(MATCHED_METHOD, budget)].equivalent_tokens.mean())
            keep = keep_for_average(target, n_visual, BASELINE_LAYER, depth)
            row_seeds = [seed + e.index for e in batch]
            for method in ("fastv", "random"):
                with text_agnostic_pruning(model, method, keep, BASELINE_LAYER, seed=row_seeds):
                    tokens, margins = _predict(model, inputs, visual)
                average = layer_average(keep, n_visual, BASELINE_LAYER, depth)
                out[(method, budget)] = Prediction(tokens, margins, torch.full((len(batch),), average))
    return out


def answer_ids(batch: list[Example]) -> torch.Tensor:
    return torch.tensor([answer_token(e.question.answer) for e in batch])


def dense_accuracy(model: LabVLM, split: str, count: int, device="cpu", batch_size: int = 5,
                   precision: str = "bf16") -> float:
    """Exact-match accuracy of the dense model on the first `count` examples of a split."""
    chosen, correct = examples(split, 0, count), 0
    for i in range(0, count, batch_size):
        batch = chosen[i:i + batch_size]
        inputs = encode(model.config, [e.question.text for e in batch], [render(e.scene) for e in batch])
        with torch.no_grad(), _autocast(torch.device(device), precision):
            logits, _ = model(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                              pixel_values=inputs.pixel_values.to(device))
        correct += int((logits[:, -1].argmax(-1).cpu() == answer_ids(batch)).sum())
    return correct / count


def batch_records(batch: list[Example], predictions: dict) -> list[dict]:
    """One JSON record per example: the question, its answer and every method's prediction."""
    truth = answer_ids(batch)
    return [{"index": example.index, "kind": example.question.kind, "question": example.question.text,
             "answer": example.question.answer, "answer_token": int(truth[j]),
             "predictions": {_key(m, b): {"token": int(p.tokens[j]), "margin": round(float(p.margins[j]), 4),
                                          "equivalent_tokens": round(float(p.equivalent_tokens[j]), 2)}
                             for (m, b), p in predictions.items()}}
            for j, example in enumerate(batch)]


def evaluate(model: LabVLM, split: str = "test", start: int = 0, count: int | None = None,
             budgets=BUDGETS, batch_size: int = 8, precision: str = "bf16", done=(),
             on_batch=None) -> dict:
    """Per-example records and a summary per method (see `summarise`).

    done: records of an interrupted run to keep (their examples are not run again);
    on_batch(new_records, records_so_far) is called after every batch.
    """
    chosen = examples(split, start, count)
    finished = {r["index"] for r in done}
    records = list(done)
    pending = [e for e in chosen if e.index not in finished]
    for i in range(0, len(pending), batch_size):
        batch = pending[i:i + batch_size]
        new = batch_records(batch, evaluate_batch(model, batch, budgets, precision=precision))
        records.extend(new)
        if on_batch is not None:
            on_batch(new, len(records), len(chosen))
    records.sort(key=lambda r: r["index"])
    return {"split": split, "start": start, "examples": len(records), "budgets": list(budgets),
            "precision": precision, "batch_size": batch_size, "summary": summarise(records), "records": records}


def single_run_mismatches(model: LabVLM, records: list[dict], budgets=BUDGETS, precision: str = "bf16") -> dict:
    """Re-run the examples of `records` one at a time: how many predictions equal the batched ones.

    Returns {"questions", "predictions", "equal", "mismatches": [{"index", "method", "batched_margin",
    "single_margin"}]}.
    """
    mismatches, total = [], 0
    for record in records:
        alone = [example("test", record["index"])]
        single = batch_records(alone, evaluate_batch(model, alone, budgets, precision=precision))[0]["predictions"]
        for key, prediction in single.items():
            total += 1
            if prediction["token"] != record["predictions"][key]["token"]:
                mismatches.append({"index": record["index"], "method": key,
                                   "batched_margin": record["predictions"][key]["margin"],
                                   "single_margin": prediction["margin"]})
    return {"questions": len(records), "predictions": total, "equal": total - len(mismatches),
            "mismatches": mismatches}


def _key(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method}@{budget}"


def summarise(records: list[dict]) -> list[dict]:
    """Per method: accuracy with its 95% Wilson interval, by kind, share of dense accuracy retained
    with a 95% paired-bootstrap interval, agreement with dense, McNemar's exact p against dense, tokens."""
    keys = list(records[0]["predictions"])
    correct = torch.tensor([[r["predictions"][k]["token"] == r["answer_token"] for r in records] for k in keys])
    dense = correct[keys.index("dense")]
    low, high = paired_bootstrap_ratio(correct, dense)
    dense_accuracy_ = float(dense.float().mean())
    rows = []
    for m, key in enumerate(keys):
        method, _, budget = key.partition("@")
        right = correct[m]
        by_kind = defaultdict(list)
        for r, c in zip(records, right.tolist()):
            by_kind[r["kind"]].append(c)
        accuracy = float(right.float().mean())
        n_right = int(right.sum())
        only_dense, only_method = int((dense & ~right).sum()), int((right & ~dense).sum())
        rows.append({
            "method": method, "budget": int(budget) if budget else None,
            "equivalent_tokens": round(sum(r["predictions"][key]["equivalent_tokens"] for r in records)
                                       / len(records), 1),
            "accuracy": accuracy, "correct": n_right,
            "accuracy_ci": [round(v, 4) for v in wilson_interval(n_right, len(records))],
            "retained": accuracy / dense_accuracy_ if dense_accuracy_ else None,
            "retained_ci": [round(low[m], 4), round(high[m], 4)],
            "agreement": sum(r["predictions"][key]["token"] == r["predictions"]["dense"]["token"]
                             for r in records) / len(records),
            "only_dense_correct": only_dense, "only_method_correct": only_method,
            "mcnemar_p": round(mcnemar_exact(only_dense, only_method), 4),
            "by_kind": {k: sum(v) / len(v) for k in KINDS if (v := by_kind.get(k))},
        })
    return rows

"""Accuracy lab: what SparseVLM's pruning costs in the lab VLM's answers, against text-agnostic pruning.

    python bench/accuracy_lab.py --out bench/results

Evaluates the committed lab VLM (sparsevlm_engine/lab, EfficientNet-Lite0 -> trained projector ->
SmolLM2-135M-Instruct with merged adapters) on the scene-VQA test split: dense, SparseVLM v1.5
and v2 at budgets 192 / 128 / 96 / 64, and FastV-style and random pruning after layer 2 at the
layer-averaged visual-token count SparseVLM v1.5 measured at each budget. Writes
accuracy_lab.json (summary, targets, every example's predictions, versions) and
accuracy_lab.png (accuracy against equivalent visual tokens), and prints both tables.
--examples N evaluates the first N test questions only (the JSON records how many).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from sparsevlm_engine import __version__
from sparsevlm_engine.lab.evaluate import BUDGETS, evaluate
from sparsevlm_engine.lab.model import WEIGHTS, load_lab_vlm
from sparsevlm_engine.lab.report import METHOD_NAMES, results_table, targets, targets_table
from sparsevlm_engine.lab.scenes import SPLIT_SIZES

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- accuracy-lab:begin -->", "<!-- accuracy-lab:end -->"
JSON_NAME, PLOT_NAME = "accuracy_lab.json", "accuracy_lab.png"


def environment() -> dict:
    import transformers

    return {"device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
            "sparsevlm_engine": __version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "date": date.today().isoformat()}


def plot(summary: list[dict], path: Path, examples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r for r in summary if r["method"] == "dense")
    ax.axhline(100 * dense["accuracy"], color="black", linestyle="--", label="dense (576 tokens)")
    for method, marker in (("v1_5", "o"), ("v2", "s"), ("fastv", "^"), ("random", "x")):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["equivalent_tokens"])
        ax.plot([r["equivalent_tokens"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker,
                label=METHOD_NAMES[method])
    ax.set_xlabel("equivalent visual tokens (mean over the 30 decoder layers)")
    ax.set_ylabel(f"exact-match accuracy, % ({examples} test questions)")
    ax.set_title("Lab VLM (EfficientNet-Lite0 + SmolLM2-135M) on scene VQA")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(result: dict, readme: Path = README) -> None:
    """Replace the README's accuracy-lab block with the tables of `result`."""
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    env = result["environment"]
    block = (f"{BEGIN}\nMeasured {env['date']} on {env['cpu_threads']} CPU threads (torch {env['torch']}, "
             f"transformers {env['transformers']}) in {result['seconds']} s; data in "
             f"`bench/results/{JSON_NAME}`, plot in `bench/results/{PLOT_NAME}`.\n\n"
             f"{results_table(result['summary'], result['examples'])}\n\n{targets_table(result['targets'])}\n{END}")
    readme.write_text(head + block + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and the plot")
    parser.add_argument("--examples", type=int, default=SPLIT_SIZES["test"], help="first N test questions")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's accuracy-lab tables")
    parser.add_argument("--from-json", action="store_true",
                        help="with --readme: take the results from the JSON in --out instead of evaluating")
    args = parser.parse_args(argv)
    if not 1 <= args.examples <= SPLIT_SIZES["test"]:
        parser.error(f"--examples must be in 1..{SPLIT_SIZES['test']} (the test split's size)")
    out = Path(args.out)
    if args.from_json:
        update_readme(json.loads((out / JSON_NAME).read_text()))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model = load_lab_vlm(args.weights)
    weights = Path(args.weights)
    meta = torch.load(weights, map_location="cpu", weights_only=True).get("meta", {})

    def progress(done, total):
        print(f"  {done}/{total} questions, {time.time() - start:.0f}s", file=sys.stderr, flush=True)

    result = evaluate(model, "test", 0, args.examples, args.budgets, args.batch_size, progress)
    result["targets"] = targets(result["summary"])
    result["model"] = {
        "description": "EfficientNet-Lite0 (ImageNet, frozen, stride-16 features, 24x24 = 576 tokens) -> projector "
                       "(trained) -> SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, frozen; low-rank adapters on "
                       "attention merged)",
        "weights": weights.name, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "training": {k: v for k, v in meta.items() if k != "history"},
    }
    result["environment"] = environment()
    result["seconds"] = round(time.time() - start)
    (out / JSON_NAME).write_text(json.dumps(result, indent=1) + "\n")
    plot(result["summary"], out / PLOT_NAME, result["examples"])
    print(results_table(result["summary"], result["examples"]))
    print()
    print(targets_table(result["targets"]))
    print(f"\nwrote {out / JSON_NAME} and {out / PLOT_NAME} in {result['seconds']}s")
    if args.readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

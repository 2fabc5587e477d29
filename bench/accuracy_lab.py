"""Accuracy lab: what SparseVLM's pruning costs in the lab VLM's answers, against text-agnostic pruning.

    python bench/accuracy_lab.py --out bench/results [--readme]

Evaluates the committed lab VLM (sparsevlm_engine/lab, EfficientNet-Lite0 -> trained projector ->
SmolLM2-135M-Instruct with merged adapters) on the scene-VQA test split, in left-padded batches
through the engine under bf16 autocast: dense; SparseVLM v1 (rank), v1.5 (renumbered and original
positions) and v2 at budgets 192 / 128 / 96 / 64; FastV-style and random pruning after layer 2 at
the layer-averaged visual-token count v1.5 measured at each budget. Then the first --single-check
questions run again one at a time, and the first --fp32-check batched and one at a time in fp32;
the JSON records how many batched answers equal the single ones. Writes accuracy_lab.json (summary with 95% intervals and McNemar tests against dense,
targets, every example's predictions, wall times, versions) and accuracy_lab.png, and prints the
tables. An interrupted run resumes from accuracy_lab.partial.jsonl in --out (same weights,
precision, budgets and batch size); --examples N evaluates the first N test questions only.
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
from sparsevlm_engine.lab.evaluate import BUDGETS, PRECISIONS, evaluate, single_run_mismatches
from sparsevlm_engine.lab.model import WEIGHTS, load_lab_vlm
from sparsevlm_engine.lab.report import METHOD_NAMES, kinds_table, results_table, targets, targets_table
from sparsevlm_engine.lab.scenes import SPLIT_SIZES

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- accuracy-lab:begin -->", "<!-- accuracy-lab:end -->"
JSON_NAME, PLOT_NAME, PARTIAL_NAME = "accuracy_lab.json", "accuracy_lab.png", "accuracy_lab.partial.jsonl"
PLOTTED = {"v1": "D", "v1_5": "o", "v1_5_original": "v", "v2": "s", "fastv": "^", "random": "x"}


def environment(device: str) -> dict:
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "sparsevlm_engine": __version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "date": date.today().isoformat()}


def plot(summary: list[dict], path: Path, examples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    dense = next(r for r in summary if r["method"] == "dense")
    ax.axhspan(100 * dense["accuracy_ci"][0], 100 * dense["accuracy_ci"][1], color="black", alpha=0.08)
    ax.axhline(100 * dense["accuracy"], color="black", linestyle="--", label="dense (576 tokens), 95% CI shaded")
    for method, marker in PLOTTED.items():
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["equivalent_tokens"])
        accuracy = [100 * r["accuracy"] for r in rows]
        errors = [[a - 100 * r["accuracy_ci"][0] for a, r in zip(accuracy, rows)],
                  [100 * r["accuracy_ci"][1] - a for a, r in zip(accuracy, rows)]]
        ax.errorbar([r["equivalent_tokens"] for r in rows], accuracy, yerr=errors, marker=marker, capsize=2,
                    label=METHOD_NAMES[method])
    ax.set_xlabel("equivalent visual tokens (mean over the 30 decoder layers)")
    ax.set_ylabel(f"exact-match accuracy, % ({examples} test questions)")
    ax.set_title("Lab VLM (EfficientNet-Lite0 + SmolLM2-135M) on scene VQA, 95% Wilson intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def single_check_sentence(checks: dict) -> str:
    """One sentence per precision: how many batched predictions equal the single-run ones."""
    parts = []
    for precision, check in checks.items():
        sentence = (f"In {precision}, batched answers equal the single-run ones for {check['equal']} of "
                    f"{check['predictions']} predictions ({check['questions']} questions × every method)")
        if check["mismatches"]:
            worst = max(max(m["batched_margin"], m["single_margin"]) for m in check["mismatches"])
            sentence += (f"; in the others bf16's rounding, which depends on the batch shape, changed the answer "
                         f"(largest top-2 logit margin among them {worst:.3f})")
        parts.append(sentence + ".")
    return " ".join(parts)


def readme_block(result: dict) -> str:
    env, timing = result["environment"], result["timing"]
    return (f"{BEGIN}\nMeasured {env['date']} on {env['device']} (torch {env['torch']}, transformers "
            f"{env['transformers']}), {result['precision']} autocast, batches of {result['batch_size']} through the "
            f"engine: {timing['evaluation_seconds']} s for {result['examples']} questions × "
            f"{len(result['summary'])} methods ({timing['seconds_per_question']} s per question, all methods). "
            f"{single_check_sentence(result['batched_vs_single'])} Data in `bench/results/{JSON_NAME}`, "
            f"plot in `bench/results/{PLOT_NAME}`.\n\n"
            f"{results_table(result['summary'], result['examples'])}\n\n"
            f"Accuracy by question kind (questions per kind in brackets):\n\n"
            f"{kinds_table(result['summary'], result['records'])}\n\n"
            f"{targets_table(result['targets'])}\n{END}")


def update_readme(result: dict, readme: Path = README) -> None:
    """Replace the README's accuracy-lab block with the tables of `result`."""
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(head + readme_block(result) + tail)


def _partial_lines(path: Path) -> list[dict]:
    """The header, then one {"records", "seconds"} line per finished batch."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_partial(path: Path, header: dict) -> list[dict]:
    """The records of an interrupted run with the same header; [] if there is none."""
    if not path.is_file():
        return []
    lines = _partial_lines(path)
    if lines[0] != header:
        raise SystemExit(f"{path} belongs to another run ({lines[0]}); delete it to start afresh")
    return [r for line in lines[1:] for r in line["records"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and the plot")
    parser.add_argument("--examples", type=int, default=SPLIT_SIZES["test"], help="first N test questions")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--single-check", type=int, default=16,
                        help="first N questions also run one at a time: batched answers must equal them")
    parser.add_argument("--fp32-check", type=int, default=8,
                        help="first N questions also run batched and one at a time in fp32 (with bf16 evaluation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's accuracy-lab tables")
    parser.add_argument("--from-json", action="store_true",
                        help="with --readme: take the results from the JSON in --out instead of evaluating")
    args = parser.parse_args(argv)
    if not 1 <= args.examples <= SPLIT_SIZES["test"]:
        parser.error(f"--examples must be in 1..{SPLIT_SIZES['test']} (the test split's size)")
    if not (0 <= args.single_check <= args.examples and 0 <= args.fp32_check <= args.examples):
        parser.error("--single-check and --fp32-check must be in 0..--examples")
    out = Path(args.out)
    if args.from_json:
        update_readme(json.loads((out / JSON_NAME).read_text()))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model = load_lab_vlm(args.weights).to(args.device)
    weights = Path(args.weights)
    meta = torch.load(weights, map_location="cpu", weights_only=True).get("meta", {})
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    partial = out / PARTIAL_NAME
    header = {"weights_sha256": sha, "precision": args.precision, "budgets": args.budgets,
              "batch_size": args.batch_size}
    done = load_partial(partial, header)
    if not done:
        partial.write_text(json.dumps(header) + "\n")
    batch_start = [time.time()]

    def on_batch(new, finished, total):
        seconds = time.time() - batch_start[0]
        with partial.open("a") as f:
            f.write(json.dumps({"records": new, "seconds": round(seconds, 2)}) + "\n")
        print(f"  {finished}/{total} questions, {time.time() - start:.0f}s", file=sys.stderr, flush=True)
        batch_start[0] = time.time()

    result = evaluate(model, "test", 0, args.examples, args.budgets, args.batch_size, args.precision, done, on_batch)
    evaluation_seconds = round(sum(line["seconds"] for line in _partial_lines(partial)[1:]))
    check_start = time.time()
    checks = {args.precision: single_run_mismatches(model, result["records"][:args.single_check], args.budgets,
                                                     args.precision)}
    if args.precision != "fp32" and args.fp32_check:
        reference = evaluate(model, "test", 0, args.fp32_check, args.budgets, args.batch_size, "fp32")
        checks["fp32"] = single_run_mismatches(model, reference["records"], args.budgets, "fp32")
    result["batched_vs_single"] = checks
    result["timing"] = {"evaluation_seconds": evaluation_seconds,
                        "seconds_per_question": round(evaluation_seconds / result["examples"], 2),
                        "single_check_seconds": round(time.time() - check_start),
                        "resumed": bool(done)}
    result["targets"] = targets(result["summary"])
    result["model"] = {
        "description": "EfficientNet-Lite0 (ImageNet, frozen, stride-16 features, 24x24 = 576 tokens) -> projector "
                       "(trained) -> SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, frozen; low-rank adapters on "
                       "attention merged)",
        "weights": weights.name, "weights_sha256": sha,
        "training": {k: v for k, v in meta.items() if k != "history"},
    }
    result["environment"] = environment(args.device)
    (out / JSON_NAME).write_text(json.dumps(result, indent=1) + "\n")
    partial.unlink()
    plot(result["summary"], out / PLOT_NAME, result["examples"])
    print(results_table(result["summary"], result["examples"]))
    print()
    print(kinds_table(result["summary"], result["records"]))
    print()
    print(targets_table(result["targets"]))
    print(f"\n{single_check_sentence(result['batched_vs_single'])}\n"
          f"wrote {out / JSON_NAME} and {out / PLOT_NAME}; evaluation {evaluation_seconds} s")
    if args.readme:
        update_readme(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

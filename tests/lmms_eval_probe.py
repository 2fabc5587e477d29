"""A local lmms-eval task (JSON data, PNG images, YAML) and a runner for lmms-eval's own CLI, for
the plugin tests. Nothing is downloaded: the task reads files under a tmp folder."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TASK = "sparsevlm_probe"
MAX_NEW_TOKENS = 4
# Questions of different lengths, so that a batch is left padded.
QUESTIONS = ("what colour is the square?", "how many circles are there in the image?", "describe the picture",
             "is there a small triangle left of the line?", "what is it?")
COLOURS = ("red", "blue", "green", "yellow", "white")

TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def probe_images(root: Path) -> list[Path]:
    """One PNG per question: a flat colour of its own size with a black disc."""
    paths = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (200 + 40 * i, 160), colour)
        ImageDraw.Draw(image).ellipse([10 + 5 * i, 10, 90, 90], fill="black")
        paths.append(root / f"probe{i}.png")
        image.save(paths[-1])
    return paths


def write_task(root: Path, images: list[Path], answers: list[str]) -> Path:
    """The task folder (YAML + utils.py) over a JSON file of {image, question, answer}; returns it."""
    docs = [{"image": str(p), "question": q, "answer": a} for p, q, a in zip(images, QUESTIONS, answers)]
    (root / "probe.json").write_text(json.dumps(docs))
    task_dir = root / "task"
    task_dir.mkdir()
    (task_dir / "probe_utils.py").write_text(TASK_UTILS)
    (task_dir / "probe.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'probe.json'}
test_split: test
output_type: generate_until
doc_to_visual: !function probe_utils.doc_to_visual
doc_to_text: !function probe_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
process_results: !function probe_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return task_dir


def run_lmms_eval(root: Path, model: str, model_args: str, task_dir: Path, batch_size: int):
    """`python -m lmms_eval ...` with LMMS_EVAL_PLUGINS=sparsevlm_engine, offline; the finished
    process (lmms-eval reports a failed run on its output and still exits 0)."""
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "sparsevlm_engine", "HF_HOME": str(root / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", str(batch_size), "--device", "cpu",
           "--output_path", str(root / "out"), "--log_samples"]
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)


def read_outputs(root: Path) -> tuple[dict, list[dict]]:
    """(the results JSON, the logged samples by doc_id) lmms-eval wrote under root/out."""
    (results,) = glob.glob(str(root / "out" / "*" / "*_results.json"))
    (samples,) = glob.glob(str(root / "out" / "*" / f"*_samples_{TASK}.jsonl"))
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines() if line.strip()]
    return json.loads(Path(results).read_text()), sorted(rows, key=lambda r: r["doc_id"])

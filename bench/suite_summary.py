"""The PASS / FAIL table that ends bench/gpu_suite.sh: each stage, then each end-to-end target.

    python bench/suite_summary.py OUT_DIR GPU_SLUG

Reads OUT_DIR/.stages (one line a stage: name, exit status or 'skipped', seconds, limit) and
OUT_DIR/e2e_<gpu>.json. Exits 1 when a stage failed or ran out of time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TIMED_OUT = {124, 137}


def stage_rows(out: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in (out / ".stages").read_text().splitlines():
        name, rc, seconds, limit = line.split()
        if rc == "skipped":
            status = "SKIP (needs CUDA)"
        elif int(rc) == 0:
            status = "PASS"
        else:
            status = "FAIL (time limit)" if int(rc) in TIMED_OUT else f"FAIL (exit {rc})"
        rows.append((name, status, f"{seconds} s of {limit} s"))
    return rows


def target_rows(results: dict) -> list[tuple[str, str, str]]:
    lines = results.get("targets", []) + [t | {"informational": True} for t in results.get("targets_informational", [])]
    rows = []
    for t in lines:
        who = " ".join(x for x in (t.get("shape"), t["attn"], t["preset"]) if x)
        label = ("(informational) " if t.get("informational") else "") + f"{t['target']} [{who}]"
        rows.append((label, t["status"], t["detail"]))
    return rows


def main(argv: list[str]) -> int:
    out, gpu = Path(argv[0]), argv[1]
    stages = stage_rows(out)
    e2e = out / f"e2e_{gpu}.json"
    results = json.loads(e2e.read_text()) if e2e.exists() else {}
    width = max(len(name) for name, _, _ in stages)
    print(f"\nSUITE on {results.get('environment', {}).get('device', gpu)}")
    for name, status, detail in stages:
        print(f"  {name:{width}}  {status:18}  {detail}")
    if not results:
        print(f"  no end-to-end results at {e2e}")
    for label, status, detail in target_rows(results):
        print(f"  [{status:>12}] {label}: {detail}")
    return int(any(status.startswith("FAIL") for _, status, _ in stages) or not results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The accuracy lab's table and targets, computed from an evaluation's summary rows."""
from __future__ import annotations

METHOD_NAMES = {"dense": "dense", "v1_5": "SparseVLM v1.5 (original positions)", "v2": "SparseVLM v2 (SparseVLM+)",
                "fastv": "FastV-style (last-token attention, layer 2)", "random": "random (layer 2)"}
DENSE_TARGET = 0.85
RETAINED_TARGETS = {128: 0.95, 64: 0.85}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def results_table(summary: list[dict], examples: int) -> str:
    """Markdown: one row per method and budget, best-first by budget."""
    lines = [f"| method | budget | equivalent visual tokens | accuracy ({examples} test questions) | "
             "retained vs dense | agreement with dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in summary:
        budget = "576 (all)" if row["budget"] is None else str(row["budget"])
        lines.append(f"| {METHOD_NAMES[row['method']]} | {budget} | {row['equivalent_tokens']:.1f} | "
                     f"{_pct(row['accuracy'])} | {_pct(row['retained'])} | {_pct(row['agreement'])} |")
    return "\n".join(lines)


def targets(summary: list[dict]) -> list[dict]:
    """Each target of the accuracy lab with the measured value and PASS / FAIL."""
    rows = {(r["method"], r["budget"]): r for r in summary}
    checks = [{"target": f"dense accuracy >= {DENSE_TARGET:.0%}", "measured": rows[("dense", None)]["accuracy"],
               "pass": rows[("dense", None)]["accuracy"] >= DENSE_TARGET}]
    for budget, share in RETAINED_TARGETS.items():
        for method in ("v1_5", "v2"):
            row = rows.get((method, budget))
            if row is not None:
                checks.append({"target": f"{method} @ {budget} retains >= {share:.0%} of dense",
                               "measured": row["retained"], "pass": row["retained"] is not None
                               and row["retained"] >= share})
    budgets = sorted({b for (_, b) in rows if b is not None}, reverse=True)
    for method in ("v1_5", "v2"):
        for budget in budgets:
            if (method, budget) not in rows:
                continue
            best = max(rows[(b, budget)]["accuracy"] for b in ("fastv", "random") if (b, budget) in rows)
            checks.append({"target": f"{method} @ {budget} beats both text-agnostic baselines",
                           "measured": rows[(method, budget)]["accuracy"] - best,
                           "pass": rows[(method, budget)]["accuracy"] > best})
    return checks


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | measured | verdict |", "|---|---:|---|"]
    for c in checks:
        value = f"{100 * c['measured']:+.1f} pts" if "beats" in c["target"] else _pct(c["measured"])
        lines.append(f"| {c['target']} | {value} | {'PASS' if c['pass'] else 'FAIL'} |")
    return "\n".join(lines)

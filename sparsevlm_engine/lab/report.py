"""The accuracy lab's tables and targets, computed from an evaluation's summary rows."""
from __future__ import annotations

from .scenes import KINDS

METHOD_NAMES = {"dense": "dense", "v1": "SparseVLM v1 (rank, renumbered positions)",
                "v1_5": "SparseVLM v1.5 (renumbered positions)", "v1_5_original": "SparseVLM v1.5 (original positions)",
                "v2": "SparseVLM v2 (SparseVLM+)", "fastv": "FastV-style (last-token attention, layer 2)",
                "random": "random (layer 2)"}
DENSE_TARGET = 0.85
KIND_TARGET = 0.70
RETAINED_TARGETS = {128: 0.97, 64: 0.90}
TARGET_METHODS = ("v1_5", "v1_5_original", "v2")
BASELINES = ("fastv", "random")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _interval(value, bounds) -> str:
    return f"{_pct(value)} [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def _budget(row) -> str:
    return "576 (all)" if row["budget"] is None else str(row["budget"])


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def results_table(summary: list[dict], examples: int) -> str:
    """Markdown: one row per method and budget, with 95% intervals and McNemar's p against dense."""
    lines = [f"| method | budget | equivalent visual tokens | accuracy, 95% CI ({examples} test questions) | "
             "retained vs dense, 95% CI | agreement with dense | only dense / only method right | "
             "McNemar p vs dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        dense = row["method"] == "dense"
        discordant = f"{row['only_dense_correct']} / {row['only_method_correct']}"
        lines.append(
            f"| {METHOD_NAMES[row['method']]} | {_budget(row)} | {row['equivalent_tokens']:.1f} | "
            f"{_interval(row['accuracy'], row['accuracy_ci'])} | "
            f"{'–' if dense else _interval(row['retained'], row['retained_ci'])} | {_pct(row['agreement'])} | "
            f"{'–' if dense else discordant} | "
            f"{'–' if dense else _p(row['mcnemar_p'])} |")
    return "\n".join(lines)


def kind_counts(records: list[dict]) -> dict[str, int]:
    return {k: sum(r["kind"] == k for r in records) for k in KINDS}


def kinds_table(summary: list[dict], records: list[dict]) -> str:
    """Markdown: accuracy per question kind (questions per kind in the header), one row per method and budget."""
    counts = kind_counts(records)
    lines = ["| method | budget | " + " | ".join(f"{k} ({counts[k]})" for k in KINDS) + " |",
             "|---|---:|" + "---:|" * len(KINDS)]
    for row in summary:
        lines.append(f"| {METHOD_NAMES[row['method']]} | {_budget(row)} | "
                     + " | ".join(_pct(row["by_kind"].get(k)) for k in KINDS) + " |")
    return "\n".join(lines)


def targets(summary: list[dict]) -> list[dict]:
    """Each target of the accuracy lab with the measured value and PASS / FAIL."""
    rows = {(r["method"], r["budget"]): r for r in summary}
    dense = rows[("dense", None)]
    checks = [{"target": f"dense accuracy >= {DENSE_TARGET:.0%}", "measured": dense["accuracy"],
               "pass": dense["accuracy"] >= DENSE_TARGET}]
    for kind in KINDS:
        if kind in dense["by_kind"]:
            checks.append({"target": f"dense accuracy on {kind} >= {KIND_TARGET:.0%}",
                           "measured": dense["by_kind"][kind], "pass": dense["by_kind"][kind] >= KIND_TARGET})
    for budget, share in RETAINED_TARGETS.items():
        for method in TARGET_METHODS:
            row = rows.get((method, budget))
            if row is not None:
                checks.append({"target": f"{method} @ {budget} retains >= {share:.0%} of dense",
                               "measured": row["retained"], "pass": row["retained"] is not None
                               and row["retained"] >= share})
    budgets = sorted({b for (_, b) in rows if b is not None}, reverse=True)
    for method in TARGET_METHODS:
        for budget in budgets:
            if (method, budget) not in rows or not any((b, budget) in rows for b in BASELINES):
                continue
            best = max(rows[(b, budget)]["accuracy"] for b in BASELINES if (b, budget) in rows)
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

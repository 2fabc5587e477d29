"""The end-to-end plots: prefill latency against the budget, and speedup against the FLOPs ratio."""
from __future__ import annotations

from pathlib import Path

from e2e_figures import AUTHORS, DENSE, SPARSE


def plot(results: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results["cases"].values() if not c.get("error")]
    groups = sorted({(c["shape"], c["attn"]) for c in cases})
    batches = sorted({c["batch"] for c in cases})
    paths = []
    if not groups:
        return paths
    fig, axes = plt.subplots(len(groups), len(batches), figsize=(4.2 * len(batches), 3.4 * len(groups)),
                             squeeze=False)
    for gi, (shape, attn) in enumerate(groups):
        for bi, batch in enumerate(batches):
            ax = axes[gi][bi]
            here = [c for c in cases if c["shape"] == shape and c["attn"] == attn and c["batch"] == batch]
            for c in here:
                if c["provider"] == DENSE:
                    p = c["figures"]["prefill_ms"]
                    ax.axhline(p["median_ms"], color="black", lw=1, label="dense")
                    ax.axhspan(p["p20_ms"], p["p80_ms"], color="black", alpha=0.1)
            for provider, style in ((SPARSE, "-o"), (AUTHORS, "--x")):
                for preset in sorted({c["preset"] for c in here if c["provider"] == provider}):
                    rows = sorted((c["budget"], c["figures"]["prefill_ms"]) for c in here
                                  if c["provider"] == provider and c["preset"] == preset)
                    xs = [b for b, _ in rows]
                    ys = [p["median_ms"] for _, p in rows]
                    err = [[p["median_ms"] - p["p20_ms"] for _, p in rows],
                           [p["p80_ms"] - p["median_ms"] for _, p in rows]]
                    ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=2, label=f"{provider} {preset}")
            ax.set_title(f"{shape}, {attn}, batch {batch}", fontsize=9)
            ax.set_xlabel("visual-token budget")
            ax.set_ylabel("prefill ms (median, p20-p80)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.suptitle(f"Prefill latency vs budget, {results['environment']['device']}", fontsize=10)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_prefill.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sparse = [c for c in cases if c["provider"] == SPARSE and c["figures"].get("speedup_vs_dense") is not None]
    markers = dict(zip(batches, "os^Dv*"))
    for c in sparse:
        colour = "tab:blue" if c["preset"] == "v1.5" else "tab:orange"
        ax.scatter(c["figures"]["flops"]["ratio_exact"], c["figures"]["speedup_vs_dense"], color=colour,
                   marker=markers[c["batch"]], alpha=0.8)
    if sparse:
        top = max(max(c["figures"]["flops"]["ratio_exact"] for c in sparse),
                  max(c["figures"]["speedup_vs_dense"] for c in sparse)) * 1.1
        xs = [0, top]
        ax.plot(xs, xs, "k-", lw=1, label="speedup = FLOPs ratio")
        ax.plot(xs, [0.9 * x for x in xs], "k--", lw=0.8, label="0.9 x (batch 8 target)")
        ax.plot(xs, [0.85 * x for x in xs], "k:", lw=0.8, label="0.85 x (batch 1 target)")
        ax.axhline(1.0, color="grey", lw=0.5)
    for preset, colour in (("v1.5", "tab:blue"), ("v2", "tab:orange")):
        ax.scatter([], [], color=colour, label=preset)
    for batch, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=f"batch {batch}")
    ax.set_xlabel("decoder FLOPs ratio, dense / sparse (exact, pruning included)")
    ax.set_ylabel("measured prefill speedup")
    ax.set_title(f"Speedup vs FLOPs ratio, {results['environment']['device']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths

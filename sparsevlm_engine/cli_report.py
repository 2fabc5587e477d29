"""What the `sparsevlm` commands print and write: per-layer token counts, FLOPs, answers, the PNG."""
from __future__ import annotations

import sys
from pathlib import Path

from .cli_checks import PNG_NAME, CliError


def report(trace, out=None) -> None:
    """Per-layer visual token counts, equivalent tokens and FLOPs of every sample."""
    out = out or sys.stdout
    print(trace.summary(), file=out)
    for b, s in enumerate(trace.samples):
        print(f"sample {b}: visual tokens entering each decoder layer: "
              f"{' '.join(str(n) for n in s.visual_entering)}", file=out)
        f = s.flops
        print(f"sample {b}: decoder prefill FLOPs dense {f.dense_exact / 1e9:.3f} G, sparse "
              f"{f.sparse_exact / 1e9:.3f} G + pruning {f.pruning / 1e9:.4f} G", file=out)


def decode_new(tokenizer, output_ids, prompt_len: int) -> str:
    """The text generated after the prompt: output_ids [1, prompt_len + new]."""
    return tokenizer.decode(output_ids[0, prompt_len:], skip_special_tokens=True).strip()


def save_kept_patches(image, sample, folder: Path, grid=None) -> Path:
    """Write the kept-patch PNG of one sample into `folder` and print its path; CliError when it
    cannot be written."""
    from .heatmap import draw_kept_patches

    try:
        png = draw_kept_patches(image, sample, Path(folder) / PNG_NAME, grid=grid)
    except OSError as e:
        raise CliError(f"cannot write {Path(folder) / PNG_NAME}: {e.strerror or e}") from None
    print(f"kept patches: {png}")
    return png

"""The `sparsevlm` command: an offline demo, and generation with a local checkpoint.

    sparsevlm demo [--family lab|llava|qwen2_vl|qwen2_5_vl] [--budget 128] [--preset v1.5] [--out DIR]
                   [--index N] [--seed N] [--prompt TEXT] [--repeats N] [--max-new-tokens N]
    sparsevlm generate --model PATH --image IMG --prompt TEXT [--budget 128] [--preset v1.5] ...

Every failure ends with one line on stderr and a non-zero exit code: 2 for bad arguments
(missing files, an unreadable image, an --out that cannot be written, a budget the preset
cannot take), checked before any model is loaded; 1 for anything else.
"""
from __future__ import annotations

import argparse
import sys

from .cli_checks import MAX_NEW_TOKENS, MAX_REPEATS, PNG_NAME, CliError, first_line
from .cli_demo import DEMO_FAMILIES, run_demo
from .cli_generate import run_generate


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=int, default=128, help="target visual tokens, for LLaVA-1.5's 576 (default 128)")
    p.add_argument("--preset", default="v1.5", help="v1 (rank), v1.5 (default) or v2 (SparseVLM+)")
    p.add_argument("--rank-scale", type=float, default=None,
                   help="--preset v1 only, with --rank-bias: keep int(rank * scale + bias) tokens, for a budget "
                        "without published coefficients (those are for 64, 128 and 192)")
    p.add_argument("--rank-bias", type=float, default=None, help="--preset v1 only, with --rank-scale")
    p.add_argument("--positions", default=None, choices=("renumber", "original"),
                   help="position ids after pruning (default: the preset's; v1 and v1.5 renumber, v2 original)")
    p.add_argument("--out", default="sparsevlm_out", help=f"folder for {PNG_NAME} (default ./sparsevlm_out)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsevlm", description="SparseVLM visual-token pruning for Hugging Face VLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="answer a scene question with the trained lab VLM, dense and sparse, offline "
                                       "(or run a random-weight LLaVA-1.5- or Qwen2-VL-shaped model)")
    _common(demo)
    demo.add_argument("--family", default="lab", choices=DEMO_FAMILIES,
                      help="lab (default: the trained lab VLM, 576 visual tokens, on a scene-VQA test image); "
                           "llava (random weights, LLaVA-1.5 geometry, 576 visual tokens), qwen2_vl or qwen2_5_vl "
                           "(random weights, 14 px patches merged 2x2: 144 visual tokens)")
    demo.add_argument("--index", type=int, default=None, help="lab: which scene-VQA test example to show")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (llava, qwen2_vl, qwen2_5_vl)")
    demo.add_argument("--prompt", default=None, help="question about the image")
    demo.add_argument("--repeats", type=int, default=5, help=f"timed prefills per variant, 1..{MAX_REPEATS} (default 5)")
    demo.add_argument("--max-new-tokens", type=int, default=None,
                      help=f"1..{MAX_NEW_TOKENS}; default 1 for the lab VLM (trained to answer in one token), else 8")

    gen = sub.add_parser("generate", help="generate with a local LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL "
                                          "checkpoint, sparsified")
    gen.add_argument("--model", required=True, help="local Hugging Face checkpoint folder")
    gen.add_argument("--image", required=True, help="image file")
    gen.add_argument("--prompt", required=True, help="question about the image")
    _common(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64, help=f"1..{MAX_NEW_TOKENS} (default 64)")
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gen.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                     help="auto: float16 on CUDA, float32 on CPU")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"sparsevlm: error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Entry point of the `sparsevlm` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    run = run_demo if args.command == "demo" else run_generate
    try:
        return run(args)
    except CliError as e:
        return _fail(str(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # an unforeseen failure still ends in one line, not a traceback
        return _fail(f"{type(e).__name__}: {first_line(e)}", 1)


if __name__ == "__main__":
    sys.exit(main())

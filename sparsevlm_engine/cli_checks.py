"""The `sparsevlm` command's user errors, and the checks of its arguments made before any model work."""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

PNG_NAME = "kept_patches.png"
MAX_NEW_TOKENS = 1024
MAX_REPEATS = 100
MAX_SEED = 2**32 - 1
CONFIG_FLAGS = {"budget": "--budget", "rank_scale": "--rank-scale", "rank_bias": "--rank-bias"}


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_range(flag: str, value: int, low: int, high: int) -> None:
    """CliError unless low <= value <= high."""
    if value < low:
        raise CliError(f"{flag} must be >= {low}, got {value}")
    if value > high:
        raise CliError(f"{flag} must be <= {high}, got {value}")


def as_flags(message: str) -> str:
    """A config error with the config fields the command sets named as its flags."""
    return re.sub(r"\b(" + "|".join(CONFIG_FLAGS) + r")\b", lambda m: CONFIG_FLAGS[m.group(1)], message)


def make_config(preset: str, budget: int, rank_scale: float | None = None, rank_bias: float | None = None,
                positions: str | None = None):
    """The SparseVLMConfig of --preset, --budget, (v1) --rank-scale / --rank-bias and --positions
    (None: the preset's); CliError when invalid."""
    from .config import SparseVLMConfig

    if (rank_scale is None) != (rank_bias is None):
        raise CliError("--rank-scale and --rank-bias go together: pass both or neither")
    if rank_scale is not None and preset != "v1":
        raise CliError(f"--rank-scale and --rank-bias need --preset v1 (rank mode), got --preset {preset}")
    coefficients = {} if rank_scale is None else {"scale": rank_scale, "bias": rank_bias}
    if positions is not None:
        coefficients["positions"] = positions
    try:
        return SparseVLMConfig.preset(preset, budget, **coefficients)
    except ValueError as e:
        raise CliError(as_flags(first_line(e))) from None


def check_output_folder(out: str) -> Path:
    """The --out folder, once a file can be written there: CliError when it is a file or not writable.

    Folders it has to create for the check are removed again; the PNG is written later.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    if (folder / PNG_NAME).is_dir():
        raise CliError(f"--out {out} holds a folder named {PNG_NAME}, where the PNG would go")
    created = next((p for p in reversed((folder, *folder.parents)) if not p.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise CliError(f"cannot write to --out {out}: {e.strerror or first_line(e)}") from None
    finally:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)
    return folder


def check_one_image(prompt: str | None, image_token: str) -> None:
    """CliError when --prompt names the image more than once: the command has one image."""
    n = 0 if prompt is None else prompt.count(image_token)
    if n > 1:
        raise CliError(f"--prompt has the image token {image_token!r} {n} times, but there is one image: "
                       "use it once, or leave it out")


def sparsify_or_fail(model, config):
    """sve.sparsify, with a config the model cannot take (e.g. too few decoder layers) as a CliError."""
    import sparsevlm_engine as sve

    try:
        return sve.sparsify(model, config)
    except (ValueError, NotImplementedError) as e:
        raise CliError(first_line(e)) from None

"""A PNG showing which image patches survive each pruning layer (Pillow only)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL = 336  # pixels per panel side
TITLE_H = 40
LEGEND_H = 44
GAP = 8
BACKGROUND = (255, 255, 255)
DIM = 0.22  # brightness left to a pruned patch
RECYCLED_CENTRE = (255, 140, 0)
RECYCLED_MEMBER = (120, 170, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType
        return ImageFont.load_default()


def square_view(image: Image.Image, side: int) -> Image.Image:
    """Shortest edge to `side`, centre crop: the square a CLIP-style processor sees."""
    image = image.convert("RGB")
    w, h = image.size
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - side) // 2, (nh - side) // 2
    return image.crop((left, top, left + side, top + side))


def fit_view(image: Image.Image, rows: int, cols: int, side: int) -> Image.Image:
    """The whole image resized to a rows x cols grid's aspect, its longer side `side`: what a
    Qwen2-VL-style processor sees (it resizes, it does not crop)."""
    scale = side / max(rows, cols)
    return image.convert("RGB").resize((round(cols * scale), round(rows * scale)), Image.Resampling.BICUBIC)


def grid_for(n_visual: int, grid: int | None = None) -> tuple[int, str]:
    """(g, note): the g x g grid drawn for n_visual visual tokens.

    A perfect square is drawn whole. Otherwise (LLaVA-NeXT: the base tile followed by
    high-resolution tiles and newline tokens) the first g*g visual tokens are drawn, with g the
    given grid or else the largest g with g*g <= n_visual, and the note says so.
    """
    if n_visual < 1:
        raise ValueError("the sample has no visual tokens to draw")
    root = math.isqrt(n_visual)
    if grid is None and root * root == n_visual:
        return root, ""
    g = grid if grid is not None else root
    if g < 1 or g * g > n_visual:
        raise ValueError(f"a {g}x{g} grid does not fit {n_visual} visual tokens")
    if g * g == n_visual:
        return g, ""
    return g, f"showing the first {g}x{g} of {n_visual} visual tokens (base image tile)"


def rect_grid_for(n_visual: int, rows: int, cols: int) -> str:
    """The note for a rows x cols grid drawn over the first rows * cols of n_visual tokens."""
    if rows < 1 or cols < 1 or rows * cols > n_visual:
        raise ValueError(f"a {rows}x{cols} grid does not fit {n_visual} visual tokens")
    if rows * cols == n_visual:
        return ""
    return f"showing the first {rows}x{cols} of {n_visual} visual tokens (first image)"


def _panel(base: Image.Image, rows: int, cols: int, bright: set[int], centres: set[int],
           members: set[int]) -> Image.Image:
    """The image with every patch outside `bright` dimmed; recycled patches outlined."""
    dark = Image.eval(base, lambda v: int(v * DIM))
    mask = Image.new("L", base.size, 0)
    md = ImageDraw.Draw(mask)
    cw, ch = base.size[0] / cols, base.size[1] / rows
    boxes = {}
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        boxes[p] = (round(c * cw), round(r * ch), round((c + 1) * cw) - 1, round((r + 1) * ch) - 1)
    for p in bright:
        md.rectangle(boxes[p], fill=255)
    out = Image.composite(base, dark, mask)
    d = ImageDraw.Draw(out)
    for p in members - centres:
        d.rectangle(boxes[p], outline=RECYCLED_MEMBER, width=1)
    for p in centres:
        d.rectangle(boxes[p], outline=RECYCLED_CENTRE, width=2)
    return out


def draw_kept_patches(image: Image.Image, trace_sample, out_path, grid: int | tuple[int, int] | None = None) -> Path:
    """Write a PNG: the input image, then one panel per pruning layer of `trace_sample`.

    image: the picture given to the model (a PIL image; it is shown as the square crop a
        CLIP-style processor takes, or whole with a (rows, cols) grid). trace_sample: a
        `SampleTrace` (visual_positions, pruning).
    In a layer's panel, bright patches are the visual tokens leaving that layer, dark ones were
    pruned by then; an orange box marks a recycled (merged) token, drawn at its centre patch,
    and thin blue boxes mark the patches merged into recycled tokens at that layer.
    grid: the side of the patch grid, for a sample whose visual token count is not a square;
        or (rows, cols), row-major tokens of a whole image resized to that grid (Qwen2-VL's merged
        patches), shown uncropped.
    Returns the path written.
    """
    positions = tuple(trace_sample.visual_positions)
    if isinstance(grid, tuple):
        rows, cols = grid
        note = rect_grid_for(len(positions), rows, cols)
        base = fit_view(image, rows, cols, PANEL)
    else:
        rows, note = grid_for(len(positions), grid)
        cols = rows
        base = square_view(image, PANEL)
    index = {pos: i for i, pos in enumerate(positions) if i < rows * cols}  # position -> patch

    def patches(pos_iter) -> set[int]:
        return {index[p] for p in pos_iter if p in index}

    panels = [(base, f"input: {len(positions)} visual tokens")]
    alive_centres: set[int] = set()  # positions of recycled tokens still present
    for rec in trace_sample.pruning:
        new_centres = {t.centre for t in rec.recycled}
        members = {m for t in rec.recycled for m in t.members}
        alive_centres = (alive_centres & set(rec.kept)) | new_centres
        bright = patches(rec.kept) | patches(new_centres)
        title = (f"after layer {rec.layer}: {rec.visual_after} tokens"
                 f" ({len(rec.kept)} kept + {len(rec.recycled)} recycled)")
        panels.append((_panel(base, rows, cols, bright, patches(alive_centres), patches(members)), title))

    width = len(panels) * PANEL + (len(panels) + 1) * GAP
    height = TITLE_H + PANEL + LEGEND_H + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(14), _font(12)
    for i, (panel, title) in enumerate(panels):
        x = GAP + i * (PANEL + GAP)
        sheet.paste(panel, (x + (PANEL - panel.size[0]) // 2, TITLE_H + (PANEL - panel.size[1]) // 2))
        draw.text((x, TITLE_H // 2 - 8), title, fill=(0, 0, 0), font=font)
    legend = ("bright: visual tokens kept after the layer; dark: pruned; orange box: recycled "
              "(merged) token at its centre patch; blue box: patch merged into a recycled token")
    y = TITLE_H + PANEL + 6
    draw.text((GAP, y), legend, fill=(40, 40, 40), font=small)
    if note:
        draw.text((GAP, y + 18), note, fill=(150, 0, 0), font=small)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return out_path

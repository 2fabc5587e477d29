"""Patch-level alignment targets for the projector: each visual token should look like the words
naming what covers its patch ("red" + "circle"), or "white" on the background; and its position
embedding should read as a coordinate along the words naming the directions ("left" to "right",
"above" to "below").

The scene generator knows what every patch shows, so the projector gets a dense, cheap training
signal that needs no pass through the language model; the question-answering loss then trains the
projector and adapters end to end.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .language import answer_token
from .scenes import IMAGE_SIZE, Scene, label_map

BACKGROUND_WORD = "white"
MIN_COVER = 0.25  # share of a patch an object must cover to name it
# (projector table, word at its first index, word at its last): columns run left to right, rows top to bottom
POSITION_AXES = (("rows", "above", "below"), ("cols", "left", "right"))


def patch_labels(scene: Scene, grid: int) -> torch.Tensor:
    """[grid * grid] int: per patch (row-major) the index of the object covering most of it, or -1."""
    labels = np.asarray(label_map(scene), dtype=np.int64)
    patch = IMAGE_SIZE // grid
    blocks = labels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = np.stack([(blocks == i + 1).sum(-1) for i in range(len(scene.objects))], axis=-1)
    best = counts.argmax(-1)
    covered = counts.max(-1) >= MIN_COVER * patch * patch
    return torch.from_numpy(np.where(covered, best, -1))


def word_targets(embeddings: torch.Tensor, scene: Scene, labels: torch.Tensor) -> torch.Tensor:
    """[N, D] target directions: the sum of the colour and shape word embeddings, or the background word's."""
    background = embeddings[answer_token(BACKGROUND_WORD)]
    per_object = [embeddings[answer_token(o.colour)] + embeddings[answer_token(o.shape)] for o in scene.objects]
    table = torch.stack([background, *per_object])
    return table[labels + 1]


def alignment_loss(tokens: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor,
                   background_weight: float = 0.25) -> torch.Tensor:
    """1 - cosine(token, target), averaged over object patches plus background_weight x over background ones."""
    distance = 1 - F.cosine_similarity(tokens, targets.to(tokens.dtype), dim=-1)
    on_object = labels >= 0
    loss = distance[~on_object].mean() * background_weight if (~on_object).any() else distance.new_zeros(())
    if on_object.any():
        loss = loss + distance[on_object].mean()
    return loss


def position_coordinates(table: torch.Tensor, axis: torch.Tensor, scale: torch.Tensor | float):
    """A table's ([G, D]) centred components along the unit axis [G], and their targets [G]: -scale .. +scale."""
    along = (table - table.mean(0)) @ (axis / axis.norm()).to(table.dtype)
    return along, scale * torch.linspace(-1.0, 1.0, table.shape[0], device=table.device, dtype=table.dtype)


def position_axes(embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per projector table ("rows", "cols"), its word direction [D]: its last word's embedding minus its
    first's, the column axis made orthogonal to the row axis (a row's embedding then moves no column coordinate)."""
    axes: dict[str, torch.Tensor] = {}
    for name, first, last in POSITION_AXES:
        axis = embeddings[answer_token(last)] - embeddings[answer_token(first)]
        for earlier in axes.values():
            axis = axis - (axis @ earlier) / (earlier @ earlier) * earlier
        axes[name] = axis
    return axes


@torch.no_grad()
def place_positions(rows: torch.Tensor, cols: torch.Tensor, embeddings: torch.Tensor, scale: float) -> None:
    """Set the row and column embeddings' components along their word axes to the targets, in place."""
    for name, axis in position_axes(embeddings).items():
        table = {"rows": rows, "cols": cols}[name]
        along, target = position_coordinates(table, axis, scale)
        table.add_((target - along)[:, None] * (axis / axis.norm()).to(table.dtype))


def position_alignment_loss(rows: torch.Tensor, cols: torch.Tensor, embeddings: torch.Tensor,
                            scale: torch.Tensor | float) -> torch.Tensor:
    """Mean squared error, in units of `scale`, between each row / column embedding's ([G, D], centred)
    component along the unit direction from its axis's first word to its last and a coordinate running
    linearly from -scale at the first index to +scale at the last. Other components are left free."""
    tables = {"rows": rows, "cols": cols}
    losses = []
    for name, axis in position_axes(embeddings).items():
        along, target = position_coordinates(tables[name], axis, scale)
        losses.append((((along - target) / scale) ** 2).mean())
    return torch.stack(losses).mean()

"""Tensor-parallel models: the attention heads of each layer split over the ranks of a process group.

Under tensor parallelism (transformers' `tp_plan`, or any colwise q/k/v + rowwise o_proj split)
each rank computes the rater queries and the per-head relevance of its own heads only. Scoring
those alone would let every rank keep different tokens, so a pruning layer gathers the per-head
relevance of every rank, [B, H_local, L] -> [B, H, L] in head order (one all-gather), and every
rank then selects from all H heads exactly as one process would: the same kept tokens on every
rank. Rank mode (v1) also all-reduces (sums) its rater rows P [B, R, L], each rank having weighted
its own heads with the head weights of all H heads.

A process without an initialised process group, or whose q_proj holds every head (data-parallel
replicas), gets no HeadShards and does no collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import UnsupportedModelError


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


@dataclass(frozen=True)
class HeadShards:
    """This rank's share of the attention heads: query heads [rank * local_heads, (rank + 1) *
    local_heads) of heads, over the ranks of group (world of them, in head order)."""

    group: object
    world: int
    rank: int
    heads: int
    local_heads: int

    def gather_heads(self, head_rel: torch.Tensor) -> torch.Tensor:
        """Per-head relevance of every rank: head_rel [B, H_local, L] -> [B, H, L] (one all-gather)."""
        batch, local, length = head_rel.shape
        if local != self.local_heads:
            raise ValueError(f"head_rel has {local} heads, this rank holds {self.local_heads}")
        out = head_rel.new_empty(self.world * batch, local, length)  # the ranks' shards, concatenated
        torch.distributed.all_gather_into_tensor(out, head_rel.contiguous(), group=self.group)
        return out.view(self.world, batch, local, length).transpose(0, 1).reshape(batch, self.heads, length)

    def local_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the head weights [B, H] -> [B, H_local]."""
        start = self.rank * self.local_heads
        return weights[:, start:start + self.local_heads].contiguous()

    def sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rater rows P [B, R, L] summed over the ranks (one all-reduce, in place)."""
        torch.distributed.all_reduce(rows, group=self.group)
        return rows


def local_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor parameter; any other tensor (or None) as it is."""
    if t is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return t
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def _mesh_group(model):
    """The tensor-parallel group of a model sharded by transformers with plain (non-DTensor) shards:
    its device mesh's "tp" dimension, its only dimension, or the default group."""
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh["tp"].get_group()
    return mesh.get_group() if mesh.ndim == 1 else None


def head_shards(model, attn, heads: int, head_dim: int) -> HeadShards | None:
    """How the attention module attn (its q_proj) splits the model's heads over the ranks, or None
    when this process holds them all. Host-only: reads the weight's type, shape and placements.
    Raises UnsupportedModelError for a split the engine cannot score exactly (a head cut between
    ranks, a multi-dimensional mesh)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    weight = getattr(getattr(attn, "q_proj", None), "weight", None)
    if weight is None:
        return None
    dtensor = _dtensor_type()
    if isinstance(weight, dtensor):
        mesh, placements = weight.device_mesh, tuple(weight.placements)
        if all(p.is_replicate() for p in placements):
            return None
        names = getattr(mesh, "mesh_dim_names", None) or ("tp",)
        if mesh.ndim != 1 or names[0] != "tp" or not (placements[0].is_shard() and placements[0].dim == 0):
            raise UnsupportedModelError(f"q_proj is sharded as {placements} over mesh dimensions {names}; a "
                                        "sparsified model supports tensor parallelism with q_proj split by rows "
                                        "(colwise) over one 'tp' (or unnamed) mesh dimension")
        group, rows = mesh.get_group(), weight.to_local().shape[0]
        rank = mesh.get_local_rank()
    else:
        rows = weight.shape[0]
        if weight.dim() != 2 or rows == heads * head_dim:
            return None  # every head here (data-parallel replicas), or a packed (quantised) weight
        group = _mesh_group(model)
        rank = torch.distributed.get_rank(group)
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return None
    if rows % head_dim or rows * world != heads * head_dim:
        if isinstance(weight, dtensor):
            raise UnsupportedModelError(f"q_proj holds {rows} of {heads * head_dim} rows on this rank of {world}: "
                                        f"the {heads} heads do not split evenly over the ranks")
        return None  # a plain weight of another shape (e.g. quantised): not a head split
    if rank != torch.distributed.get_rank(group):
        raise UnsupportedModelError("the tensor-parallel mesh does not list its ranks in process-group order")
    return HeadShards(group=group, world=world, rank=rank, heads=heads, local_heads=rows // head_dim)

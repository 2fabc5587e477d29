"""SPARSEVLM.md transcribed as directly as possible: one sample, no padding, Python lists, the full
eager attention matrix at every pruning layer. Slow and obvious on purpose; the engine must agree.
"""
from __future__ import annotations

import math
import sys

import torch

from sparsevlm_engine.schedule import schedule_counts

# Relative score gap required at every selection cut (kept | pruned, recycling candidates | rest):
# below it the answer depends on float summation order, which differs between CPUs and kernels
# (these fp32 scores differ from fp64 ones by up to 4.4e-6 relative; a gap moves by twice that).
MIN_MARGIN = 3e-5
# The decoder's query / key scale that gives the tiny models such gaps (tiny.py: qk_scale).
PEAKED_QK = 6.0


def _rotate(attn, q, k, cos, sin):
    """The attention's own RoPE: transformers 4.57 Qwen2-VL mixes the 3 mRoPE planes in the attention."""
    module = sys.modules[type(attn).__module__]
    if cos.dim() == 4:
        return module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, attn.rope_scaling["mrope_section"])
    return module.apply_rotary_pos_emb(q, k, cos, sin)


def _mrope_sections(config):
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("mrope_section")


def _layer0_input(model, inputs):
    """The layer-0 input [L, d] and each token's RoPE position: an int, or (t, h, w) under mRoPE."""
    captured = {}
    lm = model.model.language_model

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"])[0].float()

    def grab_positions(module, args, kwargs):
        pid = kwargs.get("position_ids")
        captured["pid"] = None if pid is None else pid[-3:, 0].T.tolist()

    handles = [lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)]
    if _mrope_sections(lm.config):
        handles.append(lm.register_forward_pre_hook(grab_positions, with_kwargs=True))
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    n = captured["h"].shape[0]
    ropes = [tuple(p) for p in captured["pid"]] if captured.get("pid") else list(range(n))
    return captured["h"], ropes


def _rope_ids(ropes):
    """position_ids for the rotary module: [1, n], or [3, 1, n] under mRoPE."""
    ids = torch.tensor([ropes])
    return ids.permute(2, 0, 1) if ids.dim() == 3 else ids


def choose_raters(h0, visual, instruction, last):
    """Section 1: softmax(V T^T) over text, mean over visual, keep s_t > mean(s)."""
    if not instruction:
        return [last]
    V, T = h0[visual], h0[instruction]
    M = torch.softmax(V @ T.T, dim=1)
    s = M.mean(0)
    raters = [t for t, score in zip(instruction, s.tolist()) if score > s.mean().item()]
    return raters or list(instruction)


def full_attention(layer, h, ropes, rotary_emb):
    """softmax(q k^T / sqrt(d) + causal) of every head: [H, n, n]."""
    attn = layer.self_attn
    x = layer.input_layernorm(h[None])
    n, hd = h.shape[0], attn.head_dim
    cos, sin = rotary_emb(x, _rope_ids(ropes))
    q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
    q, k = _rotate(attn, q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2))[0].float() / math.sqrt(hd)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def gravity(query, key, inv_freq, hd, sections=None):
    """All-ones query and key logit after RoPE; under mRoPE pair p turns with its section's axis."""
    if sections is None:
        axis_of, query, key = [0] * inv_freq.numel(), (query,), (key,)
    else:
        axis_of = [axis for axis, size in enumerate(sections) for _ in range(size)]
    g = sum(2 * math.cos((query[a] - key[a]) * th) for a, th in zip(axis_of, inv_freq.tolist())) / math.sqrt(hd)
    return math.copysign(max(abs(g), 1e-6), g) if g != 0 else 1e-6


def dpc_knn(x, c):
    """(centres, assign) of ranked_dpc_knn."""
    return ranked_dpc_knn(x, c)[:2]


def ranked_dpc_knn(x, c):
    """Section 4.2 with Python loops: (centres ascending, assign, centres by score highest first)."""
    n, d = x.shape
    dist = [[(x[i] - x[j]).norm().item() / math.sqrt(d) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]
    biggest = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        higher = [dist[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(higher) if higher else biggest)
    score = [r * dl for r, dl in zip(rho, delta)]
    by_score = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    centres = sorted(by_score)
    assign = []
    for i in range(n):
        if i in centres:
            assign.append(centres.index(i))
        else:
            assign.append(min(range(c), key=lambda k: (dist[i][centres[k]], k)))
    return centres, assign, by_score


def transcribe(model, inputs, config, pruning_layers):
    """Per pruning layer, one sample: the kept positions, recycled centre -> members, and the
    tokens after it in sequence order with the position ids the next layers give them.

    A token is named by its prompt position ("pos"; a recycled one by its centre's) and carries
    the position id its layer applies RoPE at ("rope": an int, or (t, h, w) under mRoPE). With
    positions="renumber" (section 5) the tokens left after a pruning layer take ids 0, 1, ... in
    sequence order, and the recycled ones follow the last kept visual token, highest centre
    score first; under mRoPE every id is kept (this project's rule). With "original" every id is
    kept and a recycled token sits at its centre's position."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0].tolist()
    visual_ids = {getattr(model.config, a, None) for a in ("image_token_id", "video_token_id")} - {None}
    visual0 = [p for p, t in enumerate(ids) if t in visual_ids]
    h, ropes = _layer0_input(model, inputs)
    sections = _mrope_sections(lm.config)
    first = visual0[0]
    instruction = [p for p in range(first + 1, len(ids)) if p not in visual0]
    raters = choose_raters(h, visual0, instruction, len(ids) - 1)
    tokens = [{"pos": p, "rope": ropes[p], "visual": p in visual0} for p in range(len(ids))]
    heads = lm.config.num_attention_heads
    results = []
    stage = 0
    with torch.no_grad():
        for index, layer in enumerate(lm.layers[: pruning_layers[-1] + 1]):
            positions = [t["rope"] for t in tokens]
            n = len(tokens)
            cos, sin = lm.rotary_emb(h[None], _rope_ids(positions))
            mask = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
            out = layer(h[None], attention_mask=mask, position_ids=None if sections else _rope_ids(positions),
                        position_embeddings=(cos, sin))
            out = (out[0] if isinstance(out, tuple) else out)[0]
            if index not in pruning_layers:
                h = out
                continue
            A = full_attention(layer, h, positions, lm.rotary_emb)
            rows = [i for i, t in enumerate(tokens) if t["pos"] in raters]
            vis = [i for i, t in enumerate(tokens) if t["visual"]]
            P = A[:, rows][:, :, vis]
            if config.rope_gravity:
                inv = lm.rotary_emb.inv_freq
                G = torch.tensor([[gravity(positions[r], positions[v], inv, layer.self_attn.head_dim, sections)
                                   for v in vis] for r in rows])
                P = P / G[None]
            head_ids = list(range(heads))
            if config.priority_heads:
                m = max(1, math.floor(config.priority_head_fraction * heads + 0.5))
                totals = P.sum((1, 2)).tolist()
                head_ids = sorted(range(heads), key=lambda hh: (-totals[hh], hh))[:m]
            P = P[head_ids].mean(0)
            rel = P.mean(0).tolist()
            present = len(vis)
            if config.mode == "schedule":
                counts = config.keep_counts or schedule_counts(config.schedule_budget, config.schedule, len(pruning_layers))
                keep = max(1, round(counts[stage] * len(visual0) / 576))
                keep = max(1, min(keep, present - 1))
            else:
                scale, bias = config.rank_coefficients
                rank = int(torch.linalg.matrix_rank(P.float()))
                keep = present if rank >= present else max(1, min(int(rank * scale + bias), present - 1))
            forced = [j for j, i in enumerate(vis) if tokens[i]["pos"] in raters]
            order = sorted(range(present), key=lambda j: (j not in forced, -rel[j], j))
            kept = sorted(order[:keep])
            pruned_order = [j for j in order[keep:]]
            n_cand = math.floor(config.recycle_ratio * len(pruned_order)) + 1
            cuts = [keep] + ([keep + n_cand] if config.recycling else [])
            margin = min(((rel[order[c - 1]] - rel[order[c]]) / abs(rel[order[c - 1]])
                         for c in cuts if c < present and order[c - 1] not in forced), default=math.inf)
            assert margin > MIN_MARGIN, f"layer {index}: scores tie at a selection cut ({margin:.1e}); sharpen the fixture"
            kept_slots = {vis[j] for j in kept}
            new_tokens = [(t, out[i]) for i, t in enumerate(tokens) if not t["visual"] or i in kept_slots]
            recycled, merged_tokens = [], []
            if config.recycling and pruned_order:
                cand = sorted(pruned_order[:n_cand])
                c = n_cand // config.cluster_divisor + 1
                centres, assign, by_score = ranked_dpc_knn(out[[vis[j] for j in cand]].float(), c)
                for centre in by_score:
                    k = centres.index(centre)
                    members = [cand[i] for i in range(len(cand)) if assign[i] == k]
                    merged = torch.stack([out[vis[j]].float() for j in members]).mean(0).to(out.dtype)
                    centre = tokens[vis[cand[centre]]]
                    centre_pos = centre["pos"]
                    merged_tokens.append(({"pos": centre_pos, "rope": centre["rope"], "visual": True}, merged))
                    recycled.append((centre_pos, tuple(tokens[vis[j]]["pos"] for j in members)))
            if config.positions == "renumber":
                last_visual = max(i for i, (t, _) in enumerate(new_tokens) if t["visual"])
                new_tokens[last_visual + 1:last_visual + 1] = merged_tokens
                if not sections:
                    new_tokens = [(dict(t, rope=p), v) for p, (t, v) in enumerate(new_tokens)]
            else:
                new_tokens = sorted(new_tokens + merged_tokens, key=lambda pair: pair[0]["pos"])
            results.append({"layer": index, "kept": tuple(tokens[vis[j]]["pos"] for j in kept),
                            "recycled": sorted(recycled), "recycled_order": tuple(p for p, _ in recycled),
                            "raters": sorted(raters), "tokens": tuple(t["pos"] for t, _ in new_tokens),
                            "position_ids": tuple(t["rope"] for t, _ in new_tokens)})
            tokens = [t for t, _ in new_tokens]
            h = torch.stack([v for _, v in new_tokens])
            stage += 1
    return results

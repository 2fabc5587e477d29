"""Train the lab VLM's projector and low-rank adapters on the scene-VQA train split.

    python -m sparsevlm_engine.lab.train [--minutes M] [--questions-per-kind 2] [--extra-questions relation=2]
                                         [--resume W] [--out W]

The vision tower and SmolLM2 stay frozen; the projector and low-rank adapters on the attention
projections train. Scenes come from the generator's own seeded stream ("train-run:<seed>:<images
seen>"), apart from the validation and test splits. Each image is encoded once and asked up to
--questions-per-kind questions of every kind it supports: the shared prefix (system prompt and
576 visual tokens) runs once, its cache is repeated per question, and the questions run as one
batch, so a step costs little more than one prefill and its backward. It runs in bf16 autocast
(--precision fp32 to turn it off); the default budget is 15 minutes on a CUDA GPU, 60 on a CPU.
With --position-weight, the row and column embeddings are first placed along the word axes
above-below and left-right (a coordinate of +-(--position-share) x an object token's norm at the
edges) and a loss keeps them there. Stops after --steps images or --minutes, saving the weights
(and a checkpoint every --save-every images); the learning rate decays linearly to a tenth over
the budget.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import lora
from .evaluate import dense_accuracy
from .language import answer_token, prompt_pieces
from .model import WEIGHTS, LabVLM, build_lab_vlm, save_lab_vlm
from .efficientnet import preprocess
from .alignment import alignment_loss, patch_labels, place_positions, position_alignment_loss, word_targets
from .scenes import KINDS, make_scene, questions_for_scene, render


def question_batch(questions, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded text after the image [K, S], its mask [K, S], last real index [K], answer ids [K]."""
    suffixes = [prompt_pieces(q.text)[1] for q in questions]
    width = max(len(s) for s in suffixes)
    ids = torch.zeros(len(suffixes), width, dtype=torch.long)
    mask = torch.zeros(len(suffixes), width, dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    last = mask.sum(-1) - 1
    answers = torch.tensor([answer_token(q.answer) for q in questions])
    return ids.to(device), mask.to(device), last.to(device), answers.to(device)


def patch_features(model: LabVLM, scenes, device) -> torch.Tensor:
    """Frozen EfficientNet-Lite0 features [B, 112, 24, 24] of the rendered scenes."""
    with torch.no_grad():
        return model.model.vision.features(preprocess([render(s) for s in scenes]).to(device))


def scenes_alignment_loss(model: LabVLM, scenes, content: torch.Tensor) -> torch.Tensor:
    """Mean alignment loss of the projector's content tokens [B, G*G, D] for the scenes."""
    embeddings = model.model.language_model.embed_tokens.weight
    losses = []
    for scene, tokens in zip(scenes, content):
        labels = patch_labels(scene, model.config.grid).to(tokens.device)
        losses.append(alignment_loss(tokens, word_targets(embeddings, scene, labels), labels))
    return torch.stack(losses).mean()


def align(model: LabVLM, rng: random.Random, steps: int, batch: int, lr: float, device) -> float:
    """Train the projector alone on the alignment loss; returns the last loss."""
    projector = model.model.projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for step in range(steps):
        scenes = [make_scene(rng) for _ in range(batch)]
        loss = scenes_alignment_loss(model, scenes, projector.content(patch_features(model, scenes, device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"align step {step + 1}, loss {loss.item():.3f}", flush=True)
    return float(loss.detach())


def position_scale(model: LabVLM, share: float, device, scenes: int = 8) -> float:
    """share x the mean norm of the projector's content tokens on object patches, over a fixed set of scenes."""
    rng = random.Random("position-scale")
    drawn = [make_scene(rng) for _ in range(scenes)]
    with torch.no_grad():
        content = model.model.projector.content(patch_features(model, drawn, device))
    norms = [tokens[patch_labels(scene, model.config.grid).to(tokens.device) >= 0].norm(dim=-1)
             for scene, tokens in zip(drawn, content)]
    return share * float(torch.cat(norms).mean())


def image_loss(model: LabVLM, scene, questions, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the answers to several questions about one scene, and its alignment loss."""
    from transformers import DynamicCache

    config = model.config
    before = prompt_pieces(questions[0].text)[0]
    prefix = torch.tensor([before + [config.image_token_id] * config.num_visual_tokens], device=device)
    content = model.model.projector.content(patch_features(model, [scene], device))
    visual = content + model.model.projector.where()
    cache = DynamicCache()
    model.model(input_ids=prefix, visual_embeds=visual, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(len(questions))
    ids, mask, last, answers = question_batch(questions, device)
    width = prefix.shape[1]
    full_mask = torch.cat([torch.ones(len(questions), width, dtype=torch.long, device=device), mask], dim=1)
    positions = (width + torch.arange(ids.shape[1], device=device)).expand_as(ids)
    hidden = model.model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).last_hidden_state
    logits = model.lm_head(hidden[torch.arange(len(questions), device=device), last])
    return F.cross_entropy(logits.float(), answers), scenes_alignment_loss(model, [scene], content)


def scene_questions(scene, rng, per_kind: int, extra: dict[str, int] | None = None):
    """Up to per_kind distinct questions of every kind the scene supports, plus extra[kind] more
    of the kinds named there (weighting the hard ones, e.g. {"relation": 2})."""
    chosen = {}
    for _ in range(per_kind):
        for question in questions_for_scene(scene, rng):
            chosen.setdefault(question.text, question)
    for kind, count in (extra or {}).items():
        for _ in range(count):
            for question in questions_for_scene(scene, rng, (kind,)):
                chosen.setdefault(question.text, question)
    return list(chosen.values())


def kind_counts(text: str) -> dict[str, int]:
    """"relation=2,count=1" -> {"relation": 2, "count": 1}; ValueError naming a bad entry."""
    counts = {}
    for entry in filter(None, text.split(",")):
        kind, _, count = entry.partition("=")
        if kind not in KINDS or not count.isdigit():
            raise ValueError(f"--extra-questions entry {entry!r} must be KIND=N with KIND one of {', '.join(KINDS)}")
        counts[kind] = int(count)
    return counts


def resume(model: LabVLM, adapters: dict, path: Path) -> int:
    """Load saved projector and adapter weights into a model being trained; returns the images seen."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.model.projector.load_state_dict({k: v.float() for k, v in saved["projector"].items()})
    with torch.no_grad():
        for name, adapter in adapters.items():
            adapter.down.copy_(saved["adapters"][f"{name}.down"].float())
            adapter.up.copy_(saved["adapters"][f"{name}.up"].float())
    return int(saved.get("meta", {}).get("images", 0))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_lab_vlm().to(device)
    adapters = lora.attach(model.model.language_model, model.config.lora_targets, model.config.lora_rank,
                           model.config.lora_alpha) if args.lora else {}
    seen_before = resume(model, adapters, Path(args.resume)) if args.resume else 0
    rng = random.Random(f"train-run:{args.seed}:{seen_before}")  # a resumed run draws new scenes
    model.to(device)
    if args.align_steps:
        align(model, rng, args.align_steps, args.align_batch, args.lr, device)
    projector = model.model.projector
    embeddings = model.model.language_model.embed_tokens.weight
    coordinate_scale = position_scale(model, args.position_share, device) if args.position_weight else 0.0
    if args.position_weight:
        place_positions(projector.rows, projector.cols, embeddings, coordinate_scale)
        print(f"row and column embeddings placed along their word axes, scale {coordinate_scale:.2f}", flush=True)
    projector_params = list(projector.parameters())
    adapter_params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.AdamW([{"params": projector_params, "lr": args.lr},
                                   {"params": adapter_params, "lr": args.lora_lr}], weight_decay=0.0)
    bases = [group["lr"] for group in optimizer.param_groups]
    out = Path(args.out)
    start, history, losses, align_losses = time.time(), [], [], []
    step = 0
    while step < args.steps and time.time() - start < args.minutes * 60:
        progress = max(step / args.steps, (time.time() - start) / (args.minutes * 60))
        scale = min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * (1 - progress))
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * scale
        scene = make_scene(rng)
        questions = scene_questions(scene, rng, args.questions_per_kind, args.extra_questions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            answer_loss, align_loss = image_loss(model, scene, questions, device)
            loss = answer_loss + args.align_weight * align_loss
            if args.position_weight:
                loss = loss + args.position_weight * position_alignment_loss(
                    projector.rows, projector.cols, embeddings, coordinate_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector_params + adapter_params, 1.0)
        optimizer.step()
        losses.append(answer_loss.item())
        align_losses.append(align_loss.item())
        step += 1
        if step % args.log_every == 0:
            recent = slice(-args.log_every, None)
            print(f"step {step} images, {time.time() - start:.0f}s, answer loss "
                  f"{sum(losses[recent]) / args.log_every:.3f}, alignment loss "
                  f"{sum(align_losses[recent]) / args.log_every:.3f}", flush=True)
        evaluating = bool(args.eval_every) and step % args.eval_every == 0
        if step % args.save_every == 0 or evaluating:
            save_lab_vlm(model, adapters, out, {"images": seen_before + step, "seconds": time.time() - start})
        if evaluating:
            accuracy = dense_accuracy(model, "validation", args.eval_examples, device)
            history.append({"images": seen_before + step, "seconds": round(time.time() - start),
                            "validation_accuracy": accuracy})
            print(f"  validation accuracy on {args.eval_examples}: {accuracy:.3f}", flush=True)
    meta = {"images": seen_before + step, "resumed_after": seen_before,
            "questions_per_kind": args.questions_per_kind, "extra_questions": args.extra_questions,
            "seconds": round(time.time() - start),
            "device": str(device), "precision": args.precision, "seed": args.seed, "align_steps": args.align_steps,
            "align_batch": args.align_batch, "align_weight": args.align_weight,
            "position_weight": args.position_weight, "position_scale": coordinate_scale,
            "lr": args.lr, "lora_lr": args.lora_lr,
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "history": history}
    save_lab_vlm(model, adapters, out, meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}))
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--steps", type=int, default=100_000, help="images to train on (at most)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget (default 15 on a CUDA GPU, 60 on a CPU)")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="adapter learning rate")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="train the projector only")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--align-steps", type=int, default=300,
                        help="projector-only steps on the patch alignment loss before question answering")
    parser.add_argument("--align-batch", type=int, default=16)
    parser.add_argument("--align-weight", type=float, default=0.5, help="alignment loss weight while answering")
    parser.add_argument("--position-weight", type=float, default=0.0,
                        help="weight of the loss keeping the row / column embeddings along the words "
                             "above-below / left-right (they are placed there first); 0: off")
    parser.add_argument("--position-share", type=float, default=0.15,
                        help="position coordinates reach +-share x the mean norm of object patches' content tokens")
    parser.add_argument("--questions-per-kind", type=int, default=1, help="questions per kind and image")
    parser.add_argument("--extra-questions", type=kind_counts, default={},
                        help='more questions per image of some kinds, e.g. "relation=2,count=1"')
    parser.add_argument("--resume", default=None, help="weights to continue from (projector and adapters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="autocast precision of the forward and backward (bf16 also on CPUs: AMX makes it ~3x faster)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200, help="0: never")
    parser.add_argument("--eval-examples", type=int, default=50)
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 15.0 if args.device.startswith("cuda") else 60.0
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

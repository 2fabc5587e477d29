"""Train the lab VLM's projector and low-rank adapters on the scene-VQA train split.

    python -m sparsevlm_engine.lab.train [--minutes 60] [--out sparsevlm_engine/lab/weights/lab_vlm.pt]

The vision tower and SmolLM2 stay frozen. Each image is encoded once and asked one question of
every possible kind: the shared prefix (system prompt and 576 visual tokens) runs once, its
cache is repeated per question, and the questions run as one batch, so a CPU step costs little
more than one prefill and its backward. Stops after --steps images or --minutes, saving the
weights (and a checkpoint every --save-every images).
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
from .scenes import make_scene, questions_for_scene, render


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


def image_loss(model: LabVLM, image, questions, device) -> torch.Tensor:
    """Mean cross-entropy of the answers to several questions about one image."""
    from transformers import DynamicCache

    config = model.config
    before = prompt_pieces(questions[0].text)[0]
    prefix = torch.tensor([before + [config.image_token_id] * config.num_visual_tokens], device=device)
    visual = model.model.visual_embeddings(preprocess([image]).to(device))
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
    return F.cross_entropy(logits.float(), answers)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(f"train-run:{args.seed}")
    device = torch.device(args.device)
    model = build_lab_vlm().to(device)
    adapters = lora.attach(model.model.language_model, model.config.lora_targets, model.config.lora_rank,
                           model.config.lora_alpha) if args.lora else {}
    model.to(device)
    projector_params = list(model.model.projector.parameters())
    adapter_params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.AdamW([{"params": projector_params, "lr": args.lr},
                                   {"params": adapter_params, "lr": args.lora_lr}], weight_decay=0.0)
    bases = [group["lr"] for group in optimizer.param_groups]
    out = Path(args.out)
    start, history, losses = time.time(), [], []
    step = 0
    while step < args.steps and time.time() - start < args.minutes * 60:
        progress = max(step / args.steps, (time.time() - start) / (args.minutes * 60))
        scale = min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * (1 - progress))
        for group, base in zip(optimizer.param_groups, bases):
            group["lr"] = base * scale
        scene = make_scene(rng)
        questions = questions_for_scene(scene, rng)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = image_loss(model, render(scene), questions, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector_params + adapter_params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            print(f"step {step} images, {time.time() - start:.0f}s, loss {sum(losses[-args.log_every:]) / args.log_every:.3f}",
                  flush=True)
        if step % args.save_every == 0 or step % args.eval_every == 0:
            save_lab_vlm(model, adapters, out, {"images": step, "seconds": time.time() - start})
        if args.eval_every and step % args.eval_every == 0:
            accuracy = dense_accuracy(model, "validation", args.eval_examples, device)
            history.append({"images": step, "seconds": round(time.time() - start), "validation_accuracy": accuracy})
            print(f"  validation accuracy on {args.eval_examples}: {accuracy:.3f}", flush=True)
    meta = {"images": step, "questions_per_image": "one per possible kind", "seconds": round(time.time() - start),
            "device": str(device), "seed": args.seed, "lr": args.lr, "lora_lr": args.lora_lr,
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "history": history}
    save_lab_vlm(model, adapters, out, meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}))
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--steps", type=int, default=100_000, help="images to train on (at most)")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="adapter learning rate")
    parser.add_argument("--no-lora", dest="lora", action="store_false", help="train the projector only")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200, help="0: never")
    parser.add_argument("--eval-examples", type=int, default=50)
    args = parser.parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The lab VLM: frozen EfficientNet-Lite0 -> trained projector -> SmolLM2-135M-Instruct (+ merged adapters).

Its structure follows the Hugging Face VLMs the engine supports: `LabVLM.model` receives
input_ids with one `image_token_id` placeholder per visual token and calls
`LabVLM.model.language_model`, a Llama decoder; the visual features replace the placeholders'
embeddings. 384 px images give a 24 x 24 stride-16 feature map: 576 visual tokens, as LLaVA-1.5.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import lora
from .efficientnet import load_efficientnet_lite0, preprocess
from .language import answer_token, load_language_model, load_tokenizer, prompt_pieces

WEIGHTS = Path(__file__).parent / "weights" / "lab_vlm.pt"


@dataclass
class LabVLMConfig:
    """What the engine and the loaders read. text_config is SmolLM2's LlamaConfig."""

    text_config: object = None
    image_token_id: int = 49152  # one past SmolLM2's vocabulary: never a text token
    vision_channels: int = 112
    grid: int = 24
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    model_type: str = field(default="sparsevlm_lab", init=False)

    @property
    def num_visual_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def _attn_implementation(self) -> str:
        return self.text_config._attn_implementation


class Projector(nn.Module):
    """Stride-16 features [B, C, G, G] -> visual embeddings [B, G*G, D], with learned row / column embeddings."""

    def __init__(self, channels: int, hidden: int, grid: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.rows = nn.Parameter(torch.zeros(grid, hidden))
        self.cols = nn.Parameter(torch.zeros(grid, hidden))

    def content(self, features: torch.Tensor) -> torch.Tensor:
        """[B, G*G, D]: what each patch shows, before its position is added."""
        return self.fc2(F.gelu(self.fc1(self.norm(features.flatten(2).transpose(1, 2)))))

    def where(self) -> torch.Tensor:
        """[G*G, D]: the row-major patch position embeddings."""
        return (self.rows[:, None, :] + self.cols[None, :, :]).flatten(0, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.content(features) + self.where()


class LabVLMModel(nn.Module):
    """Vision tower, projector and the Llama decoder; forward returns the decoder's output."""

    def __init__(self, config: LabVLMConfig, vision: nn.Module, language_model: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = Projector(config.vision_channels, config.text_config.hidden_size, config.grid)
        self.language_model = language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed_tokens

    def visual_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 384, 384] (see `preprocess`) -> [B, 576, D]."""
        with torch.no_grad():
            features = self.vision.features(pixel_values)
        return self.projector(features)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, visual_embeds: torch.Tensor | None = None):
        placeholders = input_ids == self.config.image_token_id
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(placeholders, 0))
        per_sample = placeholders.sum(-1)
        if bool(per_sample.any()):
            if visual_embeds is None:
                if pixel_values is None:
                    raise ValueError("the prompt has image placeholders but no pixel_values were given")
                visual_embeds = self.visual_embeddings(pixel_values)
            if visual_embeds.shape[:2] != (input_ids.shape[0], self.config.num_visual_tokens) or \
                    bool((per_sample != self.config.num_visual_tokens).any()):
                raise ValueError(f"each prompt needs exactly {self.config.num_visual_tokens} image placeholders "
                                 f"and one image; got {per_sample.tolist()} and {tuple(visual_embeds.shape)}")
            embeds = embeds.masked_scatter(placeholders[..., None], visual_embeds.to(embeds.dtype))
        if position_ids is None:
            position_ids = _positions(attention_mask, input_ids, past_key_values)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache)


def _positions(attention_mask, input_ids, cache) -> torch.Tensor:
    """Position ids [B, q] that skip left padding."""
    q_len = input_ids.shape[1]
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        return torch.arange(past, past + q_len, device=input_ids.device).expand(input_ids.shape[0], q_len)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


class LabVLM(nn.Module):
    """The lab VLM with its head: logits over SmolLM2's vocabulary."""

    generation_config = None  # `generate` below is greedy and takes its settings as arguments

    def __init__(self, config: LabVLMConfig, vision: nn.Module, language: nn.Module):
        super().__init__()
        self.config = config
        self.model = LabVLMModel(config, vision, language.model)
        self.lm_head = language.lm_head

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 1, **kwargs):
        """Logits [B, logits_to_keep, V] of the last positions, and the cache when use_cache."""
        output = self.model(input_ids=input_ids, **kwargs)
        logits = self.lm_head(output.last_hidden_state[:, -logits_to_keep:])
        return logits, output.past_key_values

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 8,
                 do_sample: bool = False) -> torch.Tensor:
        """Greedy decoding with a DynamicCache: the prompt followed by the new tokens [B, L + <= max_new_tokens]."""
        from transformers import DynamicCache

        if do_sample:
            raise ValueError("the lab VLM decodes greedily only")
        eos = load_tokenizer().eos_token_id
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        cache = DynamicCache()
        logits, cache = self(input_ids, pixel_values=pixel_values, attention_mask=mask, past_key_values=cache,
                             use_cache=True)
        new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1).masked_fill(done, eos)
            new.append(token)
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = self(token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)


def build_lab_vlm(attn_implementation: str = "sdpa", config: LabVLMConfig | None = None) -> LabVLM:
    """The lab VLM with an untrained projector and no adapters (for training)."""
    language = load_language_model(attn_implementation)
    config = config or LabVLMConfig()
    config.text_config = language.config
    model = LabVLM(config, load_efficientnet_lite0(), language)
    return model.eval()


def load_lab_vlm(weights: Path | str = WEIGHTS, attn_implementation: str = "sdpa") -> LabVLM:
    """The trained lab VLM: projector loaded, adapters merged into the decoder; everything frozen."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"lab VLM weights not found at {weights}; train them with "
                                "`python -m sparsevlm_engine.lab.train`")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    config = LabVLMConfig(**saved["config"])
    model = build_lab_vlm(attn_implementation, config)
    model.model.projector.load_state_dict({k: v.float() for k, v in saved["projector"].items()})
    if saved["adapters"]:
        lora.merge(model.model.language_model, saved["adapters"], config.lora_targets, config.lora_rank,
                   config.lora_alpha)
    return model.requires_grad_(False)


def save_lab_vlm(model: LabVLM, adapters: dict, path: Path | str, meta: dict | None = None) -> None:
    """Projector and adapter weights (float16) with the config that rebuilds them."""
    c = model.config
    state = {
        "config": {"image_token_id": c.image_token_id, "vision_channels": c.vision_channels, "grid": c.grid,
                   "lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_targets": tuple(c.lora_targets)},
        "projector": {k: v.detach().half() for k, v in model.model.projector.state_dict().items()},
        "adapters": {k: v.half() for k, v in lora.adapter_state(adapters).items()},
        "meta": meta or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, L], left-padded
    attention_mask: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor    # [B, 3, 384, 384]


def encode(model_config: LabVLMConfig, questions: list[str], images) -> Batch:
    """Left-padded prompts `<image tokens>\\n{question} Answer with one word.` with their images."""
    rows = []
    for question in questions:
        before, after = prompt_pieces(question)
        rows.append(before + [model_config.image_token_id] * model_config.num_visual_tokens + after)
    length = max(len(r) for r in rows)
    pad = load_tokenizer().pad_token_id or 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return Batch(input_ids, attention_mask, preprocess(list(images)))


__all__ = ["LabVLM", "LabVLMConfig", "build_lab_vlm", "load_lab_vlm", "save_lab_vlm", "encode", "answer_token",
           "WEIGHTS"]

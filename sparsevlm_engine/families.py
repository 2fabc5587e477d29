"""Model families the engine knows: where their decoder is and how they mark visual tokens."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not one of the supported families."""


@dataclass(frozen=True)
class Family:
    """One supported family.

    name: readable name; model_type: config.model_type; model_class: the transformers class
    that loads a checkpoint of the family; visual_token_attrs: config attributes
    holding the token ids of visual placeholders (image, video).
    """

    name: str
    model_type: str
    model_class: str
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives input_ids and calls the language model."""
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            return inner
        if hasattr(model, "language_model"):
            return model
        raise UnsupportedModelError(f"{type(model).__name__} has no language_model to sparsify")

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder: has .layers and .rotary_emb."""
        decoder = self.multimodal_model(model).language_model
        if not hasattr(decoder, "layers"):
            decoder = getattr(decoder, "model", decoder)
        if not hasattr(decoder, "layers"):
            raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")
        return decoder

    def visual_token_ids(self, config) -> list[int]:
        ids = []
        for attr in self.visual_token_attrs:
            value = getattr(config, attr, None)
            if value is not None:
                ids.append(int(value))
        if not ids:
            raise UnsupportedModelError(f"{self.name}: the config names no visual token id")
        return ids

    def visual_mask(self, model: nn.Module, input_ids: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """[B, L] bool: the visual placeholder positions of the prompt."""
        ids = self.visual_token_ids(model.config)
        if input_ids is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token in ids:
                mask |= input_ids == token
            return mask
        embed = self.multimodal_model(model).get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for token in ids:
            ref = embed(torch.tensor(token, device=inputs_embeds.device)).to(inputs_embeds.dtype)
            mask |= (inputs_embeds == ref).all(-1)
        return mask


def rotary_functions(attention: nn.Module):
    """The apply_rotary_pos_emb the attention module's own file uses."""
    module = sys.modules[type(attention).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise UnsupportedModelError(f"{type(attention).__name__}: no apply_rotary_pos_emb in {module.__name__}")
    return fn


FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5 (LlavaForConditionalGeneration)", "llava", "LlavaForConditionalGeneration"),
    "llava_next": Family("LLaVA-NeXT (LlavaNextForConditionalGeneration)", "llava_next",
                         "LlavaNextForConditionalGeneration"),
}


def family_of(model: nn.Module) -> Family:
    """The family of a model, or UnsupportedModelError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f.name for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"SparseVLM does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported families: {supported}"
        )
    return FAMILIES[model_type]

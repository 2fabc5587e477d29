"""Model families the engine knows: where their decoder is and how they mark visual tokens."""
from __future__ import annotations

import inspect
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
    holding the token ids of visual placeholders (image, video); mrope: whether the decoder
    uses multimodal RoPE (3-D position ids, Qwen2-VL); hf_checkpoint: whether `sparsevlm generate`
    loads it from a Hugging Face checkpoint folder (the lab VLM is built in code).
    """

    name: str
    model_type: str
    model_class: str
    visual_token_attrs: tuple[str, ...] = ("image_token_id",)
    mrope: bool = False
    hf_checkpoint: bool = True

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

    def mrope_sections(self, text_config) -> tuple[int, ...] | None:
        """Frequency pairs per mRoPE axis (t, h, w), or None for 1-D RoPE."""
        if not self.mrope:
            return None
        params = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        sections = params.get("mrope_section")
        if not sections:
            raise UnsupportedModelError(f"{self.name}: the text config names no mrope_section")
        return tuple(int(s) for s in sections)

    def check_positions(self, model: nn.Module, kwargs: dict) -> None:
        """Raise unless an mRoPE prefill with visual tokens will get its grids and 3-D position ids.

        The vision tower needs image_grid_thw with pixel_values (video_grid_thw with
        pixel_values_videos), position_ids or not. The model computes the 3-D position ids from
        input_ids and those grids (and, in transformers 5, mm_token_type_ids); without them it,
        or generate, silently falls back to 1-D positions. Explicit position_ids are trusted
        unless token types are missing.
        """
        if not self.mrope:
            return
        grids = [f"{grid} with {pixels}" for pixels, grid in (("pixel_values", "image_grid_thw"),
                                                               ("pixel_values_videos", "video_grid_thw"))
                 if kwargs.get(pixels) is not None and kwargs.get(grid) is None]
        missing = []
        has_ids = kwargs.get("input_ids") is not None
        rope_index = getattr(self.multimodal_model(model), "get_rope_index", None)
        if (has_ids and rope_index is not None and "mm_token_type_ids" in inspect.signature(rope_index).parameters
                and kwargs.get("mm_token_type_ids") is None):
            missing.append("mm_token_type_ids (returned by the processor with input_ids)")
        if kwargs.get("position_ids") is None:
            if not has_ids:
                missing.append("input_ids")
            if kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None and not grids:
                missing.append("image_grid_thw or video_grid_thw")
        problems = [f"the vision tower needs {', '.join(grids)}"] if grids else []
        if missing:
            problems.append(f"the model would not get their 3-D mRoPE position ids: pass {', '.join(missing)}, "
                            "or position_ids [3, B, L]")
        if problems:
            raise ValueError(f"{self.name}: the prompt has visual tokens but {'; '.join(problems)}")


def rope_rows(rope: torch.Tensor, sections: tuple[int, ...] | None) -> torch.Tensor:
    """cos or sin as the rows [B, L, D] the attention multiplies by.

    transformers 4.57 hands Qwen2-VL layers one plane per mRoPE axis, [3, B, L, D], and mixes
    them inside the attention; transformers 5 mixes them in the rotary module.
    """
    if rope.dim() == 3:
        return rope
    return torch.cat([part[i % 3] for i, part in enumerate(rope.split(list(sections) * 2, dim=-1))], dim=-1)


def rotary_functions(attention: nn.Module):
    """apply_rotary_pos_emb(q, k, cos [B, L, D], sin [B, L, D]) for the attention's rows."""
    module = sys.modules[type(attention).__module__]
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None and hasattr(module, "apply_multimodal_rotary_pos_emb"):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    if fn is None:
        raise UnsupportedModelError(f"{type(attention).__name__}: no apply_rotary_pos_emb in {module.__name__}")
    return fn


FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5 (LlavaForConditionalGeneration)", "llava", "LlavaForConditionalGeneration"),
    "llava_next": Family("LLaVA-NeXT (LlavaNextForConditionalGeneration)", "llava_next",
                         "LlavaNextForConditionalGeneration"),
    "qwen2_vl": Family("Qwen2-VL (Qwen2VLForConditionalGeneration)", "qwen2_vl", "Qwen2VLForConditionalGeneration",
                       ("image_token_id", "video_token_id"), mrope=True),
    "qwen2_5_vl": Family("Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)", "qwen2_5_vl",
                         "Qwen2_5_VLForConditionalGeneration", ("image_token_id", "video_token_id"), mrope=True),
}


def register_family(family: Family) -> Family:
    """Add a family to FAMILIES under its model_type (an add-on, such as sparsevlm_engine.lab, calls
    it when imported). Registering the same family again is a no-op; another family under a
    model_type already taken raises ValueError."""
    known = FAMILIES.setdefault(family.model_type, family)
    if known != family:
        raise ValueError(f"model_type {family.model_type!r} is already registered as {known.name}")
    return family


def family_of(model: nn.Module) -> Family:
    """The registered family of a model, or UnsupportedModelError naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f.name for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"SparseVLM does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported families: {supported}"
        )
    return FAMILIES[model_type]

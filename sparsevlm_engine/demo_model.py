"""An offline, random-weight LLaVA-1.5 lookalike for the demo and the tests.

It has LLaVA-1.5's visual geometry (a 336 px CLIP tower with 14 px patches, so 576 visual
tokens, and a 32-layer Llama decoder, so the default pruning layers 2 / 6 / 15 apply) but tiny
widths, so a prefill takes milliseconds on a CPU. Its weights are random: the text it
generates is meaningless. The tokenizer is a word-level one built in memory.
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from PIL import Image

from .heatmap import square_view

IMAGE_SIZE = 336
PATCH_SIZE = 14
N_VISUAL = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
DEFAULT_PROMPT = "USER: <image>\nWhat is the colour of the square? ASSISTANT:"

_WORDS = """
user assistant system a an the this that these those it its is are was were be been being
there here what which who whom whose where when why how many much some any all each every
no not yes and or but if then so of in on at to from by with without for about above below
left right top bottom middle centre center corner side front back behind next near far over
under between inside outside image picture photo scene shows show see seen look looks
colour color colours colors red green blue yellow orange purple pink black white grey gray
brown dark light bright square squares circle circles triangle triangles rectangle line lines
shape shapes object objects background foreground small large big little tall short wide
one two three four five six seven eight nine ten number count describe detail details
do does did can could would should will please answer question briefly word words i you we
they he she me my your our their has have had made kind type same different other than
""".split()
_PUNCTUATION = list(".,:;?!'\"()-") + [str(d) for d in range(10)]


def word_tokenizer(special_tokens, extra_words=()):
    """A `tokenizers.Tokenizer` over the special tokens, then a few hundred lower-cased words.

    Unknown words map to "<unk>" (which must be among the special tokens).
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for word in list(dict.fromkeys(_WORDS)) + _PUNCTUATION + list(extra_words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    tok.add_special_tokens(list(special_tokens))
    return tok


def build_demo_tokenizer():
    """A `PreTrainedTokenizerFast` over a few hundred lower-cased words, built offline.

    Unknown words map to "<unk>"; "<image>" is a special token; a "<s>" is prepended.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = word_tokenizer(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def demo_config(tokenizer, depth: int = 32):
    """A `LlavaConfig` with LLaVA-1.5's geometry (576 visual tokens) and tiny widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=N_VISUAL,
    )
    # transformers 5 reads image_token_id, 4.57 image_token_index; both exist as aliases there,
    # but set both so neither version falls back to LLaVA's real id (32000).
    config.image_token_id = config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_demo_llava(seed: int = 0, dtype: torch.dtype = torch.float32, depth: int = 32,
                     attn_implementation: str = "sdpa"):
    """(model, tokenizer): a random-weight `LlavaForConditionalGeneration` in eval mode.

    The global RNG is left as it was; `seed` alone fixes the weights.
    """
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, depth=depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.do_sample = False
    return model, tokenizer


def preprocess_image(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """CLIP preprocessing without torchvision: pixel_values [1, 3, size, size], float32.

    Shortest edge resized to `size` (bicubic) and centre-cropped (a plain resize for a square
    image), scaled to [0, 1], normalised with the CLIP mean and std.
    """
    x = np.asarray(square_view(image, size), dtype=np.float32) / 255.0  # [H, W, 3]
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).contiguous()


def demo_inputs(tokenizer, image: Image.Image, prompt: str = DEFAULT_PROMPT) -> dict:
    """Model inputs for one prompt with one "<image>": the image token is expanded to 576.

    Returns input_ids [1, L] and attention_mask [1, L] (int64) and pixel_values [1, 3, 336, 336].
    """
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = tokenizer(prompt)["input_ids"]
    n_images = ids.count(image_id)
    if n_images != 1:
        raise ValueError(f"the prompt must contain exactly one '<image>', found {n_images}: {prompt!r}")
    at = ids.index(image_id)
    ids = ids[:at] + [image_id] * N_VISUAL + ids[at + 1:]
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": preprocess_image(image),
    }


def build_demo_processor(tokenizer):
    """A `LlavaProcessor` (CLIP image processor + the demo tokenizer) that expands "<image>" to 576."""
    import transformers

    # transformers 5 names the torchvision-free CLIP processor CLIPImageProcessorPil.
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_cls(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        image_token="<image>",
    )


def save_demo_checkpoint(path, seed: int = 0, depth: int = 32) -> None:
    """Save the demo model and a matching processor as a local Hugging Face checkpoint folder."""
    model, tokenizer = build_demo_llava(seed=seed, depth=depth)
    model.save_pretrained(path)
    build_demo_processor(tokenizer).save_pretrained(path)


def draw_demo_image(size: int = IMAGE_SIZE) -> Image.Image:
    """The shipped demo picture: a few flat shapes on a two-tone background."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (222, 232, 240))
    d = ImageDraw.Draw(image)
    s = size / 336
    d.rectangle([0, int(250 * s), size, size], fill=(150, 190, 120))  # ground
    d.rectangle([int(40 * s), int(60 * s), int(140 * s), int(160 * s)], fill=(220, 40, 40))
    d.ellipse([int(190 * s), int(40 * s), int(300 * s), int(150 * s)], fill=(250, 200, 30))
    d.polygon([(int(170 * s), int(180 * s)), (int(250 * s), int(300 * s)), (int(90 * s), int(300 * s))],
              fill=(40, 80, 200))
    d.line([(int(20 * s), int(320 * s)), (int(316 * s), int(200 * s))], fill=(30, 30, 30), width=max(1, int(4 * s)))
    return image


def load_demo_image() -> Image.Image:
    """The demo picture shipped with the package (assets/demo.png), as RGB."""
    ref = resources.files("sparsevlm_engine") / "assets" / "demo.png"
    with ref.open("rb") as f:
        return Image.open(f).convert("RGB")


if __name__ == "__main__":  # regenerate the shipped asset
    from pathlib import Path

    out = Path(__file__).with_name("assets") / "demo.png"
    out.parent.mkdir(exist_ok=True)
    draw_demo_image().save(out, optimize=True)
    print(out)

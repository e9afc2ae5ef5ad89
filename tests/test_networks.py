"""Tests of the denoising UNet: output shapes, config validation, timestep conditioning, gradient flow
and independence of the samples in a batch. Small configs keep these fast on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defectdiff.networks import Attention, ResBlock, UNet, UNetConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is far faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**overrides) -> UNetConfig:
    kwargs = dict(
        resolution=32,
        unshuffle=1,
        base_channels=16,
        channel_mults=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[8, 4],
        num_heads=2,
    )
    kwargs.update(overrides)
    return UNetConfig(**kwargs)


def randomise_zero_init(model: UNet, seed: int = 0) -> None:
    """Give the zero-initialised layers (output conv, residual-branch convs, attention projections)
    random weights, so every path through the network carries signal."""
    torch.manual_seed(seed)
    layers = [model.out_conv]
    for module in model.modules():
        if isinstance(module, ResBlock):
            layers.append(module.conv2)
        elif isinstance(module, Attention):
            layers.append(module.proj)
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.1)
        nn.init.normal_(layer.bias, std=0.1)


def make_model(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(small_config(**overrides)).eval()


@pytest.mark.parametrize(
    "unshuffle,mults",
    [(1, [1, 2, 2]), (2, [1, 2, 2]), (4, [1, 2, 2]), (1, [1, 2, 2, 2]), (2, [1, 2])],
)
def test_output_shapes(unshuffle, mults):
    model = make_model(unshuffle=unshuffle, channel_mults=mults)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eps, var, feats = model(x, torch.tensor([3, 900]))
    assert eps.shape == (2, 3, 32, 32)
    assert var.shape == (2, 3, 32, 32)
    assert feats.shape == (2, 192, 8, 8)  # resolution / 4, feature_channels
    assert torch.isfinite(feats).all()


def test_output_shapes_default_feature_settings_other_resolution():
    model = make_model(resolution=64, unshuffle=2, channel_mults=[1, 2, 2])
    with torch.no_grad():
        eps, var, feats = model(torch.randn(1, 3, 64, 64), torch.tensor([10]))
    assert eps.shape == var.shape == (1, 3, 64, 64)
    assert feats.shape == (1, 192, 16, 16)


def test_zero_initialised_outputs():
    model = make_model()
    with torch.no_grad():
        eps, var, feats = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 500]))
    assert torch.count_nonzero(eps) == 0 and torch.count_nonzero(var) == 0
    assert feats.abs().sum() > 0


def test_default_config_is_valid():
    UNetConfig().validate()
    cfg = UNetConfig(resolution=256, unshuffle=4)
    cfg.validate()
    assert cfg.grid == 64 and cfg.feature_size == 64


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(resolution=30, unshuffle=4), "not divisible by unshuffle"),
        (dict(resolution=34, unshuffle=1), "feature stride"),
        (dict(resolution=36, unshuffle=1, channel_mults=[1, 2, 2, 2]), "cannot be halved"),
        (dict(resolution=32, unshuffle=1, channel_mults=[1, 2]), "feature-map size"),
        (dict(resolution=32, unshuffle=8, channel_mults=[1]), "feature-map size"),
        (dict(resolution=256, unshuffle=8), "feature-map size"),
    ],
)
def test_validate_rejects_impossible_configs(overrides, match):
    cfg = small_config(**overrides)
    with pytest.raises(ValueError, match=match):
        cfg.validate()
    with pytest.raises(ValueError, match=match):
        UNet(cfg)


@pytest.mark.parametrize("unshuffle", [1, 4])
def test_output_depends_on_t(unshuffle):
    model = make_model(unshuffle=unshuffle)
    randomise_zero_init(model)
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1).contiguous()
    with torch.no_grad():
        eps, var, feats = model(x, torch.tensor([10, 600]))
    for out in (eps, var, feats):
        assert (out[0] - out[1]).abs().max() > 1e-3
    with torch.no_grad():
        eps2, var2, _ = model(x, torch.tensor([10, 10]))
    torch.testing.assert_close(eps2[0], eps2[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(var2[0], var2[1], rtol=0, atol=1e-6)


def test_gradients_reach_all_parameters():
    model = make_model(unshuffle=2)
    randomise_zero_init(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    eps, var, feats = model(x, torch.tensor([5, 700]))
    loss = (
        (eps * torch.randn(eps.shape, generator=g)).sum()
        + (var * torch.randn(var.shape, generator=g)).sum()
        + (feats * torch.randn(feats.shape, generator=g)).sum()
    )
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached: {missing}"


def test_each_output_has_its_own_gradient_path():
    """The feature head gets gradient only from the feature loss; out_conv only from eps/var."""
    model = make_model()
    randomise_zero_init(model)
    eps, var, feats = model(torch.randn(1, 3, 32, 32), torch.tensor([100]))
    feats.square().mean().backward()
    assert model.out_conv.weight.grad is None or model.out_conv.weight.grad.abs().sum() == 0
    assert model.feature_head[-1].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    eps, var, feats = model(torch.randn(1, 3, 32, 32), torch.tensor([100]))
    var.square().mean().backward()
    assert model.out_conv.weight.grad.abs().sum() > 0
    assert model.feature_head[-1].weight.grad is None or model.feature_head[-1].weight.grad.abs().sum() == 0


@pytest.mark.parametrize("unshuffle", [1, 4])
def test_output_layout_after_pixel_shuffle(unshuffle):
    """With a constant output conv (zero weight, bias k for channel k), output pixel (i, j) of channel c
    must read conv channel c * r^2 + (i % r) * r + (j % r); eps takes channels 0-2, var_interp 3-5."""
    r = unshuffle
    model = make_model(unshuffle=r)
    with torch.no_grad():
        model.out_conv.bias.copy_(torch.arange(6 * r * r, dtype=torch.float32))
        eps, var, _ = model(torch.randn(1, 3, 32, 32), torch.tensor([50]))
    out = torch.cat([eps, var], dim=1)[0]
    for c in range(6):
        for i in range(2 * r):
            for j in range(2 * r):
                assert out[c, i, j].item() == c * r * r + (i % r) * r + (j % r)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("unshuffle", [1, 2])
def test_batch_rows_are_independent(unshuffle, mode):
    model = make_model(unshuffle=unshuffle)
    randomise_zero_init(model)
    model.train(mode == "train")  # dropout is 0, so train mode is deterministic too
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([0, 321, 999])
    with torch.no_grad():
        batch = model(x, t)
        for i in range(3):
            single = model(x[i : i + 1], t[i : i + 1])
            for b_out, s_out in zip(batch, single):
                assert b_out[i : i + 1].abs().max() > 0
                torch.testing.assert_close(s_out, b_out[i : i + 1], rtol=1e-5, atol=1e-5)

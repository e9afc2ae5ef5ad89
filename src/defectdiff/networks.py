"""The denoising UNet with its feature head.

A UNet in the style of improved DDPM (residual blocks with scale-shift timestep conditioning,
self-attention at low resolutions) that outputs the predicted noise and the variance interpolation,
plus a head on the decoder that predicts the pretrained backbone's features of the clean image.
With ``unshuffle > 1`` the network runs on ``pixel_unshuffle(x, unshuffle)`` and its outputs are
``pixel_shuffle``d back, a cheap way to reach high resolution on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Shape of the UNet. ``attention_resolutions`` are sizes (in the unshuffled grid) that get attention."""

    resolution: int = 256
    unshuffle: int = 1
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    num_heads: int = 4
    dropout: float = 0.0
    feature_channels: int = 192
    feature_stride: int = 4

    @property
    def grid(self) -> int:
        return self.resolution // self.unshuffle

    @property
    def feature_size(self) -> int:
        return self.resolution // self.feature_stride

    def validate(self) -> None:
        """Raise ValueError when the sizes do not fit together."""
        if self.resolution % self.unshuffle:
            raise ValueError(f"resolution {self.resolution} is not divisible by unshuffle {self.unshuffle}")
        if self.resolution % self.feature_stride:
            raise ValueError(f"resolution {self.resolution} is not divisible by feature stride {self.feature_stride}")
        sizes = [self.grid // 2**i for i in range(len(self.channel_mults))]
        if self.grid % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"grid {self.grid} cannot be halved {len(self.channel_mults) - 1} times")
        if self.feature_size not in sizes:
            raise ValueError(
                f"no UNet level has the feature-map size {self.feature_size} (levels: {sizes}); "
                "change resolution, unshuffle or channel_mults"
            )


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (original) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding by scale and shift of its second norm."""

    def __init__(self, *, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all positions of a feature map."""

    def __init__(self, *, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks of one resolution, each optionally followed by attention."""

    def __init__(self, *, in_chs: list[int], out_ch: int, emb_dim: int, dropout: float, attention: bool, heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_ch=ch, out_ch=out_ch, emb_dim=emb_dim, dropout=dropout) for ch in in_chs
        )
        self.attns = nn.ModuleList(
            Attention(channels=out_ch, num_heads=heads) if attention else nn.Identity() for _ in in_chs
        )


class UNet(nn.Module):
    """Outputs (eps, var_interp, features): noise and variance interpolation at image size, and the
    predicted backbone features at ``resolution / feature_stride``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        r2 = config.unshuffle**2
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(3 * r2, ch, 3, padding=1)

        widths = [ch * m for m in config.channel_mults]
        skips = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        current = ch
        size = config.grid
        for i, width in enumerate(widths):
            attn = size in config.attention_resolutions
            ins = [current] + [width] * (config.num_res_blocks - 1)
            self.down.append(Level(in_chs=ins, out_ch=width, emb_dim=emb_dim, dropout=config.dropout,
                                   attention=attn, heads=config.num_heads))
            current = width
            skips += [width] * config.num_res_blocks
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skips.append(current)
                size //= 2
        self.mid1 = ResBlock(in_ch=current, out_ch=current, emb_dim=emb_dim, dropout=config.dropout)
        self.mid_attn = Attention(channels=current, num_heads=config.num_heads)
        self.mid2 = ResBlock(in_ch=current, out_ch=current, emb_dim=emb_dim, dropout=config.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self.feature_level = 0
        for i, width in reversed(list(enumerate(widths))):
            attn = size in config.attention_resolutions
            ins = []
            for _ in range(config.num_res_blocks + 1):
                ins.append(current + skips.pop())
                current = width
            self.up.append(Level(in_chs=ins, out_ch=width, emb_dim=emb_dim, dropout=config.dropout,
                                 attention=attn, heads=config.num_heads))
            if size == config.feature_size:
                self.feature_level = len(self.up) - 1
                feature_in = width
            if i > 0:
                self.upsample.append(nn.Conv2d(current, current, 3, padding=1))
                size *= 2
        self.out_norm = nn.GroupNorm(_groups(current), current)
        self.out_conv = nn.Conv2d(current, 6 * r2, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.feature_head = nn.Sequential(
            nn.GroupNorm(_groups(feature_in), feature_in), nn.SiLU(), nn.Conv2d(feature_in, config.feature_channels, 1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: noisy images in [-1, 1]-scale, Bx3xHxW; ``t``: original timesteps, B."""
        r = self.config.unshuffle
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.stem(F.pixel_unshuffle(x, r) if r > 1 else x)
        hs = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, emb))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        features = None
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
            if i == self.feature_level:
                features = self.feature_head(h)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out_conv(F.silu(self.out_norm(h)))
        if r > 1:
            out = F.pixel_shuffle(out, r)
        eps, var_interp = out.chunk(2, dim=1)
        return eps, var_interp, features

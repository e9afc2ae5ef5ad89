"""Scoring images with a trained model: pixel-level KL map, feature-level map, their ensemble, image score.

For each scored step t (original steps, default 20, 201, 401) an image is noised to x_t with noise from
a generator seeded by the image's name, so a score never depends on batch size or order. All steps of
a batch go through the UNet in ONE forward pass.

- Pixel map: per-pixel KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) on the respaced schedule, z-scored per
  image and step, averaged over steps and channels.
- Feature map: mean over channels of the squared error between predicted and real (standardised)
  backbone features, averaged over steps, upsampled bilinearly.
- Both maps are smoothed by a Gaussian, then each is put on a common scale by the mean and spread of
  that map over training images (saved with the model), and mixed:
  ``final = alpha * pixel_z + (1 - alpha) * feature_z``.
- Image score: mean of the top-k pixels of the final map (k = top_k at 256x256, scaled with the area).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import FeatureExtractor
from .config import RunConfig, ScoreConfig, from_dict
from .diffusion import make_schedule, normal_kl, p_mean_variance, q_posterior, q_sample, respaced_steps
from .networks import UNet
from .storage import CheckpointError, load_checkpoint

MODEL_FORMAT = "defectdiff-model-v1"


def image_seed(image: torch.Tensor, *, seed: int) -> int:
    """A per-image noise seed from its pixels, so a score depends on neither batch, order nor file name."""
    return (zlib.crc32(image.detach().contiguous().float().numpy().tobytes()) + 1_000_003 * seed) % (2**63)


def gaussian_blur(maps: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of BxHxW maps (reflect padding, truncated at 4 sigma)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    if radius < 1:
        return maps
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.reshape(1, 1, 1, -1))
    out = F.conv2d(out, kernel.reshape(1, 1, -1, 1))
    return out[:, 0]


def top_k_score(maps: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """Mean of the k highest pixels of each BxHxW map, k scaled from 256x256 to the map's area."""
    area = maps.shape[-1] * maps.shape[-2]
    k = max(1, min(area, round(top_k * area / (256 * 256))))
    return maps.flatten(1).topk(k, dim=1).values.mean(dim=1)


@dataclass
class RawMaps:
    """Unmixed, smoothed maps at model resolution (BxRxR)."""

    pixel: torch.Tensor
    feature: torch.Tensor


def scored_schedule(score: ScoreConfig):
    """The respaced schedule and the indices of the scored steps in it (error if one is not kept)."""
    schedule = make_schedule(keep_steps=respaced_steps(count=score.respacing))
    try:
        indices = [schedule.index_of(step=t) for t in score.timesteps]
    except ValueError as error:
        raise ValueError(f"scored timesteps {score.timesteps} must be kept by a {score.respacing}-step "
                         f"respacing: {error}") from error
    return schedule, indices


@torch.inference_mode()
def raw_maps(
    unet: UNet,
    *,
    backbone: FeatureExtractor,
    images: torch.Tensor,
    config: RunConfig,
    feature_mean: torch.Tensor,
    feature_std: torch.Tensor,
) -> RawMaps:
    """Pixel and feature maps of a batch of images (Bx3xRxR in [0, 1]) in one UNet forward pass."""
    score = config.score
    schedule, indices = scored_schedule(score)
    b, k = len(images), len(indices)
    res = images.shape[-1]
    noise = torch.stack([
        torch.randn((k, 3, res, res), generator=torch.Generator().manual_seed(image_seed(image, seed=score.seed)))
        for image in images
    ])
    x0 = (images * 2.0 - 1.0)[:, None].expand(b, k, 3, res, res).reshape(b * k, 3, res, res)
    index = torch.tensor(indices).repeat(b)
    t = torch.as_tensor(schedule.timesteps[index.numpy()])
    xt = q_sample(schedule, x0=x0, index=index, noise=noise.reshape(b * k, 3, res, res))
    with torch.autocast(device_type=xt.device.type, dtype=torch.bfloat16, enabled=score.bf16):
        eps, var_interp, feat_pred = unet(xt, t)
    eps, var_interp, feat_pred = eps.float(), var_interp.float(), feat_pred.float()

    true_mean, true_log_var = q_posterior(schedule, x0=x0, xt=xt, index=index)
    mean, log_var, _ = p_mean_variance(schedule, xt=xt, index=index, eps=eps, var_interp=var_interp)
    kl = normal_kl(mean1=true_mean, log_var1=true_log_var, mean2=mean, log_var2=log_var)
    flat = kl.reshape(b * k, -1)
    z = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp(min=1e-12)
    pixel = z.reshape(b, k, 3, res, res).mean(dim=(1, 2))

    feat_true = backbone(images, feature_size=config.model.feature_size)
    feat_true = (feat_true - feature_mean[None, :, None, None]) / feature_std[None, :, None, None]
    err = ((feat_pred.reshape(b, k, *feat_pred.shape[1:]) - feat_true[:, None]) ** 2).mean(dim=(1, 2))
    feature = F.interpolate(err[:, None], size=(res, res), mode="bilinear", align_corners=False)[:, 0]

    sigma = score.smoothing_sigma * res / 256
    return RawMaps(pixel=gaussian_blur(pixel, sigma=sigma), feature=gaussian_blur(feature, sigma=sigma))


def check_alpha(alpha: float) -> float:
    """The map weight, refused outside [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def standardize(raw: RawMaps, *, calibration: dict[str, float]) -> RawMaps:
    """Both maps on the training images' scale (their mean and spread saved with the model)."""
    return RawMaps(pixel=(raw.pixel - calibration["pixel_mean"]) / calibration["pixel_std"],
                   feature=(raw.feature - calibration["feature_mean"]) / calibration["feature_std"])


def combine(raw: RawMaps, *, calibration: dict[str, float], alpha: float) -> torch.Tensor:
    """Put both maps on the training images' scale and mix them: alpha * pixel + (1 - alpha) * feature."""
    alpha = check_alpha(alpha)
    z = standardize(raw, calibration=calibration)
    return alpha * z.pixel + (1.0 - alpha) * z.feature


def calibrate(
    unet: UNet,
    *,
    backbone: FeatureExtractor,
    config: RunConfig,
    images: torch.Tensor,
    feature_mean: torch.Tensor,
    feature_std: torch.Tensor,
) -> dict[str, float]:
    """Mean and spread of each raw map over (up to ``calibration_images``) training images."""
    count = min(len(images), config.score.calibration_images)
    chosen = np.linspace(0, len(images) - 1, count).round().astype(int)
    pixels, feats = [], []
    for start in range(0, count, config.score.batch_size):
        sel = chosen[start : start + config.score.batch_size]
        raw = raw_maps(unet, backbone=backbone, images=images[sel], config=config, feature_mean=feature_mean, feature_std=feature_std)
        pixels.append(raw.pixel)
        feats.append(raw.feature)
    pixel, feature = torch.cat(pixels), torch.cat(feats)
    return {
        "pixel_mean": float(pixel.mean()),
        "pixel_std": float(pixel.std().clamp(min=1e-12)),
        "feature_mean": float(feature.mean()),
        "feature_std": float(feature.std().clamp(min=1e-12)),
    }


@dataclass
class Model:
    """A trained model ready to score: EMA UNet, backbone, feature statistics and map calibration."""

    config: RunConfig
    unet: UNet
    backbone: FeatureExtractor
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    calibration: dict[str, float]

    def raw_maps(self, images: torch.Tensor) -> RawMaps:
        return raw_maps(self.unet, backbone=self.backbone, images=images, config=self.config,
                        feature_mean=self.feature_mean, feature_std=self.feature_std)

    def final_map(self, raw: RawMaps, *, alpha: float | None = None) -> torch.Tensor:
        return combine(raw, calibration=self.calibration, alpha=self.config.score.alpha if alpha is None else alpha)

    def image_scores(self, final: torch.Tensor) -> torch.Tensor:
        return top_k_score(final, top_k=self.config.score.top_k)


def load_model(path: Path) -> Model:
    """Load ``model.pt`` (or a run folder holding it) safely (weights only)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or model.pt")
    if path.is_dir():
        if not (path / "model.pt").is_file():
            raise CheckpointError(f"{path}: run folder has no model.pt (training unfinished? "
                                  "continue it with `defectdiff train ... --resume`)")
        path = path / "model.pt"
    data = load_checkpoint(path)
    if data.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a defectdiff model (format {data.get('format')!r}); "
                              "train one with `defectdiff train`")
    try:
        config = from_dict(data["config"], source=str(path))
        unet = UNet(config.model)
        unet.load_state_dict(data["ema"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: model does not match its config: {error}") from error
    unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return Model(config=config, unet=unet, backbone=FeatureExtractor(), feature_mean=data["feature_mean"],
                 feature_std=data["feature_std"], calibration=dict(data["calibration"]))

"""Gradient denoising: remove a defect from an image by steering it towards normal features.

Starting from a test image x (model scale [-1, 1]), each step moves x against the gradient g of a
PaDiM loss (mean squared Mahalanobis distance of its backbone features to the training Gaussians),
normalised by g's standard deviation per image:

    x <- sqrt(1 - s^2) x - s g / std(g)

and after every ``denoise_every`` such steps the diffusion model takes one reverse step: x is treated
as x_t at step ``denoise_t`` and replaced by the mean of p(x_{t-1} | x_t), which pulls it back onto
the image manifold the model learned. Defective regions, whose features are far from normal, move
most; normal regions stay close to the input.

The PaDiM is fitted on the run's training images at the model resolution and cached in
``RUN/padim.pt`` (its state_dict), so later calls only load it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .baselines import PaDiM
from .data import DataError, Sample, load_image, resize_mask, test_samples, to_tensor, train_samples
from .diffusion import make_schedule, p_mean_variance
from .evaluation import collect_images
from .scoring import Model, load_model, standardize
from .storage import atomic_save, load_checkpoint
from .training import load_images
from .visualize import display_top, overlay_panel, save_png

PADIM_FILE = "padim.pt"


@dataclass(frozen=True)
class ReconstructionSettings:
    """Gradient denoising settings: ``loops`` gradient steps of size ``step_size``, and one model step
    at original step ``denoise_t`` after every ``denoise_every`` of them."""

    loops: int = 100
    step_size: float = 0.02
    denoise_every: int = 5
    denoise_t: int = 32

    def __post_init__(self) -> None:
        if self.loops < 0:
            raise ValueError(f"loops must be >= 0, got {self.loops}")
        if not 0.0 < self.step_size < 1.0:
            raise ValueError(f"step size must be in (0, 1), got {self.step_size}")
        if self.denoise_every < 1:
            raise ValueError(f"denoise-every must be >= 1, got {self.denoise_every}")
        if not 1 <= self.denoise_t < 1000:
            raise ValueError(f"denoise-t must be in [1, 999], got {self.denoise_t}")


def load_or_fit_padim(run: Path, *, model: Model) -> PaDiM:
    """The run's PaDiM at the model resolution: loaded from RUN/padim.pt, or fitted on the run's
    training images and cached there when the file is missing or was made at another resolution."""
    path = Path(run) / PADIM_FILE
    resolution = model.config.model.resolution
    if path.is_file():
        padim = PaDiM.from_state_dict(load_checkpoint(path), backbone=model.backbone)
        if padim.resolution == resolution:
            return padim
    samples = train_samples(Path(model.config.data_root), model.config.category)
    padim = PaDiM(backbone=model.backbone).fit(load_images(samples, resolution=resolution))
    atomic_save(path, padim.state_dict())
    return padim


def _normalised_gradient(padim: PaDiM, x: torch.Tensor) -> torch.Tensor:
    """Gradient of the PaDiM loss w.r.t. x (model scale), divided by its standard deviation per image."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = padim.loss((x + 1.0) / 2.0)
        (grad,) = torch.autograd.grad(loss, x)
    std = grad.flatten(1).std(dim=1).clamp(min=1e-12)
    return grad / std[:, None, None, None]


@torch.no_grad()
def _model_step(model: Model, x: torch.Tensor, *, schedule, index: int) -> torch.Tensor:
    """Mean of the model's p(x_{t-1} | x_t), taking x as x_t at the schedule's ``index``."""
    steps = torch.full((len(x),), index, dtype=torch.long)
    eps, var_interp, _ = model.unet(x, torch.as_tensor(schedule.timesteps[steps.numpy()]))
    mean, _, _ = p_mean_variance(schedule, xt=x, index=steps, eps=eps, var_interp=var_interp)
    return mean


def reconstruct(model: Model, padim: PaDiM, images: torch.Tensor,
                settings: ReconstructionSettings = ReconstructionSettings()) -> torch.Tensor:
    """Gradient-denoised reconstructions (Bx3xRxR in [0, 1]) of images (Bx3xRxR in [0, 1])."""
    schedule = make_schedule()
    index = schedule.index_of(step=settings.denoise_t)
    shrink = math.sqrt(1.0 - settings.step_size**2)
    x = images * 2.0 - 1.0
    for step in range(1, settings.loops + 1):
        x = shrink * x - settings.step_size * _normalised_gradient(padim, x)
        if step % settings.denoise_every == 0:
            x = _model_step(model, x, schedule=schedule, index=index)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).detach()


def known_masks(paths: Sequence[Path]) -> list[np.ndarray | None]:
    """Ground truth of images in MVTec-style test folders (``<root>/<category>/test/<type>/``): all false
    for a good image, its mask for a defective one, None for an image outside such a set."""
    sets: dict[Path, dict[Path, Sample]] = {}
    masks: list[np.ndarray | None] = []
    for path in [Path(p).resolve() for p in paths]:
        if len(path.parents) < 4 or path.parents[1].name != "test":
            masks.append(None)
            continue
        category = path.parents[2]
        if category not in sets:
            try:
                sets[category] = {s.image_path.resolve(): s for s in test_samples(category.parent, category.name)}
            except DataError:
                sets[category] = {}
        sample = sets[category].get(path)
        masks.append(None if sample is None else sample.load_mask())
    return masks


def figure_panel(model: Model, *, image: torch.Tensor, reconstruction: torch.Tensor,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """A Figure-4 strip (uint8): input, reconstruction, pixel map, feature map, final map and, when
    known, the ground truth; the maps are the model's, of the input image, at model resolution."""
    raw = model.raw_maps(image[None])
    final = model.final_map(raw)[0]
    z = standardize(raw, calibration=model.calibration)
    high = display_top(final.numpy())
    res = image.shape[-1]
    small_mask = None if mask is None else resize_mask(mask, (res, res))
    picture = image.permute(1, 2, 0).numpy()
    strip = overlay_panel(image=picture, panels=[z.pixel[0].numpy(), z.feature[0].numpy(), final.numpy()], low=0.0,
                          high=high, mask=small_mask)
    tile = overlay_panel(image=reconstruction.permute(1, 2, 0).numpy(), panels=[], low=0.0, high=high)
    gap = np.full((tile.shape[0], 4, 3), 255, dtype=np.uint8)
    first = tile.shape[1] + gap.shape[1]
    return np.concatenate([strip[:, :first], tile, gap, strip[:, first:]], axis=1)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """3xHxW in [0, 1] to HxWx3 uint8."""
    return (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def reconstruct_files(run: Path, inputs: Sequence[Path], *, out: Path,
                      settings: ReconstructionSettings = ReconstructionSettings()) -> list[tuple[Path, Path, Path]]:
    """Reconstruct image files (or folders of images) with a run's model; writes ``NNNN_<stem>_reconstruction.png``
    and ``NNNN_<stem>_panel.png`` per image into ``out``; returns (input, reconstruction, panel) paths."""
    model = load_model(run)
    padim = load_or_fit_padim(run, model=model)
    res = model.config.model.resolution
    files = collect_images(inputs)
    masks = known_masks(files)
    out = Path(out)
    written = []
    for start in range(0, len(files), model.config.score.batch_size):
        chunk = files[start : start + model.config.score.batch_size]
        chunk_masks = masks[start : start + len(chunk)]
        images = torch.stack([to_tensor(load_image(f), res) for f in chunk])
        recons = reconstruct(model, padim, images, settings)
        for offset, (path, image, recon, mask) in enumerate(zip(chunk, images, recons, chunk_masks)):
            stem = f"{start + offset:04d}_{path.stem}"
            recon_path, panel_path = out / f"{stem}_reconstruction.png", out / f"{stem}_panel.png"
            save_png(recon_path, _to_uint8(recon))
            save_png(panel_path, figure_panel(model, image=image, reconstruction=recon, mask=mask))
            written.append((path, recon_path, panel_path))
    return written

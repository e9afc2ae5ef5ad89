"""Overlay pictures: image, heat map over the image, and ground truth, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .storage import atomic_save

_JET_STOPS = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0],
                       [0.5, 0.0, 0.0]])


def colorize(values: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """Map a 2-D array to RGB in [0, 1] with a jet-like colour ramp over [low, high]."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_JET_STOPS) - 1)
    lower = np.floor(scaled).astype(int).clip(0, len(_JET_STOPS) - 2)
    frac = (scaled - lower)[..., None]
    return _JET_STOPS[lower] * (1 - frac) + _JET_STOPS[lower + 1] * frac


def display_top(values: np.ndarray) -> float:
    """Top of the colour range for final maps (training-image scale): their 99.9th percentile, at least 1."""
    return max(float(np.quantile(values, 0.999)), 1.0)


def overlay_panel(*, image: np.ndarray, panels: list[np.ndarray], low: float, high: float,
                  mask: np.ndarray | None = None, height: int = 256) -> np.ndarray:
    """One uint8 strip: the image, each map blended over it, then the mask (if given)."""
    tiles = [image]
    for values in panels:
        tiles.append(0.5 * image + 0.5 * colorize(values, low=low, high=high))
    if mask is not None:
        tiles.append(np.repeat(mask[..., None].astype(np.float32), 3, axis=2))
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    resized = [np.asarray(Image.fromarray((np.clip(t, 0, 1) * 255).round().astype(np.uint8)).resize(
        (width, height), Image.BILINEAR)) for t in tiles]
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    parts = []
    for tile in resized:
        parts += [tile, gap]
    return np.concatenate(parts[:-1], axis=1)


def save_png(path: Path, pixels: np.ndarray) -> None:
    """Write a uint8 RGB array as PNG atomically."""
    atomic_save(path, Image.fromarray(pixels), save=lambda img, tmp: img.save(tmp, format="PNG"))

"""A small synthetic inspection set, for the demo and tests: textured surfaces with painted defects.

Good images are a smooth textured surface (wood-like stripes and mottling) with small random
variation. Defects are blobs, scratches and colour spots painted over the surface; each defective
image has a mask. The set is written in the MVTec AD layout, so every tool reads it like real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

DEFECTS = ("blob", "scratch", "spot")


def surface(rng: np.random.Generator, *, size: int, plain: bool = False) -> np.ndarray:
    """A normal surface, HxWx3 float in [0, 1]."""
    base = np.array([0.62, 0.48, 0.33]) + rng.normal(0, 0.02, 3)
    if plain:
        noise = gaussian_filter(rng.normal(0, 1, (size, size)), 2) * 0.02
        return np.clip(base[None, None] + noise[..., None], 0, 1)
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.06 * np.sin(2 * np.pi * (6 * y + 0.5 * np.sin(2 * np.pi * x + phase)) + phase)
    mottle = gaussian_filter(rng.normal(0, 1, (size, size)), size / 32) * 0.08
    grain = gaussian_filter(rng.normal(0, 1, (size, size)), 0.8) * 0.015
    shade = (stripes + mottle + grain)[..., None]
    return np.clip(base[None, None] + shade, 0, 1)


def paint_defect(image: np.ndarray, rng: np.random.Generator, *, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` onto a copy of ``image``; returns (image, bool mask)."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    if kind == "blob":
        r = rng.uniform(0.06, 0.12) * size
        mask = ((y - cy) ** 2 + (x - cx) ** 2) < r**2
        colour = np.array([0.15, 0.12, 0.1])
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.25, 0.45) * size
        width = max(1.5, 0.015 * size)
        dy, dx = y - cy, x - cx
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (np.abs(along) < length / 2) & (np.abs(across) < width)
        colour = np.array([0.92, 0.9, 0.85])
    elif kind == "spot":
        r = rng.uniform(0.04, 0.08) * size
        mask = ((y - cy) ** 2 / 1.5 + (x - cx) ** 2) < r**2
        colour = np.array([0.2, 0.45, 0.75])
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECTS}")
    out = image.copy()
    out[mask] = colour
    return out, mask


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def make_dataset(root: Path, *, category: str = "surface", size: int = 128, train: int = 40, test_good: int = 8,
                 test_per_defect: int = 6, defects: tuple[str, ...] = DEFECTS, plain: bool = False,
                 seed: int = 0) -> Path:
    """Write a synthetic MVTec-AD-style category under ``root``; returns ``root/category``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / category
    for i in range(train):
        _save(folder / "train" / "good" / f"{i:03d}.png", surface(rng, size=size, plain=plain))
    for i in range(test_good):
        _save(folder / "test" / "good" / f"{i:03d}.png", surface(rng, size=size, plain=plain))
    for kind in defects:
        for i in range(test_per_defect):
            image, mask = paint_defect(surface(rng, size=size, plain=plain), rng, kind=kind)
            _save(folder / "test" / kind / f"{i:03d}.png", image)
            _save(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.float64))
    return folder

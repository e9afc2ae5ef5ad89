"""Testing and prediction: score image sets, write maps, overlays, scores and the official metrics.

A test writes into its output folder:
- ``metrics.json``: pixel AUROC, AUPRO@0.3 and image AUROC, overall and per defect type (each defect
  type with the good images); a metric that is undefined for the set is ``null`` with the reason.
- ``scores.csv``: image, defect type, label, score.
- ``anomaly_maps/<category>/test/<defect>/<stem>.tiff``: float32 maps at each image's original size,
  the layout MVTec AD's official evaluation script reads.
- ``overlays/<defect>/<stem>.png``: image, pixel map, feature map, final map, ground truth.
- ``raw_maps.npz``: the unmixed pixel and feature maps at model resolution, so alpha can be swept
  without running the model again.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IMAGE_EXTENSIONS, DataError, Sample, load_image, resize_mask, to_tensor
from .metrics import aupro, image_auroc, pixel_auroc
from .scoring import Model, RawMaps, check_alpha, standardize
from .storage import atomic_write_bytes, atomic_write_json, atomic_write_text
from .visualize import display_top, overlay_panel, save_png


@dataclass
class ScoredSet:
    """Raw maps (N x R x R, float32) of a set of samples, in the samples' order."""

    samples: list[Sample]
    pixel: np.ndarray
    feature: np.ndarray
    seconds: float

    def raw(self, index: Sequence[int] | slice) -> RawMaps:
        return RawMaps(pixel=torch.from_numpy(self.pixel[index]), feature=torch.from_numpy(self.feature[index]))


def score_samples(model: Model, samples: Sequence[Sample], *, progress: bool = True) -> ScoredSet:
    """Run the model over samples in batches of ``score.batch_size`` and keep both raw maps."""
    res = model.config.model.resolution
    batch = model.config.score.batch_size
    pixel = np.zeros((len(samples), res, res), dtype=np.float32)
    feature = np.zeros_like(pixel)
    start = time.perf_counter()
    bar = tqdm(total=len(samples), desc="score", disable=not progress, dynamic_ncols=True, unit="img")
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        images = torch.stack([to_tensor(s.load_image(), res) for s in chunk])
        raw = model.raw_maps(images)
        pixel[i : i + len(chunk)] = raw.pixel.numpy()
        feature[i : i + len(chunk)] = raw.feature.numpy()
        bar.update(len(chunk))
    bar.close()
    for i, s in enumerate(samples):
        if not (np.isfinite(pixel[i]).all() and np.isfinite(feature[i]).all()):
            raise ValueError(f"{s.image_path}: its anomaly map holds NaN or inf")
    return ScoredSet(samples=list(samples), pixel=pixel, feature=feature, seconds=time.perf_counter() - start)


def to_original_size(maps: torch.Tensor, *, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize one RxR map to (H, W)."""
    return F.interpolate(maps[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _metric(fn: Callable[..., float], *args: Any) -> tuple[float | None, str | None]:
    try:
        return float(fn(*args)), None
    except ValueError as error:
        return None, str(error)


def set_metrics(*, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], scores: Sequence[float],
                labels: Sequence[int]) -> dict[str, Any]:
    """The three metrics of one set; undefined ones are None with their reason under 'undefined'."""
    out: dict[str, Any] = {}
    undefined: dict[str, str] = {}
    for key, fn, args in (("pixel_auroc", pixel_auroc, (maps, masks)), ("aupro", aupro, (maps, masks)),
                          ("image_auroc", image_auroc, (scores, labels))):
        out[key], reason = _metric(fn, *args)
        if reason:
            undefined[key] = reason
    out["images"] = len(labels)
    if undefined:
        out["undefined"] = undefined
    return out


class Selection(SequenceABC):
    """The items of a sequence at chosen indices, read on access (no copy of a lazy sequence)."""

    def __init__(self, items: Sequence[Any], indices: Sequence[int]) -> None:
        self.items, self.indices = items, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.items[self.indices[index]]


class OriginalSizeMaps(SequenceABC):
    """Maps at model resolution, upsampled to each image's original size only when read, so the metrics
    never hold every full-size map at once in a second copy."""

    def __init__(self, maps: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> None:
        self.maps, self.sizes = maps, list(sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        return to_original_size(self.maps[index], size=self.sizes[index])


def metrics_by_type(*, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], scores: Sequence[float],
                    samples: Sequence[Sample]) -> dict[str, Any]:
    """Overall metrics and, per defect type, the metrics of that type together with the good images."""
    labels = [s.label for s in samples]
    result = {"overall": set_metrics(maps=maps, masks=masks, scores=scores, labels=labels), "per_defect": {}}
    good = [i for i, s in enumerate(samples) if s.label == 0]
    for defect in sorted({s.defect_type for s in samples if s.label == 1}):
        chosen = good + [i for i, s in enumerate(samples) if s.defect_type == defect]
        result["per_defect"][defect] = set_metrics(
            maps=Selection(maps, chosen), masks=Selection(masks, chosen),
            scores=[scores[i] for i in chosen], labels=[labels[i] for i in chosen])
    return result


def evaluate_scored(model: Model, scored: ScoredSet, *, alpha: float,
                    masks: Sequence[np.ndarray] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics at each image's original size for one alpha; returns (metrics, image scores).

    ``masks`` (the samples' masks, loaded once by a caller that evaluates several times) are read
    from disk when not given."""
    final = model.final_map(scored.raw(slice(None)), alpha=alpha)
    scores = model.image_scores(final).numpy()
    if masks is None:
        masks = [s.load_mask() for s in scored.samples]
    maps = OriginalSizeMaps(final, [mask.shape for mask in masks])
    return metrics_by_type(maps=maps, masks=masks, scores=list(scores), samples=scored.samples), scores


def _tiff_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values.astype(np.float32))
    return buffer.getvalue()


def write_outputs(model: Model, scored: ScoredSet, *, out: Path, alpha: float, category: str,
                  names: Sequence[str] | None = None, masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Maps as float32 TIFF at original size, overlay PNGs and scores.csv; returns image scores.

    A labelled test set (given with its loaded ``masks``) uses MVTec's layout and draws the ground
    truth; unlabelled images are written flat as ``anomaly_maps/<name>.tiff`` and ``overlays/<name>.png``."""
    labelled = masks is not None
    if not labelled and names is None:
        raise ValueError("unlabelled images need output names")
    raw = scored.raw(slice(None))
    final = model.final_map(raw, alpha=alpha)
    scores = model.image_scores(final).numpy()
    z = standardize(raw, calibration=model.calibration)
    high = display_top(final.numpy())
    res = model.config.model.resolution
    for i, s in enumerate(scored.samples):
        image = s.load_image()
        size = image.shape[:2]
        if labelled:
            map_path = out / "anomaly_maps" / category / "test" / s.defect_type / f"{s.image_path.stem}.tiff"
            overlay_path = out / "overlays" / s.defect_type / f"{s.image_path.stem}.png"
        else:
            map_path, overlay_path = out / "anomaly_maps" / f"{names[i]}.tiff", out / "overlays" / f"{names[i]}.png"
        atomic_write_bytes(map_path, _tiff_bytes(to_original_size(final[i], size=size)))
        small = to_tensor(image, res).permute(1, 2, 0).numpy()
        mask_small = resize_mask(masks[i], (res, res)) if labelled else None
        panel = overlay_panel(image=small, panels=[z.pixel[i].numpy(), z.feature[i].numpy(), final[i].numpy()],
                              low=0.0, high=high, mask=mask_small)
        save_png(overlay_path, panel)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if labelled:
        writer.writerow(["image", "defect_type", "label", "score"])
        writer.writerows([str(s.image_path), s.defect_type, s.label, f"{score:.6f}"]
                         for s, score in zip(scored.samples, scores))
    else:
        writer.writerow(["image", "score"])
        writer.writerows([str(s.image_path), f"{score:.6f}"] for s, score in zip(scored.samples, scores))
    atomic_write_text(out / "scores.csv", buffer.getvalue())
    return scores


def save_raw_maps(scored: ScoredSet, *, path: Path) -> None:
    """Cache the unmixed maps (float16) with the samples they belong to."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, pixel=scored.pixel.astype(np.float16), feature=scored.feature.astype(np.float16),
        image_paths=np.array([str(s.image_path) for s in scored.samples]),
        mask_paths=np.array([str(s.mask_path or "") for s in scored.samples]),
        labels=np.array([s.label for s in scored.samples]),
        defect_types=np.array([s.defect_type for s in scored.samples]))
    atomic_write_bytes(path, buffer.getvalue())


def load_raw_maps(path: Path) -> ScoredSet:
    """Read a cache written by :func:`save_raw_maps`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no cached maps; run `defectdiff test` first")
    try:
        with np.load(path, allow_pickle=False) as data:
            samples = [Sample(image_path=Path(p), mask_path=Path(m) if m else None, label=int(lab),
                              defect_type=str(d))
                       for p, m, lab, d in zip(data["image_paths"], data["mask_paths"], data["labels"],
                                               data["defect_types"])]
            return ScoredSet(samples=samples, pixel=data["pixel"].astype(np.float32),
                             feature=data["feature"].astype(np.float32), seconds=0.0)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise DataError(f"{path}: not a readable map cache ({error}); run `defectdiff test` again") from error


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of the overall and per-defect metrics (percent)."""
    def cell(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    lines = [f"{'set':<20} {'images':>6} {'pixAUROC':>8} {'AUPRO':>8} {'imgAUROC':>8}"]
    rows = [("overall", metrics["overall"])] + list(metrics["per_defect"].items())
    for name, m in rows:
        lines.append(f"{name:<20} {m['images']:>6} {cell(m['pixel_auroc']):>8} {cell(m['aupro']):>8} "
                     f"{cell(m['image_auroc']):>8}")
    return "\n".join(lines)


RESULT_ENTRIES = ("metrics.json", "scores.csv", "raw_maps.npz", "table.txt", "anomaly_maps", "overlays")
"""What test and predict write into an output folder; an earlier result there is replaced only on request."""


def prepare_output(out: Path, *, overwrite: bool) -> None:
    """Make ``out`` ready: refuse a file, or earlier results unless ``overwrite``; then clear those results
    so old and new ones never mix. Other files in the folder are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a folder")
    earlier = [out / name for name in RESULT_ENTRIES if (out / name).exists()]
    if earlier and not overwrite:
        raise DataError(f"{out}: holds earlier results ({', '.join(p.name for p in earlier)}); "
                        "pass --overwrite to replace them or choose another --out")
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def test(model: Model, samples: Sequence[Sample], *, out: Path, category: str, alpha: float | None = None,
         overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score a labelled test set and write metrics.json, scores.csv, maps, overlays and the map cache.

    Inputs are checked (alpha, masks) before anything is written."""
    alpha = check_alpha(model.config.score.alpha if alpha is None else alpha)
    masks = [sample.load_mask() for sample in samples]
    prepare_output(out, overwrite=overwrite)
    scored = score_samples(model, samples, progress=progress)
    metrics, _ = evaluate_scored(model, scored, alpha=alpha, masks=masks)
    save_raw_maps(scored, path=out / "raw_maps.npz")
    write_outputs(model, scored, out=out, alpha=alpha, category=category, masks=masks)
    metrics.update({"alpha": alpha, "score_seconds": round(scored.seconds, 2),
                    "images_per_second": round(len(samples) / max(scored.seconds, 1e-9), 3)})
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def collect_images(paths: Sequence[Path] | Path | str) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in named folders."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError("no images given")
    return found


def output_names(files: Sequence[Path]) -> list[str]:
    """File stems, with the parent folder's name (and a counter, if still needed) where stems repeat."""
    stems = [f.stem for f in files]
    names = [f"{f.parent.name}_{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}_{seen[name]}")
    return unique


def predict(model: Model, paths: Sequence[Path] | Path | str, *, out: Path, alpha: float | None = None,
            overwrite: bool = False, progress: bool = True) -> list[tuple[Path, float]]:
    """Score unlabelled images: a map (TIFF), an overlay (PNG) per image and scores.csv.

    Every image is read (and a bad one reported) before anything is written."""
    alpha = check_alpha(model.config.score.alpha if alpha is None else alpha)
    files = collect_images(paths)
    for f in files:
        load_image(f)
    prepare_output(out, overwrite=overwrite)
    samples = [Sample(image_path=f, mask_path=None, label=0, defect_type="predict") for f in files]
    scored = score_samples(model, samples, progress=progress)
    scores = write_outputs(model, scored, out=Path(out), alpha=alpha, category="predict",
                           names=output_names(files))
    return list(zip(files, (float(s) for s in scores)))

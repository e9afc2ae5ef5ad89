"""Defect-detection metrics over anomaly maps: pixel AUROC, AUPRO (MVTec AD protocol) and image AUROC.

All functions are pure: they take numpy arrays (or sequences of them) and return a float.
Maps may differ in size from image to image; each map must match its mask. A mask pixel
counts as defective when its value is > 0. Undefined cases raise ValueError saying why.
"""

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["aupro", "image_auroc", "pixel_auroc"]

_CHUNK = 1 << 22
"""Pixels handled at once while walking the sorted scores; bounds the temporary memory of AUPRO."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Area under the ROC curve of all pixels of all images pooled, defective pixels being positives."""
    pairs = _validated_pairs(maps=maps, masks=masks)
    scores = _concatenated_scores(pairs=pairs)
    defective = np.concatenate([mask.ravel() for _, mask in pairs])
    if not defective.any():
        raise ValueError("pixel AUROC is undefined: no mask has a defective region (no pixel > 0)")
    if defective.all():
        raise ValueError("pixel AUROC is undefined: no mask has a defect-free pixel (every pixel > 0)")
    return float(roc_auc_score(defective, scores))


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``, as MVTec AD evaluates it.

    Regions are the 8-connected components of each mask. For every distinct score taken as a
    threshold (all images pooled), PRO is the mean over all regions of the fraction of the
    region at or above it, and FPR the fraction of all defect-free pixels at or above it. The
    curve from (0, 0) to (1, 1) is integrated by trapezoids up to ``fpr_limit`` (interpolated
    there) and divided by ``fpr_limit``, so the result lies in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    pairs = _validated_pairs(maps=maps, masks=masks)
    region_ids, region_weights = _regions(masks=[mask for _, mask in pairs])
    if region_weights.size == 1:
        raise ValueError("AUPRO is undefined: no mask has a defective region (no pixel > 0)")
    defect_free = region_ids == 0
    num_ok = int(np.count_nonzero(defect_free))
    if num_ok == 0:
        raise ValueError("AUPRO is undefined: no mask has a defect-free pixel (every pixel > 0)")
    scores = _concatenated_scores(pairs=pairs)
    del pairs
    scores, region_ids = _pixels_up_to_limit(
        scores=scores, region_ids=region_ids, defect_free=defect_free, num_ok=num_ok, fpr_limit=fpr_limit
    )
    del defect_free
    points = _pro_curve(scores=scores, region_ids=region_ids, region_weights=region_weights, num_ok=num_ok)
    area = _area_up_to(points=points, x_limit=fpr_limit)
    return float(np.clip(area / fpr_limit, 0.0, 1.0))


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of one score per image, images with label > 0 being the defective ones."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("image AUROC is undefined: no images given (scores and labels are empty)")
    if scores.shape != labels.shape:
        raise ValueError(f"got {scores.size} scores but {labels.size} labels")
    _check_real(array=scores, what="scores")
    finite = np.isfinite(scores)
    if not finite.all():
        raise ValueError(f"score of image {int(np.argmin(finite))} is NaN or inf")
    defective = labels > 0
    if defective.all() or not defective.any():
        kind = "defective" if defective.all() else "defect-free"
        raise ValueError(f"image AUROC is undefined: only one image label, all {labels.size} images are {kind}")
    return float(roc_auc_score(defective, scores))


def _validated_pairs(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair each map with its boolean mask, checking count, 2-D shapes, equal shapes and finite scores."""
    maps = list(maps)
    masks = list(masks)
    if not maps and not masks:
        raise ValueError("no images given: maps and masks are empty")
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    pairs = []
    for index, (raw_map, raw_mask) in enumerate(zip(maps, masks)):
        score_map = np.asarray(raw_map)
        mask = np.asarray(raw_mask)
        if score_map.ndim != 2:
            raise ValueError(f"map {index} must be 2-D, got shape {score_map.shape}")
        if score_map.shape != mask.shape:
            raise ValueError(f"map {index} has shape {score_map.shape} but mask {index} has shape {mask.shape}")
        _check_real(array=score_map, what=f"map {index}")
        if not np.isfinite(score_map).all():
            raise ValueError(f"map {index} contains NaN or inf")
        pairs.append((score_map, mask > 0))
    return pairs


def _check_real(array: np.ndarray, what: str) -> None:
    """Reject non-numeric or complex scores, which have no order."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {array.dtype}")


def _concatenated_scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """All scores in one flat array, float32 unless a map needs float64 to stay exact."""
    dtype = np.result_type(np.float32, *[score_map.dtype for score_map, _ in pairs])
    scores = np.empty(sum(score_map.size for score_map, _ in pairs), dtype=dtype)
    offset = 0
    for score_map, _ in pairs:
        scores[offset : offset + score_map.size] = score_map.ravel()
        offset += score_map.size
    return scores


def _regions(masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Global region id of every pixel (0 for defect-free) and each id's PRO weight, 1/size/num_regions.

    Regions are 8-connected components, numbered across all images; weight[0] is 0.
    """
    total = sum(mask.size for mask in masks)
    region_ids = np.empty(total, dtype=np.int32 if total < 2**31 else np.int64)
    sizes = []
    offset = 0
    num_regions = 0
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        ids = region_ids[offset : offset + mask.size]
        ids[...] = labelled.ravel()
        ids[ids > 0] += num_regions
        sizes.append(np.bincount(labelled.ravel(), minlength=count + 1)[1:])
        num_regions += count
        offset += mask.size
    weights = np.zeros(num_regions + 1, dtype=np.float64)
    if num_regions:
        weights[1:] = 1.0 / np.concatenate(sizes) / num_regions
    return region_ids, weights


def _pixels_up_to_limit(
    scores: np.ndarray, region_ids: np.ndarray, defect_free: np.ndarray, num_ok: int, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Drop pixels scoring below every threshold that the curve up to ``fpr_limit`` needs.

    The cutoff is a defect-free score low enough that the FPR there exceeds the limit by more
    than one pixel; every pixel at or above it is kept, so the curve up to the first point past
    the limit is unchanged while far fewer pixels have to be sorted.
    """
    needed = int(np.floor(fpr_limit * num_ok)) + 2
    if needed >= num_ok:
        return scores, region_ids
    ok_scores = scores[defect_free]
    kth = num_ok - needed
    ok_scores.partition(kth)
    keep = scores >= ok_scores[kth]
    return scores[keep], region_ids[keep]


def _pro_curve(
    scores: np.ndarray, region_ids: np.ndarray, region_weights: np.ndarray, num_ok: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (FPR, PRO) points in order of descending threshold, chunk by chunk, then the end point (1, 1).

    A point is taken only at the last pixel of each run of equal scores, so ties form one step.
    """
    order = np.argsort(scores)
    false_positives = 0
    overlap = 0.0
    for stop in range(scores.size, 0, -_CHUNK):
        start = max(stop - _CHUNK, 0)
        chunk = order[start:stop][::-1]
        chunk_scores = scores[chunk]
        chunk_ids = region_ids[chunk]
        last_of_run = np.empty(chunk.size, dtype=bool)
        np.not_equal(chunk_scores[:-1], chunk_scores[1:], out=last_of_run[:-1])
        last_of_run[-1] = start == 0 or chunk_scores[-1] != scores[order[start - 1]]
        fp = np.cumsum(chunk_ids == 0, dtype=np.int64)
        fp += false_positives
        pro = np.cumsum(region_weights[chunk_ids])
        pro += overlap
        false_positives = int(fp[-1])
        overlap = float(pro[-1])
        yield fp[last_of_run] / num_ok, np.clip(pro[last_of_run], 0.0, 1.0)
    yield np.ones(1), np.ones(1)


def _area_up_to(points: Iterator[tuple[np.ndarray, np.ndarray]], x_limit: float) -> float:
    """Trapezoid area under a curve from (0, 0) through ``points`` (x non-decreasing), cut at ``x_limit``.

    The curve's value at ``x_limit`` is interpolated linearly; points past it are not consumed.
    """
    area = 0.0
    last_x, last_y = 0.0, 0.0
    for chunk_x, chunk_y in points:
        xs = np.concatenate(([last_x], chunk_x))
        ys = np.concatenate(([last_y], chunk_y))
        inside = int(np.searchsorted(xs, x_limit, side="right"))
        area += float(np.sum(np.diff(xs[:inside]) * (ys[1:inside] + ys[: inside - 1]))) / 2.0
        if inside < xs.size:
            x0, y0, x1, y1 = xs[inside - 1], ys[inside - 1], xs[inside], ys[inside]
            y_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
            return area + float((x_limit - x0) * (y0 + y_limit)) / 2.0
        last_x, last_y = xs[-1], ys[-1]
    return area

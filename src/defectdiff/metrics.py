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

_CHUNK = 1 << 21
"""Sorted defect-free scores handled at once while building the curve; bounds AUPRO's temporary memory."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Area under the ROC curve of all pixels of all images pooled, defective pixels being positives.

    Computed exactly by ranks (equal to scikit-learn's roc_auc_score, which the tests check) because
    its full argsort of every pixel takes over a minute at MVTec's original sizes."""
    ok_scores, defect_scores, _, _ = _split(maps, masks, with_regions=False)
    if defect_scores.size == 0:
        raise ValueError("pixel AUROC is undefined: no mask has a defective region (no pixel > 0)")
    if ok_scores.size == 0:
        raise ValueError("pixel AUROC is undefined: no mask has a defect-free pixel (every pixel > 0)")
    return _rank_auroc(positives=defect_scores, negatives=ok_scores)


def _rank_auroc(*, positives: np.ndarray, negatives: np.ndarray) -> float:
    """Exact ROC AUC as the Mann-Whitney statistic, ties counted half: one sort of the negatives and a
    binary search per positive, instead of a full argsort of every pixel (tens of millions at 900x900).
    Sorts ``negatives`` in place."""
    negatives.sort()
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.float64)
    tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.float64) - below
    return float((below + 0.5 * tied) / (float(positives.size) * float(negatives.size)))


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
    ok_scores, defect_scores, inverse_region_sizes, num_regions = _split(maps, masks, with_regions=True)
    if num_regions == 0:
        raise ValueError("AUPRO is undefined: no mask has a defective region (no pixel > 0)")
    num_ok = ok_scores.size
    if num_ok == 0:
        raise ValueError("AUPRO is undefined: no mask has a defect-free pixel (every pixel > 0)")
    ok_scores = _sorted_ok_scores_up_to_limit(ok_scores=ok_scores, fpr_limit=fpr_limit)
    order = np.argsort(defect_scores)
    defect_scores = defect_scores[order]
    overlap_from = np.zeros(defect_scores.size + 1, dtype=np.float64)
    overlap_from[:-1] = np.cumsum(inverse_region_sizes[order][::-1])[::-1] / num_regions
    np.clip(overlap_from, 0.0, 1.0, out=overlap_from)
    points = _pro_curve(
        ok_sorted=ok_scores, num_ok=num_ok, defect_sorted=defect_scores, overlap_from=overlap_from
    )
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


def _split(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, with_regions: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """One pass over the images: check each map against its mask and copy its scores into two flat
    buffers, defect-free and defect. Maps are read one at a time, so a lazy sequence of full-size
    maps is never held whole. With ``with_regions`` also returns 1/region size per defect pixel
    (regions are 8-connected components of each mask) and the number of regions of all images.
    """
    if not hasattr(maps, "__getitem__"):
        maps = list(maps)
    masks = [np.asarray(mask) > 0 for mask in masks]
    if len(maps) == 0 and not masks:
        raise ValueError("no images given: maps and masks are empty")
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    defect_counts = [int(np.count_nonzero(mask)) for mask in masks]
    ok_scores = np.empty(sum(mask.size for mask in masks) - sum(defect_counts), dtype=np.float32)
    defect_scores = np.empty(sum(defect_counts), dtype=np.float32)
    inverse_sizes = np.empty(sum(defect_counts), dtype=np.float64) if with_regions else None
    num_regions = ok_offset = defect_offset = 0
    for index, (mask, defect_count) in enumerate(zip(masks, defect_counts)):
        score_map = np.asarray(maps[index])
        if score_map.ndim != 2:
            raise ValueError(f"map {index} must be 2-D, got shape {score_map.shape}")
        if score_map.shape != mask.shape:
            raise ValueError(f"map {index} has shape {score_map.shape} but mask {index} has shape {mask.shape}")
        _check_real(array=score_map, what=f"map {index}")
        if not np.isfinite(score_map).all():
            raise ValueError(f"map {index} contains NaN or inf")
        dtype = np.result_type(ok_scores.dtype, score_map.dtype)
        if dtype != ok_scores.dtype:
            ok_scores = _widened(ok_scores, filled=ok_offset, dtype=dtype)
            defect_scores = _widened(defect_scores, filled=defect_offset, dtype=dtype)
        ok_count = mask.size - defect_count
        ok_scores[ok_offset : ok_offset + ok_count] = score_map[~mask]
        defect_scores[defect_offset : defect_offset + defect_count] = score_map[mask]
        if inverse_sizes is not None:
            labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            region_of_pixel = labelled[mask]
            sizes = np.bincount(region_of_pixel, minlength=count + 1)
            inverse_sizes[defect_offset : defect_offset + defect_count] = 1.0 / sizes[region_of_pixel]
            num_regions += count
        ok_offset += ok_count
        defect_offset += defect_count
    return ok_scores, defect_scores, inverse_sizes, num_regions


def _widened(buffer: np.ndarray, *, filled: int, dtype: np.dtype) -> np.ndarray:
    """A copy of ``buffer`` in a wider dtype (float64, for a map that needs it), keeping its filled part."""
    wider = np.empty(buffer.size, dtype=dtype)
    wider[:filled] = buffer[:filled]
    return wider


def _check_real(array: np.ndarray, what: str) -> None:
    """Reject non-numeric or complex scores, which have no order."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got dtype {array.dtype}")


def _sorted_ok_scores_up_to_limit(ok_scores: np.ndarray, fpr_limit: float) -> np.ndarray:
    """Defect-free scores in ascending order, without those below every threshold needed up to ``fpr_limit``.

    The kept scores are all those at or above a cutoff where the FPR exceeds the limit by more
    than one pixel, so the count of defect-free pixels at or above any kept score stays exact
    and the curve up to its first point past the limit is unchanged. Reorders ``ok_scores``.
    """
    needed = int(np.floor(fpr_limit * ok_scores.size)) + 2
    if needed < ok_scores.size:
        kth = ok_scores.size - needed
        ok_scores.partition(kth)
        ok_scores = ok_scores[ok_scores >= ok_scores[kth]]
    ok_scores.sort()
    return ok_scores


def _pro_curve(
    ok_sorted: np.ndarray, num_ok: int, defect_sorted: np.ndarray, overlap_from: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the (FPR, PRO) curve in order of descending threshold, chunk by chunk, then the end point (1, 1).

    ``ok_sorted`` holds, ascending, every defect-free score at or above its smallest one;
    ``overlap_from[i]`` is the PRO of the defect pixels ``defect_sorted[i:]``. Each distinct
    defect-free score u gives two points: just above u (defect pixels > u, FPR unchanged) and
    at u (all pixels >= u). Thresholds at defect-only scores in between lie on the vertical
    segment joining those points, so the area equals that of the curve over every distinct
    score with ties merged.
    """
    total = ok_sorted.size
    previous_fpr = 0.0
    for stop in range(total, 0, -_CHUNK):
        start = max(stop - _CHUNK, 0)
        low = max(start - 1, 0)
        window = ok_sorted[low:stop]
        run_starts = np.flatnonzero(window[1:] != window[:-1]) + (low + 1)
        if start == 0:
            run_starts = np.concatenate((np.zeros(1, dtype=run_starts.dtype), run_starts))
        if run_starts.size == 0:
            continue
        values = ok_sorted[run_starts]
        at_fpr = ((total - run_starts) / num_ok)[::-1]
        at_pro = overlap_from[np.searchsorted(defect_sorted, values, side="left")][::-1]
        above_pro = overlap_from[np.searchsorted(defect_sorted, values, side="right")][::-1]
        fprs = np.empty(2 * values.size, dtype=np.float64)
        pros = np.empty_like(fprs)
        fprs[0] = previous_fpr
        fprs[2::2] = at_fpr[:-1]
        fprs[1::2] = at_fpr
        pros[0::2] = above_pro
        pros[1::2] = at_pro
        previous_fpr = at_fpr[-1]
        yield fprs, pros
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

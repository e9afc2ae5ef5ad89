"""Tests of defectdiff.metrics against slow, independent implementations and hand-computed cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from defectdiff import metrics
from defectdiff.metrics import aupro, image_auroc, pixel_auroc


def components_8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected components of a boolean mask by flood fill (independent of scipy)."""
    labels = np.zeros(mask.shape, dtype=np.int64)
    height, width = mask.shape
    count = 0
    for row, col in zip(*np.nonzero(mask)):
        if labels[row, col]:
            continue
        count += 1
        labels[row, col] = count
        stack = [(row, col)]
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        stack.append((ny, nx))
    return labels, count


def reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float) -> float:
    """AUPRO the slow way: threshold by threshold, region by region, then trapezoids cut at the limit."""
    region_scores = []
    for score_map, mask in zip(maps, masks):
        labels, count = components_8(mask > 0)
        region_scores.extend(np.asarray(score_map, dtype=np.float64)[labels == k] for k in range(1, count + 1))
    ok_scores = np.concatenate([np.asarray(m, dtype=np.float64)[~(k > 0)] for m, k in zip(maps, masks)])
    thresholds = np.unique(np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps]))[::-1]
    xs, ys = [0.0], [0.0]
    for threshold in thresholds:
        xs.append(np.count_nonzero(ok_scores >= threshold) / ok_scores.size)
        overlaps = [np.count_nonzero(scores >= threshold) / scores.size for scores in region_scores]
        ys.append(math.fsum(overlaps) / len(overlaps))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < fpr_limit:
            y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_at_limit) / 2
        break
    return area / fpr_limit


def random_case(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images of different sizes with several regions each, a diagonal-only pair, a corner pixel, a clean image."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for shape in [(17, 23), (30, 19), (25, 25), (12, 40), (9, 14)]:
        mask = np.zeros(shape, dtype=bool)
        if shape != (9, 14):
            for _ in range(int(rng.integers(1, 4))):
                height, width = rng.integers(1, 7, size=2)
                row = rng.integers(0, shape[0] - height + 1)
                col = rng.integers(0, shape[1] - width + 1)
                mask[row : row + height, col : col + width] = True
        maps.append(rng.normal(size=shape) + rng.uniform(0.5, 3.0) * mask)
        masks.append(mask)
    masks[0][1:4, 1:4] = False
    masks[0][1:3, 1:3] = True
    masks[0][3, 3] = True
    masks[1][-2:, -2:] = False
    masks[1][-1, -1] = True
    return maps, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference_on_continuous_scores(seed: int, fpr_limit: float) -> None:
    maps, masks = random_case(seed=seed)
    expected = reference_aupro(maps=maps, masks=masks, fpr_limit=fpr_limit)
    assert 0.0 < expected < 1.0
    assert aupro(maps=maps, masks=masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 0.77, 1.0])
def test_aupro_matches_reference_with_many_ties(seed: int, fpr_limit: float) -> None:
    maps, masks = random_case(seed=seed)
    quantised = [np.round(score_map * 2).astype(np.int64) for score_map in maps]
    expected = reference_aupro(maps=quantised, masks=masks, fpr_limit=fpr_limit)
    assert aupro(maps=quantised, masks=masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_matches_reference_across_sort_chunks() -> None:
    """Millions of pixels with few score levels: runs of equal scores span the internal processing chunks."""
    rng = np.random.default_rng(7)
    maps, masks = [], []
    for shape in [(1600, 1700), (1500, 1600)]:
        mask = np.zeros(shape, dtype=np.uint8)
        for _ in range(4):
            height, width = rng.integers(1, 80, size=2)
            row = rng.integers(0, shape[0] - height + 1)
            col = rng.integers(0, shape[1] - width + 1)
            mask[row : row + height, col : col + width] = 255
        levels = np.where(mask > 0, rng.integers(0, 52, size=shape), rng.integers(0, 40, size=shape))
        maps.append(levels.astype(np.float32))
        masks.append(mask)
    for fpr_limit in (1.0, 0.95):
        expected = reference_aupro(maps=maps, masks=masks, fpr_limit=fpr_limit)
        assert aupro(maps=maps, masks=masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_matches_reference_when_a_run_of_ties_starts_at_a_chunk_edge() -> None:
    """One internal chunk's worth of defect-free pixels shares the top score, so that run starts at a chunk edge."""
    rng = np.random.default_rng(8)
    shape = (2048, 2048)
    mask = np.zeros(shape, dtype=bool)
    mask[100:140, 200:260] = True
    mask[1500:1503, 7:9] = True
    score_map = np.zeros(shape)
    ok_positions = np.flatnonzero(~mask)
    chunk = metrics._CHUNK
    assert chunk < ok_positions.size < 2 * chunk
    score_map.flat[ok_positions[:chunk]] = 2.0
    score_map.flat[ok_positions[chunk:]] = rng.integers(0, 2, size=ok_positions.size - chunk)
    score_map[mask] = rng.choice([0.5, 1.5, 2.0, 2.5], size=int(mask.sum()))
    for fpr_limit in (1.0, 0.3):
        expected = reference_aupro(maps=[score_map], masks=[mask], fpr_limit=fpr_limit)
        assert aupro(maps=[score_map], masks=[mask], fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def one_image_case() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:8, 4:12] = True
    mask[12:18, 20:23] = True
    return mask.astype(np.float64), mask


def test_perfect_map_gives_one() -> None:
    perfect, mask = one_image_case()
    assert aupro(maps=[perfect], masks=[mask]) == pytest.approx(1.0, abs=1e-12)
    graded = perfect * 10.0 + np.linspace(0.0, 1.0, perfect.size).reshape(perfect.shape)
    assert aupro(maps=[graded], masks=[mask]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.5, 1.0])
def test_constant_map_gives_half_the_limit(fpr_limit: float) -> None:
    """One step from (0, 0) to (1, 1): the area under y = x up to L, divided by L, is L / 2."""
    _, mask = one_image_case()
    constant = np.full(mask.shape, 0.7)
    assert aupro(maps=[constant], masks=[mask], fpr_limit=fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


def test_inverted_map_gives_zero() -> None:
    perfect, mask = one_image_case()
    assert aupro(maps=[1.0 - perfect], masks=[mask]) == pytest.approx(0.0, abs=1e-12)


def test_one_pixel_corner_region_counts() -> None:
    """Missing a 1-pixel region in a corner halves the PRO of a two-region mask: (0.5 + 0.5 * 0.15) = 0.575."""
    mask = np.zeros((16, 16), dtype=bool)
    mask[5:10, 5:10] = True
    mask[0, 15] = True
    finds_both = mask.astype(np.float64)
    misses_corner = finds_both.copy()
    misses_corner[0, 15] = 0.0
    assert aupro(maps=[finds_both], masks=[mask]) == pytest.approx(1.0, abs=1e-12)
    assert aupro(maps=[misses_corner], masks=[mask]) == pytest.approx(0.575, abs=1e-12)


def test_diagonally_touching_pixels_form_one_region() -> None:
    """A 3-pixel block and a pixel touching it only at a corner are one region of 4: PRO jumps to 3/4, not 1/2."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[2, 2:5] = True
    mask[3, 5] = True
    score_map = np.zeros(mask.shape)
    score_map[2, 2:5] = 1.0
    assert aupro(maps=[score_map], masks=[mask]) == pytest.approx(0.75 + 0.25 * 0.15, abs=1e-12)


def test_regions_are_counted_per_image_and_pooled() -> None:
    """The region mean runs over all regions of all images; a found region in image 0, a missed one in image 1."""
    first = np.zeros((8, 8), dtype=bool)
    first[1:3, 1:3] = True
    second = np.zeros((5, 11), dtype=bool)
    second[2, 2:9] = True
    maps = [first.astype(np.float64), np.zeros(second.shape)]
    assert aupro(maps=maps, masks=[first, second]) == pytest.approx(0.575, abs=1e-12)


def test_aupro_ignores_score_scale_and_dtype() -> None:
    maps, masks = random_case(seed=11)
    expected = aupro(maps=maps, masks=masks)
    rescaled = [score_map * 1e6 - 3e7 for score_map in maps]
    assert aupro(maps=rescaled, masks=masks) == pytest.approx(expected, abs=1e-12)
    quantised = [np.round(score_map * 8) for score_map in maps]
    assert aupro(maps=[m.astype(np.float32) for m in quantised], masks=masks) == pytest.approx(
        aupro(maps=quantised, masks=masks), abs=1e-12
    )


def test_aupro_keeps_float64_score_differences() -> None:
    """Scores 1e-12 apart are distinct thresholds: rounding them to float32 would merge them into one step."""
    perfect, mask = one_image_case()
    assert aupro(maps=[1.0 + 1e-12 * perfect], masks=[mask]) == pytest.approx(1.0, abs=1e-12)


def test_aupro_accepts_non_boolean_masks() -> None:
    maps, masks = random_case(seed=12)
    as_uint8 = [mask.astype(np.uint8) * 255 for mask in masks]
    assert aupro(maps=maps, masks=as_uint8) == pytest.approx(aupro(maps=maps, masks=masks), abs=1e-15)


def pairwise_auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a positive outscores a negative, ties counting half (Mann-Whitney)."""
    greater = np.count_nonzero(positive[:, None] > negative[None, :])
    equal = np.count_nonzero(positive[:, None] == negative[None, :])
    return (greater + 0.5 * equal) / (positive.size * negative.size)


@pytest.mark.parametrize("quantise", [False, True])
def test_pixel_auroc_matches_sklearn_and_pairwise_count(quantise: bool) -> None:
    maps, masks = random_case(seed=21)
    if quantise:
        maps = [np.round(score_map) for score_map in maps]
    uint8_masks = [mask.astype(np.uint8) * 255 for mask in masks]
    scores = np.concatenate([score_map.ravel() for score_map in maps])
    defective = np.concatenate([mask.ravel() for mask in masks])
    result = pixel_auroc(maps=maps, masks=uint8_masks)
    assert result == pytest.approx(roc_auc_score(defective, scores), abs=1e-12)
    assert result == pytest.approx(pairwise_auroc(scores[defective], scores[~defective]), abs=1e-12)


def test_image_auroc_matches_sklearn_and_pairwise_count() -> None:
    rng = np.random.default_rng(31)
    labels = rng.integers(0, 2, size=60)
    scores = np.round(rng.normal(size=60) + labels, 1)
    result = image_auroc(scores=scores, labels=labels)
    assert result == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result == pytest.approx(pairwise_auroc(scores[labels > 0], scores[labels == 0]), abs=1e-12)
    assert image_auroc(scores=[0.1, 0.9, 0.2], labels=[False, True, False]) == 1.0


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_map_metrics_reject_undefined_inputs(metric) -> None:
    good_map, mask = one_image_case()
    with pytest.raises(ValueError, match="empty"):
        metric(maps=[], masks=[])
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        metric(maps=[good_map, good_map], masks=[mask])
    with pytest.raises(ValueError, match=r"map 1 has shape \(20, 29\) but mask 1 has shape \(20, 30\)"):
        metric(maps=[good_map, good_map[:, :-1]], masks=[mask, mask])
    with pytest.raises(ValueError, match="map 1 must be 2-D"):
        metric(maps=[good_map, good_map[None]], masks=[mask, mask[None]])
    for bad_value in (np.nan, np.inf, -np.inf):
        bad_map = good_map.copy()
        bad_map[4, 4] = bad_value
        with pytest.raises(ValueError, match="map 2 contains NaN or inf"):
            metric(maps=[good_map, good_map, bad_map], masks=[mask, mask, mask])
    with pytest.raises(ValueError, match="no mask has a defective region"):
        metric(maps=[good_map, good_map], masks=[np.zeros_like(mask), np.zeros_like(mask)])
    with pytest.raises(ValueError, match="no mask has a defect-free pixel"):
        metric(maps=[good_map], masks=[np.ones_like(mask)])


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, math.nan])
def test_aupro_rejects_bad_fpr_limit(fpr_limit: float) -> None:
    good_map, mask = one_image_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps=[good_map], masks=[mask], fpr_limit=fpr_limit)


def test_image_auroc_rejects_undefined_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        image_auroc(scores=[], labels=[])
    with pytest.raises(ValueError, match="only one image label, all 3 images are defect-free"):
        image_auroc(scores=[0.1, 0.2, 0.3], labels=[0, 0, 0])
    with pytest.raises(ValueError, match="only one image label, all 2 images are defective"):
        image_auroc(scores=[0.1, 0.2], labels=[1, 1])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        image_auroc(scores=[0.1, 0.2, 0.3], labels=[0, 1])
    with pytest.raises(ValueError, match="image 1 is NaN or inf"):
        image_auroc(scores=[0.1, np.nan, 0.3], labels=[0, 1, 0])
    with pytest.raises(ValueError, match="1-D"):
        image_auroc(scores=[[0.1, 0.2]], labels=[[0, 1]])

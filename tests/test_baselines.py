"""Tests of the PaDiM and SPADE baselines: localisation of planted defects, PaDiM's statistics against a
direct float64 computation, the differentiable PaDiM loss, SPADE's nearest-feature search against brute
force, and saving/loading through torch.save and torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectdiff.backbone import TAP_CHANNELS, FeatureExtractor
from defectdiff.baselines import PaDiM, SPADE, load_baseline, nearest_distances
from defectdiff.data import Sample, train_samples
from defectdiff.data import test_samples as list_test_samples
from defectdiff.evaluation import to_original_size
from defectdiff.metrics import pixel_auroc
from defectdiff.synthetic import make_dataset
from defectdiff.training import load_images

RESOLUTION = 64
IMAGE_SIZE = 96


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: batched LAPACK calls slow down badly when threads compete with other jobs for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone() -> FeatureExtractor:
    return FeatureExtractor()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, size=IMAGE_SIZE, train=20, test_good=3, test_per_defect=2, seed=3)
    return root


@pytest.fixture(scope="module")
def train_images(dataset: Path) -> torch.Tensor:
    return load_images(train_samples(dataset, "surface"), resolution=RESOLUTION)


@pytest.fixture(scope="module")
def test_set(dataset: Path) -> tuple[list[Sample], torch.Tensor]:
    samples = list_test_samples(dataset, "surface")
    return samples, load_images(samples, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def padim(backbone: FeatureExtractor, train_images: torch.Tensor) -> PaDiM:
    return PaDiM(backbone=backbone).fit(train_images)


@pytest.fixture(scope="module")
def spade(backbone: FeatureExtractor, train_images: torch.Tensor) -> SPADE:
    return SPADE(backbone=backbone).fit(train_images)


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_localizes_planted_defects(method: str, request: pytest.FixtureRequest, test_set) -> None:
    model = request.getfixturevalue(method)
    samples, images = test_set
    maps = model.anomaly_maps(images)
    assert maps.shape == (len(samples), RESOLUTION, RESOLUTION)
    assert torch.isfinite(maps).all()
    masks = [sample.load_mask() for sample in samples]
    full = [to_original_size(map_, size=mask.shape) for map_, mask in zip(maps, masks)]
    assert full[0].shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert pixel_auroc(full, masks) > 0.9
    scores = model.image_scores(maps)
    labels = torch.tensor([sample.label for sample in samples])
    assert scores[labels == 1].min() > scores[labels == 0].max()


def test_padim_statistics_match_direct_float64(padim: PaDiM, backbone, train_images: torch.Tensor) -> None:
    with torch.no_grad():
        features = backbone(train_images, feature_size=RESOLUTION // 4).double().flatten(2).numpy()
    assert padim.mean.shape == (features.shape[2], features.shape[1])
    np.testing.assert_allclose(padim.mean.numpy(), features.mean(axis=0).T, rtol=1e-5, atol=1e-5)
    for position in (0, 37, features.shape[2] - 1):
        samples = features[:, :, position]
        covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(samples.shape[1])
        expected = np.linalg.inv(covariance)
        np.testing.assert_allclose(
            padim.precision[position].double().numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
        )


def test_padim_chunk_size_does_not_change_the_result(backbone, train_images: torch.Tensor) -> None:
    small = PaDiM(backbone=backbone, channels=40, seed=5, chunk_size=7).fit(train_images[:8])
    large = PaDiM(backbone=backbone, channels=40, seed=5, chunk_size=10_000).fit(train_images[:8])
    assert small.precision.shape == (RESOLUTION**2 // 16, 40, 40)
    torch.testing.assert_close(small.mean, large.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small.precision, large.precision, rtol=1e-5, atol=1e-5 * large.precision.abs().max())
    other_seed = PaDiM(backbone=backbone, channels=40, seed=6)
    assert not torch.equal(small.channel_index, other_seed.channel_index)


def test_padim_distance_is_mahalanobis(padim: PaDiM, backbone, test_set) -> None:
    _, images = test_set
    with torch.no_grad():
        features = backbone(images[-2:], feature_size=RESOLUTION // 4)
    distance = padim.distance(features)
    row, col = 5, 9
    delta = features[1, :, row, col].double() - padim.mean[row * (RESOLUTION // 4) + col].double()
    expected = torch.sqrt(delta @ padim.precision[row * (RESOLUTION // 4) + col].double() @ delta)
    assert distance.shape == (2, RESOLUTION // 4, RESOLUTION // 4)
    torch.testing.assert_close(distance[1, row, col].double(), expected, rtol=1e-4, atol=1e-4)


def test_padim_loss_is_differentiable_and_a_gradient_step_lowers_it(padim: PaDiM, test_set) -> None:
    samples, images = test_set
    defective = images[[i for i, sample in enumerate(samples) if sample.label == 1][:1]].clone()
    defective.requires_grad_(True)
    loss = padim.loss(defective)
    assert loss.dim() == 0
    loss.backward()
    grad = defective.grad
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 0
    with torch.no_grad():
        stepped = (defective - 1e-3 * grad / grad.abs().max()).clamp(0.0, 1.0)
        assert padim.loss(stepped) < loss.detach()


def test_nearest_distances_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(23, 6, generator=generator)
    gallery = torch.randn(41, 6, generator=generator)
    brute = torch.stack([(gallery - q).norm(dim=1).min() for q in queries])
    for chunk_size in (1, 5, 100):
        torch.testing.assert_close(nearest_distances(queries, gallery, chunk_size=chunk_size), brute)


def test_spade_map_matches_brute_force_on_a_tiny_case(backbone, train_images: torch.Tensor, test_set) -> None:
    _, images = test_set
    train, test = train_images[:4, :, :32, :32], images[-2:, :, :32, :32]
    model = SPADE(backbone=backbone, k=2, chunk_size=5).fit(train)
    with torch.no_grad():
        train_features = backbone(train, feature_size=8).double()
        test_features = backbone(test, feature_size=8)
        distance = model.distance(test_features)
    stored = train_features.half().double()
    descriptors = train_features[:, -TAP_CHANNELS[-1]:].mean(dim=(2, 3))
    for index, query_map in enumerate(test_features.double()):
        query_descriptor = query_map[-TAP_CHANNELS[-1]:].mean(dim=(1, 2))
        chosen = torch.argsort(((descriptors - query_descriptor) ** 2).sum(dim=1))[:2]
        for row in range(8):
            for col in range(8):
                query = query_map[:, row, col]
                nearest = min(
                    float(((stored[image, :, r, c] - query) ** 2).sum().sqrt())
                    for image in chosen.tolist() for r in range(8) for c in range(8)
                )
                assert distance[index, row, col].item() == pytest.approx(nearest, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_state_dict_round_trip(method: str, request: pytest.FixtureRequest, backbone, test_set, tmp_path) -> None:
    model = request.getfixturevalue(method)
    _, images = test_set
    path = tmp_path / f"{method}.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    for restored in (type(model).from_state_dict(state, backbone=backbone), load_baseline(state, backbone=backbone)):
        assert type(restored) is type(model)
        assert torch.equal(restored.anomaly_maps(images[:3]), model.anomaly_maps(images[:3]))


def test_unfitted_or_mismatched_use_is_refused(backbone, padim: PaDiM, spade: SPADE) -> None:
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION)
    for cls in (PaDiM, SPADE):
        with pytest.raises(RuntimeError, match="not fitted"):
            cls(backbone=backbone).anomaly_maps(images)
    for model in (padim, spade):
        with pytest.raises(ValueError, match="fitted at 64 px"):
            model.anomaly_maps(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not 'spade'"):
        SPADE.from_state_dict(padim.state_dict(), backbone=backbone)

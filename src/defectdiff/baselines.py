"""Classic feature-based baselines on the same frozen backbone: PaDiM and SPADE.

Both use the 192-channel EfficientNet-Lite0 map of ``FeatureExtractor`` at a quarter of the input
resolution R (S = ceil(R / 4)), so they can be compared with the diffusion model on equal terms.
Maps come back at RxR, upsampled bilinearly and smoothed by a Gaussian of sigma 4 at 256 px (scaled
with R); the image score is the mean of the top-k pixels (k = 64 at 256x256), as for the main model.

Memory at 256 px (S = 64, P = 4096 positions, C = 192 channels, N = 209 training images), besides
the images and about 0.4 GB of backbone activations per batch of 16:

- PaDiM keeps a mean (P x C) and a precision matrix per position (P x C x C float32, 4·P·C² bytes =
  604 MB). Fitting accumulates the sums in float64 (8·P·C² = 1.2 GB) and writes the precision chunk
  by chunk, so the peak is about 1.8 GB. Fewer channels (``channels``) shrink both quadratically.
- SPADE keeps every training map as float16 (2·N·P·C bytes = 329 MB) plus one global vector per
  image, filled in place during fitting; testing needs the k retrieved maps in float32 and one chunk of
  distances (about 250 MB in all).

Measured on CPU with one thread at 256 px (bottle, 209 training and 83 test images): PaDiM fits in
30-50 s and tests at 7-10 images/s; SPADE fits in about 15 s and tests at about 1.5 images/s.
Batched LAPACK (Cholesky) is very slow when its threads compete for cores with other jobs, so use
``torch.set_num_threads`` to match the free cores.

Both are exposed through the `Baseline` interface (``name``, ``fit``, ``anomaly_maps``,
``image_scores``, ``state_dict``, ``from_state_dict``), so a benchmark can loop over them; their
states hold only tensors, ints, floats and strings and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .backbone import FEATURE_CHANNELS, TAP_CHANNELS, FeatureExtractor
from .scoring import gaussian_blur, top_k_score

__all__ = ["BASELINES", "Baseline", "PaDiM", "SPADE", "load_baseline", "nearest_distances"]

SMOOTHING_SIGMA = 4.0
"""Gaussian sigma of the map smoothing at 256 px, scaled with the resolution."""

TOP_K = 64
"""Pixels averaged for the image score at 256x256, scaled with the area."""


class Baseline(ABC):
    """A method fitted on defect-free images (Nx3xRxR in [0, 1]) that maps test images to anomaly maps.

    Subclasses implement ``distance`` (features to an SxS map) and the fitting; the shared code turns
    distances into smoothed RxR maps and image scores.
    """

    name: str = ""

    def __init__(
        self,
        *,
        backbone: FeatureExtractor | None = None,
        batch_size: int = 16,
        sigma: float = SMOOTHING_SIGMA,
        top_k: int = TOP_K,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.backbone = backbone if backbone is not None else FeatureExtractor()
        self.batch_size = int(batch_size)
        self.sigma = float(sigma)
        self.top_k = int(top_k)
        self.resolution: int | None = None

    @property
    def feature_size(self) -> int:
        """Side S of the feature map used (a quarter of the fitted resolution, rounded up)."""
        return math.ceil(self._fitted_resolution() / 4)

    def _fitted_resolution(self) -> int:
        """The training resolution R; raises if the method has not been fitted."""
        if self.resolution is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(images) first")
        return self.resolution

    def _check_images(self, images: torch.Tensor, *, fitting: bool = False) -> None:
        """Images must be Nx3xRxR, at the fitted R unless fitting, since the statistics are per position."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"expected square images of shape Nx3xRxR, got {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("no images given")
        if not fitting and images.shape[-1] != self._fitted_resolution():
            raise ValueError(
                f"{type(self).__name__} was fitted at {self.resolution} px but got {images.shape[-1]} px images"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (BxCxSxS) of images, with gradients flowing to the images if they require them."""
        return self.backbone(images, feature_size=self.feature_size)

    def _batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """Consecutive slices of ``batch_size`` images, to bound backbone memory."""
        for start in range(0, len(images), self.batch_size):
            yield images[start : start + self.batch_size]

    @abstractmethod
    def fit(self, images: torch.Tensor) -> Baseline:
        """Learn the normal appearance from defect-free images; returns self."""

    @abstractmethod
    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Anomaly distance per position (BxSxS) of backbone features (BxCxSxS)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted method, as tensors and plain values."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, Any], *, backbone: FeatureExtractor | None = None) -> Baseline:
        """Rebuild a fitted method from ``state_dict()``."""

    @torch.no_grad()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Smoothed anomaly maps (BxRxR) of images (Bx3xRxR in [0, 1]); higher means more anomalous."""
        self._check_images(images)
        resolution = images.shape[-1]
        maps = []
        for batch in self._batches(images):
            dist = self.distance(self.features(batch))
            maps.append(F.interpolate(dist[:, None], size=(resolution, resolution), mode="bilinear",
                                      align_corners=False)[:, 0])
        return gaussian_blur(torch.cat(maps), sigma=self.sigma * resolution / 256)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """One score per map: mean of its top-k pixels (k scaled from 256x256 to the map's area)."""
        return top_k_score(maps, top_k=self.top_k)

    def _common_state(self) -> dict[str, Any]:
        return {"method": self.name, "resolution": self._fitted_resolution(), "batch_size": self.batch_size,
                "sigma": self.sigma, "top_k": self.top_k}


class PaDiM(Baseline):
    """PaDiM: a Gaussian per feature-map position; the anomaly map is the Mahalanobis distance to it.

    Covariances get ``epsilon`` I added (0.01, as in the paper). ``channels`` picks a random subset of
    the 192 channels (seeded), which cuts memory and time quadratically.
    """

    name = "padim"

    def __init__(
        self,
        *,
        backbone: FeatureExtractor | None = None,
        channels: int | None = None,
        seed: int = 0,
        epsilon: float = 0.01,
        chunk_size: int = 256,
        batch_size: int = 16,
        sigma: float = SMOOTHING_SIGMA,
        top_k: int = TOP_K,
    ) -> None:
        super().__init__(backbone=backbone, batch_size=batch_size, sigma=sigma, top_k=top_k)
        if channels is not None and not 1 <= channels <= FEATURE_CHANNELS:
            raise ValueError(f"channels must be in 1..{FEATURE_CHANNELS} or None, got {channels}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.channels = channels
        self.seed = int(seed)
        self.epsilon = float(epsilon)
        self.chunk_size = int(chunk_size)
        self.channel_index = self._channel_index()
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    def _channel_index(self) -> torch.Tensor:
        """Sorted indices of the channels used: all of them, or a seeded random subset."""
        if self.channels is None or self.channels == FEATURE_CHANNELS:
            return torch.arange(FEATURE_CHANNELS)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(FEATURE_CHANNELS, generator=generator)[: self.channels].sort().values

    def _positions(self, features: torch.Tensor) -> torch.Tensor:
        """BxCxSxS features to P x B x C (position-major) over the selected channels."""
        return features[:, self.channel_index].flatten(2).permute(2, 0, 1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> PaDiM:
        """Estimate per-position mean and precision from at least two defect-free images.

        Sums and outer-product sums are accumulated in float64 batch by batch (features of all
        images are never held together); precisions come from a Cholesky inverse, chunk by chunk.
        """
        self._check_images(images, fitting=True)
        if len(images) < 2:
            raise ValueError(f"PaDiM needs at least 2 training images for a covariance, got {len(images)}")
        self.resolution = images.shape[-1]
        positions, dims = self.feature_size**2, len(self.channel_index)
        total = torch.zeros(positions, dims, dtype=torch.float64)
        outer = torch.zeros(positions, dims, dims, dtype=torch.float64)
        for batch in self._batches(images):
            x = self._positions(self.features(batch)).to(torch.float64)
            total += x.sum(dim=1)
            for start in range(0, positions, self.chunk_size):
                part = x[start : start + self.chunk_size]
                outer[start : start + self.chunk_size].baddbmm_(part.transpose(1, 2), part)
        count = len(images)
        mean = total / count
        self.mean = mean.to(torch.float32)
        self.precision = torch.empty(positions, dims, dims, dtype=torch.float32)
        eye = torch.eye(dims, dtype=torch.float64)
        for start in range(0, positions, self.chunk_size):
            stop = start + self.chunk_size
            m = mean[start:stop]
            cov = (outer[start:stop] - count * m[:, :, None] * m[:, None, :]) / (count - 1) + self.epsilon * eye
            self.precision[start:stop] = torch.cholesky_inverse(torch.linalg.cholesky(cov)).to(torch.float32)
        return self

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and precision; raises if not fitted."""
        if self.mean is None or self.precision is None:
            raise RuntimeError("PaDiM is not fitted; call fit(images) first")
        return self.mean, self.precision

    def squared_distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance per position (BxSxS), differentiable w.r.t. the features."""
        mean, precision = self._fitted()
        size = self.feature_size
        if features.shape[-2:] != (size, size):
            raise ValueError(f"expected Bx{FEATURE_CHANNELS}x{size}x{size} features, got {tuple(features.shape)}")
        delta = self._positions(features) - mean[:, None, :]
        squared = (torch.bmm(delta, precision) * delta).sum(dim=-1)
        return squared.clamp(min=0.0).T.reshape(len(features), size, size)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per position (BxSxS), differentiable w.r.t. the features."""
        return self.squared_distance(features).clamp(min=1e-12).sqrt()

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Mean squared Mahalanobis distance over images and positions, differentiable w.r.t. the images.

        Lowering it pulls an image's features towards the normal Gaussians, so it can steer denoising.
        """
        self._check_images(images)
        return self.squared_distance(self.features(images)).mean()

    def state_dict(self) -> dict[str, Any]:
        mean, precision = self._fitted()
        return {**self._common_state(), "channels": self.channels, "seed": self.seed, "epsilon": self.epsilon,
                "chunk_size": self.chunk_size, "channel_index": self.channel_index.clone(), "mean": mean.clone(),
                "precision": precision.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, backbone: FeatureExtractor | None = None) -> PaDiM:
        _check_method(state, cls.name)
        model = cls(backbone=backbone, channels=state["channels"], seed=state["seed"], epsilon=state["epsilon"],
                    chunk_size=state["chunk_size"], batch_size=state["batch_size"], sigma=state["sigma"],
                    top_k=state["top_k"])
        if not torch.equal(model.channel_index, state["channel_index"]):
            raise ValueError("PaDiM state: channel_index does not match channels and seed")
        model.resolution = int(state["resolution"])
        model.mean = state["mean"]
        model.precision = state["precision"]
        return model


def nearest_distances(queries: torch.Tensor, gallery: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """Euclidean distance from each query (QxC) to its nearest gallery vector (MxC), in query chunks.

    Chunking bounds the distance matrix to chunk_size x M floats.
    """
    gallery = gallery.to(queries.dtype)
    parts = [torch.cdist(queries[start : start + chunk_size], gallery).min(dim=1).values
             for start in range(0, len(queries), chunk_size)]
    return torch.cat(parts)


class SPADE(Baseline):
    """SPADE: retrieve the k most similar training images, then score each position by its distance to
    the nearest feature anywhere in those images' maps.

    The retrieval uses a global vector per image, the mean over positions of the deepest tap's channels
    (the last 112 of the map; bilinear resizing keeps the average-pooled tap nearly unchanged).
    """

    name = "spade"

    def __init__(
        self,
        *,
        backbone: FeatureExtractor | None = None,
        k: int = 5,
        chunk_size: int = 1024,
        batch_size: int = 16,
        sigma: float = SMOOTHING_SIGMA,
        top_k: int = TOP_K,
    ) -> None:
        super().__init__(backbone=backbone, batch_size=batch_size, sigma=sigma, top_k=top_k)
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.k = int(k)
        self.chunk_size = int(chunk_size)
        self.train_features: torch.Tensor | None = None
        self.global_features: torch.Tensor | None = None

    @staticmethod
    def global_feature(features: torch.Tensor) -> torch.Tensor:
        """BxC' image descriptor: mean over positions of the deepest tap's channels."""
        return features[:, -TAP_CHANNELS[-1]:].mean(dim=(2, 3))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> SPADE:
        """Store every training map (N x P x C, float16) and each image's global feature (float32)."""
        self._check_images(images, fitting=True)
        self.resolution = images.shape[-1]
        maps = torch.empty(len(images), self.feature_size**2, FEATURE_CHANNELS, dtype=torch.float16)
        descriptors = torch.empty(len(images), TAP_CHANNELS[-1])
        for start in range(0, len(images), self.batch_size):
            features = self.features(images[start : start + self.batch_size])
            descriptors[start : start + len(features)] = self.global_feature(features)
            maps[start : start + len(features)] = features.flatten(2).transpose(1, 2)
        self.train_features, self.global_features = maps, descriptors
        return self

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored training maps and global features; raises if not fitted."""
        if self.train_features is None or self.global_features is None:
            raise RuntimeError("SPADE is not fitted; call fit(images) first")
        return self.train_features, self.global_features

    def neighbours(self, features: torch.Tensor) -> torch.Tensor:
        """Indices (B x k) of the k training images nearest in global feature, nearest first."""
        _, global_features = self._fitted()
        distances = torch.cdist(self.global_feature(features), global_features)
        return distances.topk(min(self.k, len(global_features)), dim=1, largest=False).indices

    @torch.no_grad()
    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Per position (BxSxS), the distance to the nearest feature of the retrieved images' maps."""
        train_features, _ = self._fitted()
        size = features.shape[-1]
        queries = features.flatten(2).transpose(1, 2)
        maps = []
        for query, chosen in zip(queries, self.neighbours(features)):
            gallery = train_features[chosen].reshape(-1, train_features.shape[-1])
            maps.append(nearest_distances(query, gallery, chunk_size=self.chunk_size))
        return torch.stack(maps).reshape(len(features), size, size)

    def state_dict(self) -> dict[str, Any]:
        train_features, global_features = self._fitted()
        return {**self._common_state(), "k": self.k, "chunk_size": self.chunk_size,
                "train_features": train_features.clone(), "global_features": global_features.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, backbone: FeatureExtractor | None = None) -> SPADE:
        _check_method(state, cls.name)
        model = cls(backbone=backbone, k=state["k"], chunk_size=state["chunk_size"], batch_size=state["batch_size"],
                    sigma=state["sigma"], top_k=state["top_k"])
        model.resolution = int(state["resolution"])
        model.train_features = state["train_features"]
        model.global_features = state["global_features"]
        return model


BASELINES: dict[str, type[Baseline]] = {PaDiM.name: PaDiM, SPADE.name: SPADE}
"""Baseline classes by name, for benchmarks that loop over methods."""


def _check_method(state: dict[str, Any], name: str) -> None:
    """Refuse a state saved by another method, whose tensors would not fit."""
    if state.get("method") != name:
        raise ValueError(f"state is for method {state.get('method')!r}, not {name!r}")


def load_baseline(state: dict[str, Any], *, backbone: FeatureExtractor | None = None) -> Baseline:
    """Rebuild whichever baseline a ``state_dict()`` came from."""
    method = state.get("method")
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    return BASELINES[method].from_state_dict(state, backbone=backbone)

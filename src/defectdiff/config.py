"""Run configuration: dataclasses with named presets, saved with every run as YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .networks import UNetConfig
from .storage import atomic_write_text


@dataclass
class TrainConfig:
    """How the denoising model is trained. ``max_timestep`` limits training to the steps scoring uses."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_decay: bool = True
    warmup_steps: int = 50
    ema_decay: float = 0.997
    grad_clip: float = 1.0
    max_timestep: int = 1000
    feature_weight: float = 1.0
    vb_weight: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0
    num_threads: int = 0
    bf16: bool = False


@dataclass
class ScoreConfig:
    """How test images are scored. Steps are original (1000-step) steps; ``respacing`` sets the
    schedule the reverse step is taken on (250 gives the paper's 20, 201, 401 at indices 5, 50, 100)."""

    timesteps: list[int] = field(default_factory=lambda: [20, 201, 401])
    respacing: int = 250
    alpha: float = 0.5
    smoothing_sigma: float = 4.0
    top_k: int = 64
    batch_size: int = 4
    calibration_images: int = 32
    seed: int = 0
    bf16: bool = False


@dataclass
class RunConfig:
    """Everything needed to reproduce a run."""

    preset: str
    model: UNetConfig
    train: TrainConfig
    score: ScoreConfig
    data_root: str = ""
    category: str = ""


def _tiny() -> RunConfig:
    return RunConfig(
        preset="tiny",
        model=UNetConfig(resolution=64, unshuffle=2, base_channels=32, channel_mults=[1, 2], num_res_blocks=1,
                         attention_resolutions=[16], num_heads=2),
        train=TrainConfig(steps=60, batch_size=8, lr=1e-3, warmup_steps=5, ema_decay=0.9, max_timestep=500,
                          checkpoint_every=30),
        score=ScoreConfig(smoothing_sigma=1.0, batch_size=8, calibration_images=8),
    )


def _cpu() -> RunConfig:
    return RunConfig(
        preset="cpu",
        model=UNetConfig(resolution=256, unshuffle=4, base_channels=64, channel_mults=[1, 2, 2, 2], num_res_blocks=1,
                         attention_resolutions=[16, 8], num_heads=4),
        train=TrainConfig(steps=2200, batch_size=8, lr=3e-4, warmup_steps=50, ema_decay=0.995, max_timestep=450,
                          checkpoint_every=100, bf16=True),
        score=ScoreConfig(alpha=0.0),
    )


def _paper() -> RunConfig:
    return RunConfig(
        preset="paper",
        model=UNetConfig(resolution=256, unshuffle=1, base_channels=256, channel_mults=[1, 1, 2, 2, 4, 4],
                         num_res_blocks=2, attention_resolutions=[32, 16, 8], num_heads=4, dropout=0.0),
        train=TrainConfig(steps=10000, batch_size=2, lr=1e-4, warmup_steps=0, weight_decay=0.0, ema_decay=0.997,
                          max_timestep=1000, checkpoint_every=1000, bf16=True),
        score=ScoreConfig(),
    )


PRESETS = {"tiny": _tiny, "cpu": _cpu, "paper": _paper}


def preset(name: str) -> RunConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def validate(config: RunConfig) -> None:
    """Raise ValueError naming each setting that cannot work (before any file is written)."""
    train, score = config.train, config.score
    problems = []
    for name, value, ok in (
        ("train.steps", train.steps, train.steps >= 1),
        ("train.batch_size", train.batch_size, train.batch_size >= 1),
        ("train.lr", train.lr, train.lr > 0),
        ("train.num_threads", train.num_threads, train.num_threads >= 0),
        ("train.checkpoint_every", train.checkpoint_every, train.checkpoint_every >= 1),
        ("train.max_timestep", train.max_timestep, 1 <= train.max_timestep <= 1000),
        ("train.ema_decay", train.ema_decay, 0.0 <= train.ema_decay < 1.0),
        ("score.alpha", score.alpha, 0.0 <= score.alpha <= 1.0),
        ("score.batch_size", score.batch_size, score.batch_size >= 1),
        ("score.top_k", score.top_k, score.top_k >= 1),
        ("score.calibration_images", score.calibration_images, score.calibration_images >= 1),
        ("score.smoothing_sigma", score.smoothing_sigma, score.smoothing_sigma >= 0),
    ):
        if not ok:
            problems.append(f"{name} = {value!r}")
    if problems:
        raise ValueError("invalid settings: " + ", ".join(problems))
    config.model.validate()


def to_dict(config: RunConfig) -> dict[str, Any]:
    return asdict(config)


def from_dict(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Rebuild a RunConfig, refusing unknown or missing keys with a message naming them."""
    sections = {"model": UNetConfig, "train": TrainConfig, "score": ScoreConfig}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
    for name, cls in sections.items():
        section = data.get(name)
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} is missing or not a mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(section) - names
        if extra:
            raise ValueError(f"{source}: unknown keys in {name!r}: {sorted(extra)}")
        kwargs[name] = cls(**section)
    for key in ("preset", "data_root", "category"):
        if key in data:
            kwargs[key] = data[key]
    if "preset" not in kwargs:
        raise ValueError(f"{source}: key 'preset' is missing")
    return RunConfig(**kwargs)


def save_yaml(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(path: Path) -> RunConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the run configuration: {error}") from error
    return from_dict(data, source=str(path))


def differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Human-readable list of the settings that differ between two configs (``key: a -> b``)."""
    flat_a, flat_b = _flatten(to_dict(a)), _flatten(to_dict(b))
    return [f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

"""The public Python API: train, test, predict and demo, each the same as its command."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from . import evaluation, training
from .config import load_yaml, preset as named_preset
from .data import test_samples
from .reconstruction import ReconstructionSettings, reconstruct_files
from .scoring import Model, load_model
from .storage import atomic_write_text
from .synthetic import make_dataset


def train(*, data: Path, category: str, preset: str = "cpu", out: Path, steps: int | None = None,
          seed: int | None = None, threads: int | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Train a preset on ``data/category/train/good`` into the run folder ``out``; returns model.pt."""
    out = Path(out)
    if resume and (out / "config.yaml").exists():
        config = load_yaml(out / "config.yaml")
        if preset != config.preset:
            raise training.RunFolderError(f"{out}: run was made with preset {config.preset!r}, not {preset!r}")
    else:
        config = named_preset(preset)
    config.data_root = str(Path(data).resolve())
    config.category = category
    if steps is not None:
        config.train.steps = steps
    if seed is not None:
        config.train.seed = seed
    if threads is not None:
        config.train.num_threads = threads
    return training.train(config, out=out, resume=resume, overwrite=overwrite, progress=progress)


def _scoring_model(run: Path, *, bf16: bool, compile: bool) -> Model:
    """Load a run for scoring, with the optional bf16 autocast and torch.compile."""
    model = load_model(run)
    model.config.score.bf16 = bf16 or model.config.score.bf16
    if compile:
        model.unet = torch.compile(model.unet)
    return model


def test(*, run: Path, data: Path | None = None, category: str | None = None, out: Path | None = None,
         alpha: float | None = None, bf16: bool = False, compile: bool = False, overwrite: bool = False,
         progress: bool = True) -> tuple[dict[str, Any], str]:
    """Test a trained run on a labelled set (default: the one it was trained on); returns (metrics, table).

    ``bf16`` runs the UNet under bfloat16 autocast (faster on CPUs with AMX and on GPUs); ``compile``
    wraps it in torch.compile (a one-off compile of tens of seconds, then faster passes). Earlier
    results in ``out`` (default RUN/test) are replaced only with ``overwrite``."""
    model = _scoring_model(run, bf16=bf16, compile=compile)
    root = Path(data) if data is not None else Path(model.config.data_root)
    name = category or model.config.category
    samples = test_samples(root, name)
    out = Path(out) if out is not None else Path(run) / "test"
    metrics = evaluation.test(model, samples, out=out, category=name, alpha=alpha, overwrite=overwrite,
                              progress=progress)
    table = evaluation.format_table(metrics)
    atomic_write_text(out / "table.txt", table + "\n")
    return metrics, table


def predict(*, run: Path, inputs: Sequence[Path] | Path | str, out: Path, alpha: float | None = None,
            bf16: bool = False, compile: bool = False, overwrite: bool = False,
            progress: bool = True) -> list[tuple[Path, float]]:
    """Score images or folders of images (one path or a list); returns (path, score) pairs."""
    model = _scoring_model(run, bf16=bf16, compile=compile)
    return evaluation.predict(model, inputs, out=out, alpha=alpha, overwrite=overwrite, progress=progress)


def demo(*, out: Path = Path("defectdiff-demo"), steps: int = 300, progress: bool = True) -> tuple[str, Path]:
    """Make a synthetic set, train the demo preset on it, test it; returns (table, out).

    Running it again replaces the previous demo's run in ``out``; a folder that holds anything else
    is refused."""
    out = Path(out)
    data = out / "data"
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - {"data", "run"}):
        raise training.RunFolderError(f"{out}: exists and is not a demo folder; choose another --out")
    if not (data / "surface" / "train").exists():
        make_dataset(data, size=64, train=40, test_good=8, test_per_defect=6)
    config = named_preset("tiny")
    config.data_root = str(data.resolve())
    config.category = "surface"
    config.train.steps = steps
    config.train.checkpoint_every = max(50, steps // 4)
    training.train(config, out=out / "run", overwrite=True, progress=progress)
    _, table = test(run=out / "run", overwrite=True, progress=progress)
    return table, out


def bench(*, data: Path, categories: Sequence[str], methods: Sequence[str] = ("ours", "padim", "spade"),
          preset: str = "cpu", out: Path, runs: dict[str, Path] | None = None, steps: int | None = None,
          threads: int | None = None, alpha: float | None = None,
          progress: bool = True) -> tuple[dict[str, Any], str]:
    """Benchmark our model against PaDiM and SPADE per category; writes table.md and table.csv into
    ``out``; returns (results[category][method] = metrics, Markdown table)."""
    from .benchmark import run_benchmark  # benchmark builds on train and test above

    return run_benchmark(data=data, categories=categories, methods=methods, preset=preset, out=out, runs=runs,
                         steps=steps, threads=threads, alpha=alpha, progress=progress)


def reconstruct(*, run: Path, inputs: Sequence[Path], out: Path, loops: int = 100, step_size: float = 0.02,
                denoise_every: int = 5, denoise_t: int = 32) -> list[tuple[Path, Path, Path]]:
    """Gradient-denoise images with a run's model and PaDiM; returns (input, reconstruction PNG, panel PNG)."""
    settings = ReconstructionSettings(loops=loops, step_size=step_size, denoise_every=denoise_every,
                                      denoise_t=denoise_t)
    return reconstruct_files(run, inputs, out=out, settings=settings)


def sweep_alpha(*, run: Path, alphas: Sequence[float], test_dir: Path | None = None,
                out: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Metrics of a finished test for each alpha from its cached maps, without running the model."""
    from .benchmark import sweep_alpha as sweep

    return sweep(run=run, alphas=alphas, test_dir=test_dir, out=out)


__all__ = ["Model", "bench", "demo", "load_model", "predict", "reconstruct", "sweep_alpha", "test", "train"]

"""Scoring: per-image seeding, batch independence, one forward pass, map helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectdiff.data import test_samples as list_test_samples
from defectdiff.evaluation import score_samples
from defectdiff.scoring import gaussian_blur, load_model, scored_schedule, top_k_score
from defectdiff.config import ScoreConfig


def test_scores_do_not_depend_on_batch_size_or_order(tiny_run: Path, synthetic_root: Path) -> None:
    model = load_model(tiny_run)
    samples = list_test_samples(synthetic_root, "surface")[:10]
    model.config.score.batch_size = 1
    one = score_samples(model, samples, progress=False)
    model.config.score.batch_size = 16
    many = score_samples(model, samples[::-1], progress=False)
    np.testing.assert_allclose(one.pixel, many.pixel[::-1], atol=1e-5)
    np.testing.assert_allclose(one.feature, many.feature[::-1], atol=1e-5)


def test_one_forward_pass_per_batch(tiny_run: Path, synthetic_root: Path) -> None:
    model = load_model(tiny_run)
    calls: list[int] = []
    handle = model.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    samples = list_test_samples(synthetic_root, "surface")[:5]
    model.config.score.batch_size = 5
    score_samples(model, samples, progress=False)
    handle.remove()
    assert calls == [5 * len(model.config.score.timesteps)]


def test_paper_steps_are_indices_of_the_250_step_respacing() -> None:
    schedule, indices = scored_schedule(ScoreConfig())
    assert indices == [5, 50, 100]
    assert list(schedule.timesteps[indices]) == [20, 201, 401]
    with pytest.raises(ValueError, match="respacing"):
        scored_schedule(ScoreConfig(timesteps=[21]))


def test_gaussian_blur_keeps_mass_and_spreads_a_peak() -> None:
    maps = torch.zeros(1, 33, 33)
    maps[0, 16, 16] = 1.0
    out = gaussian_blur(maps, sigma=2.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 16, 16] < 0.1 and out[0, 16, 18] > 0.0
    assert torch.equal(gaussian_blur(maps, sigma=0.0), maps)


def test_top_k_scales_with_area() -> None:
    maps = torch.arange(256 * 256, dtype=torch.float32).reshape(1, 256, 256)
    expected = torch.arange(256 * 256 - 64, 256 * 256, dtype=torch.float32).mean()
    assert top_k_score(maps, top_k=64).item() == pytest.approx(expected.item())
    small = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    assert top_k_score(small, top_k=64).item() == pytest.approx(torch.arange(4092, 4096).float().mean().item())


def test_bf16_scoring_stays_close_to_fp32(tiny_run: Path, synthetic_root: Path) -> None:
    model = load_model(tiny_run)
    samples = list_test_samples(synthetic_root, "surface")[:6]
    full = score_samples(model, samples, progress=False)
    model.config.score.bf16 = True
    half = score_samples(model, samples, progress=False)
    for name in ("pixel", "feature"):
        a, b = getattr(full, name).ravel(), getattr(half, name).ravel()
        assert not np.array_equal(a, b), "autocast had no effect"
        assert np.corrcoef(a, b)[0, 1] > 0.95, name


def test_compiled_unet_scores_like_the_eager_one(tiny_run: Path, tmp_path: Path) -> None:
    from defectdiff import api

    source = sorted((Path(load_model(tiny_run).config.data_root) / "surface" / "test" / "blob").glob("*.png"))[:2]
    eager = api.predict(run=tiny_run, inputs=source, out=tmp_path / "eager", progress=False)
    compiled = api.predict(run=tiny_run, inputs=source, out=tmp_path / "compiled", compile=True, progress=False)
    for (_, a), (_, b) in zip(eager, compiled):
        assert a == pytest.approx(b, abs=1e-4)
    assert isinstance(api._scoring_model(tiny_run, bf16=False, compile=True).unet, torch._dynamo.eval_frame.OptimizedModule)

"""Gradient denoising removes a painted defect and leaves the rest of the image alone."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defectdiff import cli
from defectdiff.data import load_image
from defectdiff.reconstruction import (
    PADIM_FILE, ReconstructionSettings, load_or_fit_padim, reconstruct,
)
from defectdiff.scoring import load_model
from defectdiff.synthetic import paint_defect


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run, so caching padim.pt leaves the shared run untouched."""
    copy = tmp_path_factory.mktemp("reconstruction") / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("kind", ["blob", "spot"])
def test_reconstruction_removes_a_painted_defect(run_copy: Path, synthetic_root: Path, kind: str) -> None:
    model = load_model(run_copy)
    padim = load_or_fit_padim(run_copy, model=model)
    clean = load_image(synthetic_root / "surface" / "test" / "good" / "000.png")
    defective, mask = paint_defect(clean, np.random.default_rng(0), kind=kind)
    clean_t, input_t = _tensor(clean), _tensor(defective)
    recon = reconstruct(model, padim, input_t, ReconstructionSettings(loops=20))

    inside = torch.from_numpy(mask)
    input_error = (input_t - clean_t).abs().mean(dim=1)[0][inside].mean()
    recon_error = (recon - clean_t).abs().mean(dim=1)[0][inside].mean()
    assert recon_error < 0.85 * input_error
    change = (recon - input_t).abs().mean(dim=1)[0]
    assert change[~inside].mean() < 0.03
    assert change[inside].mean() > 3 * change[~inside].mean()


def test_padim_is_cached_in_the_run(run_copy: Path) -> None:
    model = load_model(run_copy)
    first = load_or_fit_padim(run_copy, model=model)
    path = run_copy / PADIM_FILE
    stamp = path.stat().st_mtime_ns
    second = load_or_fit_padim(run_copy, model=model)
    assert path.stat().st_mtime_ns == stamp
    assert torch.equal(first.mean, second.mean) and torch.equal(first.precision, second.precision)
    assert second.resolution == model.config.model.resolution


def test_reconstruct_command_writes_panels(run_copy: Path, synthetic_root: Path, tmp_path: Path) -> None:
    defective = synthetic_root / "surface" / "test" / "blob" / "000.png"
    outside = tmp_path / "loose.png"
    shutil.copy(synthetic_root / "surface" / "test" / "good" / "001.png", outside)
    out = tmp_path / "out"
    code = cli.main(["reconstruct", "--run", str(run_copy), str(defective), str(outside), "--out", str(out),
                     "--loops", "2", "--denoise-every", "1"])
    assert code == 0
    recon = np.asarray(Image.open(out / "0000_000_reconstruction.png"))
    assert recon.shape == (64, 64, 3)
    tile = 256 + 4
    with_truth = Image.open(out / "0000_000_panel.png")
    without_truth = Image.open(out / "0001_loose_panel.png")
    assert with_truth.size == (6 * tile - 4, 256)
    assert without_truth.size == (5 * tile - 4, 256)
    truth = np.asarray(with_truth)[:, -256:]
    assert truth.max() == 255 and truth.min() == 0
    assert not np.array_equal(np.asarray(with_truth)[:, :256], np.asarray(with_truth)[:, tile : tile + 256])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="denoise-every"):
        ReconstructionSettings(denoise_every=0)
    with pytest.raises(ValueError, match="step size"):
        ReconstructionSettings(step_size=1.5)

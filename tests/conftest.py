"""Shared test fixtures: the read-only data beside the checkout, skipped with a message where it is missing."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("DEFECTDIFF_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the calling test, saying so, when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-style category 'surface' (64 px) shared by the tests that only read it."""
    from defectdiff.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, size=64, train=24, test_good=6, test_per_defect=4, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` run trained once on the synthetic set (read-only for the tests that use it)."""
    from defectdiff.api import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(data=synthetic_root, category="surface", preset="tiny", out=out, progress=False)
    return out

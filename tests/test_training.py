"""Training: run folder, exact resume (also after SIGKILL), reproducibility, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from defectdiff.api import train
from defectdiff.config import preset
from defectdiff.storage import CheckpointError, load_checkpoint
from defectdiff.training import RunFolderError, learning_rate
from defectdiff.training import train as train_config


def _small(root: Path, steps: int = 12):
    config = preset("tiny")
    config.data_root, config.category = str(root), "surface"
    config.train.steps, config.train.checkpoint_every = steps, 4
    config.score.calibration_images = 4
    return config


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["ema"]


def test_same_seed_gives_identical_losses_and_weights(synthetic_root: Path, tmp_path: Path) -> None:
    a = train_config(_small(synthetic_root), out=tmp_path / "a", progress=False)
    b = train_config(_small(synthetic_root), out=tmp_path / "b", progress=False)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    for key, value in _weights(a).items():
        assert torch.equal(value, _weights(b)[key]), key
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["torch_version"] == torch.__version__ and record["seed"] == 0
    assert len(record["train_files"]) == 24 and all(f["bytes"] > 0 for f in record["train_files"])
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["preset"] == "tiny" and saved["train"]["steps"] == 12


def test_resume_matches_uninterrupted_run(synthetic_root: Path, tmp_path: Path) -> None:
    full = train_config(_small(synthetic_root), out=tmp_path / "full", progress=False)
    train_config(_small(synthetic_root), out=tmp_path / "part", progress=False, stop_after=5)
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == 4
    resumed = train_config(_small(synthetic_root), out=tmp_path / "part", resume=True, progress=False)
    for key, value in _weights(full).items():
        assert torch.equal(value, _weights(resumed)[key]), key
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_sigkill_mid_run_then_resume_gives_same_weights(synthetic_root: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "defectdiff.cli", "train", "--data", str(synthetic_root), "--category", "surface",
            "--preset", "tiny", "--steps", "40", "--out", str(tmp_path / "killed"), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "training never wrote a checkpoint"
    load_checkpoint(checkpoint)
    assert not (tmp_path / "killed" / "model.pt").exists()
    subprocess.run(args + ["--resume"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reference = train(data=synthetic_root, category="surface", preset="tiny", steps=40, out=tmp_path / "ref",
                      progress=False)
    for key, value in _weights(reference).items():
        assert torch.equal(value, _weights(tmp_path / "killed" / "model.pt")[key]), key


def test_existing_run_folder_needs_overwrite_or_resume(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(RunFolderError, match="--overwrite or --resume"):
        train_config(_small(synthetic_root), out=out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"


def test_resume_refuses_a_changed_config(synthetic_root: Path, tmp_path: Path) -> None:
    train_config(_small(synthetic_root), out=tmp_path / "run", progress=False, stop_after=4)
    changed = _small(synthetic_root)
    changed.train.lr = 0.5
    with pytest.raises(RunFolderError, match=r"train\.lr: 0\.001 -> 0\.5"):
        train_config(changed, out=tmp_path / "run", resume=True, progress=False)
    other = preset("cpu")
    other.data_root, other.category = str(synthetic_root), "surface"
    with pytest.raises(RunFolderError, match="model.resolution: 64 -> 256"):
        train_config(other, out=tmp_path / "run", resume=True, progress=False)


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "defectdiff-model-v1", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_learning_rate_warms_up_and_decays_to_zero() -> None:
    config = preset("cpu")
    assert learning_rate(config, 0) == pytest.approx(config.train.lr / config.train.warmup_steps)
    assert learning_rate(config, config.train.warmup_steps) == pytest.approx(config.train.lr)
    assert learning_rate(config, config.train.steps) == 0.0

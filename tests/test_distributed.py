"""Data-parallel training with torchrun (gloo on CPU): same CLI, rank 0 writes, same result as one process.

Weights are compared to 2e-4: Adam turns float rounding in near-zero early gradients into steps of
about lr, so bit equality between the two reductions is not expected."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defectdiff import api
from defectdiff.storage import load_checkpoint


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(synthetic_root: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "defectdiff.cli", "train", "--data", str(synthetic_root), "--category", "surface",
           "--preset", "tiny", "--steps", "8", "--out", str(out), "--quiet"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "log.jsonl").read_text().splitlines()) == 8

    single = api.train(data=synthetic_root, category="surface", preset="tiny", steps=8, out=tmp_path / "one",
                       progress=False)
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (out, tmp_path / "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    ddp_weights = load_checkpoint(out / "model.pt")["ema"]
    for key, value in load_checkpoint(single)["ema"].items():
        torch.testing.assert_close(ddp_weights[key], value, atol=2e-4, rtol=1e-3, msg=key)

    metrics, _ = api.test(run=out, progress=False)
    assert 0.0 <= metrics["overall"]["pixel_auroc"] <= 1.0


def test_resume_under_torchrun_matches_resume_in_one_process(synthetic_root: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "defectdiff.cli", "train", "--data", str(synthetic_root), "--category", "surface",
            "--preset", "tiny", "--out", str(tmp_path / "ddp"), "--quiet"]
    for extra in (["--steps", "4"], ["--steps", "8", "--resume"]):
        result = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    api.train(data=synthetic_root, category="surface", preset="tiny", steps=4, out=tmp_path / "one", progress=False)
    single = api.train(data=synthetic_root, category="surface", preset="tiny", steps=8, out=tmp_path / "one",
                       resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    ddp_weights = load_checkpoint(tmp_path / "ddp" / "model.pt")["ema"]
    for key, value in load_checkpoint(single)["ema"].items():
        torch.testing.assert_close(ddp_weights[key], value, atol=2e-4, rtol=1e-3, msg=key)

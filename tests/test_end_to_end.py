"""End to end: train `tiny`, test and predict, on real (hazelnut_toy) and self-made data."""

import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from conftest import shared_path
from defectdiff import api
from defectdiff.data import image_size


def test_tiny_on_hazelnut_writes_every_output(tmp_path: Path) -> None:
    root = shared_path("hazelnut_toy").parent
    run = tmp_path / "run"
    model_path = api.train(data=root, category="hazelnut_toy", preset="tiny", out=run, steps=30, progress=False)
    assert model_path.is_file()
    for name in ("config.yaml", "run.json", "log.jsonl", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert len((run / "log.jsonl").read_text().splitlines()) == 30

    metrics, table = api.test(run=run, progress=False)
    out = run / "test"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["overall"]["images"] == 23
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert 0.0 <= saved["overall"][key] <= 1.0
        assert 0.0 <= saved["per_defect"]["colour"][key] <= 1.0
    assert "overall" in table and "colour" in table

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 23 and {r["label"] for r in rows} == {"0", "1"}
    maps = sorted((out / "anomaly_maps" / "hazelnut_toy" / "test").rglob("*.tiff"))
    assert len(maps) == 23
    for tiff in maps:
        values = tifffile.imread(tiff)
        source = root / "hazelnut_toy" / "test" / tiff.parent.name / f"{tiff.stem}.jpg"
        assert values.dtype == np.float32 and values.shape == image_size(source)
        assert np.isfinite(values).all()
    overlays = sorted((out / "overlays").rglob("*.png"))
    assert len(overlays) == 23
    assert Image.open(overlays[0]).size[1] == 256
    assert (out / "raw_maps.npz").is_file()

    pred_out = tmp_path / "pred"
    folder = root / "hazelnut_toy" / "test" / "good"
    results = api.predict(run=run, inputs=[folder], out=pred_out, progress=False)
    assert len(results) == len(list(folder.glob("*.jpg")))
    assert all(np.isfinite(score) for _, score in results)
    assert len(list(pred_out.rglob("*.tiff"))) == len(results)
    assert len(list(pred_out.rglob("*.png"))) == len(results)


def test_tiny_localizes_painted_defects(tiny_run: Path) -> None:
    metrics, _ = api.test(run=tiny_run, progress=False)
    assert metrics["overall"]["pixel_auroc"] > 0.9
    assert metrics["overall"]["aupro"] > 0.7

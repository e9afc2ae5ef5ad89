"""Benchmark table writer, `defectdiff bench` end to end, and the alpha sweep from cached maps."""

import csv
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import shared_path
from defectdiff import api, cli, scoring
from defectdiff.benchmark import (
    NOT_RUN, SEE_PAPER, format_csv, format_markdown, parse_runs, run_benchmark, table_rows,
)
from defectdiff.networks import UNet


def _metrics(pixel: float | None, pro: float, image: float, train: float, speed: float) -> dict[str, Any]:
    return {"overall": {"pixel_auroc": pixel, "aupro": pro, "image_auroc": image, "images": 10},
            "per_defect": {}, "train_seconds": train, "images_per_second": speed}


RESULTS = {
    "bottle": {"ours": _metrics(0.981, 0.912, 0.995, 100.0, 2.5),
               "padim": _metrics(0.97, 0.90, 0.98, 30.0, 8.0)},
    "cable": {"ours": _metrics(0.951, 0.85, 0.905, 300.0, 1.5),
              "padim": _metrics(None, 0.80, 0.90, 50.0, 6.0),
              "spade": _metrics(0.96, 0.88, 0.91, 15.0, 1.25)},
}


def _rows(results: dict) -> dict[str, dict[str, str]]:
    header, rows = table_rows(results)
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_table_cells_average_and_not_run() -> None:
    rows = _rows(RESULTS)
    assert list(rows) == ["bottle", "cable", "Average"]
    assert rows["bottle"]["Ours"] == "(98.1, 91.2)"
    assert rows["cable"]["Ours"] == "(95.1, 85.0)"
    assert rows["Average"]["Ours"] == "(96.6, 88.1)"
    assert rows["Average"]["Ours image AUROC"] == "95.0"
    assert rows["Average"]["Ours train (s)"] == "200.0"
    assert rows["Average"]["Ours images/s"] == "2.00"
    assert rows["cable"]["PaDiM"] == "(n/a, 80.0)"
    assert rows["Average"]["PaDiM"] == "(n/a, 85.0)"
    assert rows["bottle"]["SPADE"] == "not run" and rows["cable"]["SPADE"] == "(96.0, 88.0)"
    assert rows["Average"]["SPADE"] == "not run"
    for label in ("CFlow", "DRAEM", "UniAD"):
        for row in rows.values():
            assert row[label] == "not run"
            assert row[f"{label} image AUROC"] == row[f"{label} train (s)"] == row[f"{label} images/s"] == "not run"
    assert len(NOT_RUN) == 3


def test_csv_parses_to_the_same_table() -> None:
    parsed = list(csv.DictReader(io.StringIO(format_csv(RESULTS))))
    assert [row["Category"] for row in parsed] == ["bottle", "cable", "Average"]
    assert parsed[0]["Ours"] == "(98.1, 91.2)" and parsed[0]["PaDiM images/s"] == "8.00"
    assert parsed[2]["DRAEM"] == "not run"
    assert {row["Category"]: row for row in parsed} == _rows(RESULTS)


def test_paper_figures_only_in_their_own_section() -> None:
    markdown = format_markdown(RESULTS, preset="cpu", resolution=256)
    ours, paper = markdown.split("## The paper's Table 1")
    assert "NOT our results" in paper.splitlines()[0]
    assert SEE_PAPER not in ours and "(98.1, 91.2)" in ours and "(98.1, 91.2)" not in paper
    assert paper.count(SEE_PAPER) >= 2 * 6
    assert "| Ours |" not in paper and "The paper's method" in paper

    given = format_markdown(RESULTS, preset="cpu", resolution=256, paper={"bottle": {"padim": (12.3, 45.6)}})
    ours, paper = given.split("## The paper's Table 1")
    assert "(12.3, 45.6)" in paper and "(12.3, 45.6)" not in ours


def test_bad_options_are_refused(tmp_path: Path) -> None:
    assert parse_runs("bottle=runs/b, cable=/x/c") == {"bottle": Path("runs/b"), "cable": Path("/x/c")}
    with pytest.raises(ValueError, match="CATEGORY=RUN_DIR"):
        parse_runs("bottle")
    with pytest.raises(ValueError, match="not run"):
        run_benchmark(data=tmp_path, categories=["bottle"], methods=["ours", "draem"], out=tmp_path)
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark(data=tmp_path, categories=["bottle"], methods=["patchcore"], out=tmp_path)
    with pytest.raises(ValueError, match="not benchmarked"):
        run_benchmark(data=tmp_path, categories=["bottle"], methods=["ours"], out=tmp_path,
                      runs={"cable": tmp_path})


def test_bench_command_on_hazelnut(tmp_path: Path) -> None:
    root = shared_path("hazelnut_toy").parent
    out = tmp_path / "bench"
    code = cli.main(["bench", "--data", str(root), "--categories", "hazelnut_toy", "--methods", "ours,padim,spade",
                     "--preset", "tiny", "--steps", "10", "--threads", "1", "--out", str(out), "--quiet"])
    assert code == 0
    rows = {row["Category"]: row for row in csv.DictReader((out / "table.csv").open())}
    assert set(rows) == {"hazelnut_toy", "Average"}
    markdown = (out / "table.md").read_text()
    for label in ("Ours", "PaDiM", "SPADE"):
        pixel, pro = map(float, re.fullmatch(r"\((\d+\.\d), (\d+\.\d)\)", rows["hazelnut_toy"][label]).groups())
        image = float(rows["hazelnut_toy"][f"{label} image AUROC"])
        assert all(0.0 <= v <= 100.0 for v in (pixel, pro, image)), label
        assert float(rows["hazelnut_toy"][f"{label} train (s)"]) > 0
        assert float(rows["hazelnut_toy"][f"{label} images/s"]) > 0
        assert rows["hazelnut_toy"][label] in markdown
    assert rows["hazelnut_toy"]["UniAD"] == "not run"
    for method, label in (("ours", "Ours"), ("padim", "PaDiM"), ("spade", "SPADE")):
        saved = json.loads((out / "hazelnut_toy" / method / "metrics.json").read_text())
        assert saved["overall"]["images"] == 23
        expected = f"({100 * saved['overall']['pixel_auroc']:.1f}, {100 * saved['overall']['aupro']:.1f})"
        assert rows["hazelnut_toy"][label] == expected
    assert (out / "runs" / "hazelnut_toy" / "model.pt").is_file()
    assert (out / "hazelnut_toy" / "ours" / "raw_maps.npz").is_file()


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the model was run")


def test_sweep_alpha_uses_cached_maps_only(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_dir = tmp_path / "test"
    api.test(run=tiny_run, out=test_dir, progress=False)
    saved = json.loads((test_dir / "metrics.json").read_text())
    monkeypatch.setattr(UNet, "forward", _refuse)
    monkeypatch.setattr(scoring, "raw_maps", _refuse)
    with pytest.raises(AssertionError, match="the model was run"):
        api.test(run=tiny_run, out=tmp_path / "again", progress=False)

    out = tmp_path / "sweep"
    code = cli.main(["sweep-alpha", "--run", str(tiny_run), "--test-dir", str(test_dir), "--alphas", "0,0.5,1",
                     "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "alpha_sweep.csv").open()))
    assert [row["alpha"] for row in rows] == ["0", "0.5", "1"]
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert float(rows[1][key]) == pytest.approx(saved["overall"][key], abs=2e-3)
    assert rows[0]["pixel_auroc"] != rows[2]["pixel_auroc"]
    assert "0.5 (run)" in (out / "alpha_sweep.md").read_text()
    assert (out / "alpha_sweep.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)

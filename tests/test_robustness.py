"""Robustness of whole runs: odd sets, broken maps, the command line's errors, atomic writes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from defectdiff import api
from defectdiff.cli import main
from defectdiff.data import test_samples as list_test_samples
from defectdiff.evaluation import score_samples, set_metrics
from defectdiff.scoring import load_model
from defectdiff.storage import atomic_save, atomic_write_text
from defectdiff.synthetic import make_dataset


def test_test_set_with_only_good_images_reports_undefined_metrics(tiny_run: Path, synthetic_root: Path,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "surface", root / "surface")
    for defect in ("blob", "scratch", "spot"):
        shutil.rmtree(root / "surface" / "test" / defect)
        shutil.rmtree(root / "surface" / "ground_truth" / defect)
    metrics, table = api.test(run=tiny_run, data=root, category="surface", out=tmp_path / "out", progress=False)
    overall = metrics["overall"]
    assert overall["pixel_auroc"] is None and overall["aupro"] is None and overall["image_auroc"] is None
    assert "defective region" in overall["undefined"]["pixel_auroc"]
    assert "n/a" in table
    assert len(list((tmp_path / "out" / "anomaly_maps").rglob("*.tiff"))) == 6


def test_test_set_with_only_defects_still_gives_pixel_metrics(tiny_run: Path, synthetic_root: Path,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "surface", root / "surface")
    shutil.rmtree(root / "surface" / "test" / "good")
    metrics, _ = api.test(run=tiny_run, data=root, category="surface", out=tmp_path / "out", progress=False)
    assert metrics["overall"]["image_auroc"] is None
    assert "one" in metrics["overall"]["undefined"]["image_auroc"].lower()
    assert 0.0 <= metrics["overall"]["pixel_auroc"] <= 1.0 and 0.0 <= metrics["overall"]["aupro"] <= 1.0


def test_constant_maps_give_chance_level_metrics() -> None:
    masks = [np.zeros((8, 8), bool), np.zeros((8, 8), bool)]
    masks[1][2:4, 2:4] = True
    result = set_metrics(maps=[np.ones((8, 8))] * 2, masks=masks, scores=[1.0, 1.0], labels=[0, 1])
    assert result["pixel_auroc"] == 0.5 and result["image_auroc"] == 0.5
    assert result["aupro"] == pytest.approx(0.15)


def test_nan_in_a_map_names_the_image(tiny_run: Path, synthetic_root: Path) -> None:
    model = load_model(tiny_run)
    with torch.no_grad():
        model.unet.out_conv.bias.fill_(float("nan"))
    samples = list_test_samples(synthetic_root, "surface")[:2]
    with pytest.raises(ValueError, match=str(samples[0].image_path)):
        score_samples(model, samples, progress=False)


def test_train_set_of_one_image(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", size=64, train=1, test_good=2, test_per_defect=2, defects=("blob",)).parent
    api.train(data=root, category="surface", preset="tiny", steps=3, out=tmp_path / "run", progress=False)
    metrics, _ = api.test(run=tmp_path / "run", progress=False)
    assert 0.0 <= metrics["overall"]["pixel_auroc"] <= 1.0


def test_cli_errors_are_one_line_naming_the_problem(tmp_path: Path, synthetic_root: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", str(synthetic_root), "--category", "nope", "--preset", "tiny",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "surface" in err and "Traceback" not in err
    code = main(["test", "--run", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "model.pt" in err and "Traceback" not in err
    code = main(["predict", "--run", str(tmp_path / "missing"), str(tmp_path / "x.png"), "--out", str(tmp_path)])
    assert code == 2


def test_cli_refuses_a_malicious_model_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "run").mkdir()
    torch.save({"format": "defectdiff-model-v1", "x": Payload()}, tmp_path / "run" / "model.pt")
    code = main(["test", "--run", str(tmp_path / "run")])
    assert code == 2 and "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_predict_on_a_corrupt_image_names_it_and_writes_nothing(tiny_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    code = main(["predict", "--run", str(tiny_run), str(bad.parent), "--out", str(tmp_path / "out")])
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_failed_atomic_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def explode(obj: object, tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(path, {"a": 1}, save=explode)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_bad_settings_and_bad_training_images_leave_no_run_folder(synthetic_root: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--data", str(synthetic_root), "--category", "surface", "--preset", "tiny", "--quiet"]
    assert main(base + ["--steps", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "train.steps = 0" in capsys.readouterr().err
    assert main(base + ["--threads", "-2", "--out", str(tmp_path / "threads")]) == 2
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "surface", root / "surface")
    (root / "surface" / "train" / "good" / "zzz.png").write_text("not an image")
    assert main(["train", "--data", str(root), "--category", "surface", "--preset", "tiny",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "zzz.png" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("zero", "threads", "bad"))
    (tmp_path / "file").write_text("x")
    assert main(base + ["--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_score_depends_on_pixels_not_on_name_or_position(tiny_run: Path, synthetic_root: Path,
                                                         tmp_path: Path) -> None:
    source = next((synthetic_root / "surface" / "test" / "blob").glob("*.png"))
    for name in ("a.png", "zz.png"):
        shutil.copy(source, tmp_path / name)
    results = api.predict(run=tiny_run, inputs=[tmp_path / "a.png", source, tmp_path / "zz.png", source],
                          out=tmp_path / "out", progress=False)
    scores = [score for _, score in results]
    assert max(scores) - min(scores) < 1e-6
    assert sorted(p.name for p in (tmp_path / "out" / "anomaly_maps").iterdir()) == [
        "a.tiff", "blob_000_1.tiff", "blob_000_2.tiff", "zz.tiff"]


def test_earlier_results_are_replaced_only_with_overwrite(tiny_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    source = next(Path(load_model(tiny_run).config.data_root).glob("surface/test/good/*.png"))
    out = tmp_path / "out"
    assert main(["predict", "--run", str(tiny_run), str(source), str(source.with_name("001.png")),
                 "--out", str(out), "--quiet"]) == 0
    assert main(["predict", "--run", str(tiny_run), str(source), "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", "--run", str(tiny_run), str(source), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert len(list((out / "anomaly_maps").iterdir())) == 1
    assert main(["test", "--run", str(tiny_run), "--alpha", "2", "--out", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


def test_a_model_file_that_is_not_a_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("hello")
    assert main(["test", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "model.pt" in err


def test_metrics_stream_full_size_maps_instead_of_holding_a_second_copy() -> None:
    import tracemalloc

    from defectdiff.evaluation import OriginalSizeMaps
    from defectdiff.metrics import aupro, pixel_auroc

    rng = np.random.default_rng(0)
    small = torch.from_numpy(rng.random((30, 64, 64), dtype=np.float32))
    sizes = [(400, 380)] * 30
    masks = [np.zeros(size, bool) for size in sizes]
    for i, mask in enumerate(masks[::2]):
        mask[50 + i : 120 + i, 60:140] = True
    lazy = OriginalSizeMaps(small, sizes)
    full_bytes = sum(h * w * 4 for h, w in sizes)
    eager = [lazy[i] for i in range(len(lazy))]
    assert pixel_auroc(lazy, masks) == pixel_auroc(eager, masks)
    assert aupro(lazy, masks) == aupro(eager, masks)
    del eager


    def peak_of(run) -> int:
        tracemalloc.start()
        run()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    class NumpyMaps:
        """Full-size maps made with numpy on each read, so tracemalloc sees them."""

        def __len__(self) -> int:
            return len(sizes)

        def __getitem__(self, index: int) -> np.ndarray:
            return np.random.default_rng(index).random(sizes[index], dtype=np.float32)

    numpy_maps = NumpyMaps()
    for metric in (pixel_auroc, aupro):
        streamed = peak_of(lambda: metric(numpy_maps, masks))
        held = peak_of(lambda: metric([numpy_maps[i] for i in range(len(numpy_maps))], masks))
        assert streamed < held - 0.8 * full_bytes, (metric.__name__, streamed / full_bytes, held / full_bytes)

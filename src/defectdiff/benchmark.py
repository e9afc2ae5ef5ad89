"""Benchmarks: our model against PaDiM and SPADE on equal terms, and a sweep of the map weight alpha.

``run_benchmark`` trains (or takes) one run per category, fits the baselines on the same training
images, scores every method on the same test images at the preset's model resolution and computes
the metrics with the same code (``evaluation.metrics_by_type`` at each image's original size). The
table follows the layout of the paper's Table 1: one row per category, one column per method, cells
"(pixel AUROC, PRO)" in percent. Methods of the paper that are not implemented here keep their
columns, marked "not run". The paper's own figures are shown only in a separate, labelled section.

``sweep_alpha`` recomputes the metrics of a finished test for several alphas from its cached raw maps
(``raw_maps.npz``), without running the model.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import api
from .backbone import FeatureExtractor
from .baselines import BASELINES
from .config import load_yaml, preset as named_preset
from .data import Sample, test_samples, train_samples
from .evaluation import OriginalSizeMaps, evaluate_scored, load_raw_maps, metrics_by_type
from .scoring import check_alpha, load_model
from .storage import atomic_save, atomic_write_json, atomic_write_text, load_checkpoint
from .training import load_images

OURS = "ours"
RUNNABLE = (OURS, *BASELINES)
"""Methods this package can run."""

NOT_RUN = ("cflow", "draem", "uniad")
"""Methods of the paper's Table 1 that are not implemented here; their columns say "not run"."""

LABELS = {OURS: "Ours", "padim": "PaDiM", "spade": "SPADE", "cflow": "CFlow", "draem": "DRAEM", "uniad": "UniAD"}
TABLE_METHODS = (*RUNNABLE, *NOT_RUN)
PAPER_LABELS = {OURS: "The paper's method"}
"""Column names of the paper's figures where ours would mislead."""

PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {}
"""The paper's Table 1 figures, category -> method -> (pixel AUROC, PRO) in percent. Only figures known
for certain belong here; none are entered, so the reference section says "see paper Table 1"."""

SEE_PAPER = "see paper Table 1"
NOT_RUN_CELL = "not run"
MISSING = "n/a"


def parse_list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_runs(text: str | None) -> dict[str, Path]:
    """'cat=RUN_DIR,cat2=RUN_DIR2' -> {cat: Path}; a ValueError names a malformed item."""
    runs: dict[str, Path] = {}
    for item in parse_list(text or ""):
        category, sep, folder = item.partition("=")
        if not sep or not category.strip() or not folder.strip():
            raise ValueError(f"--runs item {item!r} is not CATEGORY=RUN_DIR")
        runs[category.strip()] = Path(folder.strip())
    return runs


def _check_methods(methods: Sequence[str]) -> None:
    """Refuse unknown methods, and say that the paper's other methods are listed but not run."""
    for method in methods:
        if method in NOT_RUN:
            raise ValueError(f"method {method!r} is not implemented in defectdiff; the table lists it as "
                             f"'{NOT_RUN_CELL}'. Choose from {', '.join(RUNNABLE)}")
        if method not in RUNNABLE:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(RUNNABLE)}")
    if not methods:
        raise ValueError(f"no methods given; choose from {', '.join(RUNNABLE)}")


def _reusable_run(folder: Path, *, preset: str, steps: int | None) -> bool:
    """Whether ``folder`` holds a finished run made with this preset (and step count, if one is given).

    A finished run made otherwise is refused rather than silently replaced or extended."""
    if not (folder / "model.pt").is_file():
        return False
    config = load_yaml(folder / "config.yaml")
    if config.preset == preset and (steps is None or config.train.steps == steps):
        return True
    raise ValueError(f"{folder} holds a finished run with preset {config.preset!r} and {config.train.steps} steps, "
                     f"not {preset!r}" + ("" if steps is None else f" with {steps} steps")
                     + "; remove it, or pass it with --runs")


def _check_resolution(run: Path, *, resolution: int, preset: str) -> None:
    """Refuse a run made at another resolution than the preset's, since all methods share one."""
    run_resolution = load_yaml(run / "config.yaml").model.resolution
    if run_resolution != resolution:
        raise ValueError(f"{run}: run works at {run_resolution} px but preset {preset!r} at {resolution} px; "
                         "every method must be tested at the same resolution")


def run_ours(*, data: Path, category: str, preset: str, out: Path, run: Path | None = None, steps: int | None = None,
             threads: int | None = None, alpha: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (into ``out/runs/<category>``) or take a run, test it with ``api.test`` into
    ``out/<category>/ours`` and return its metrics with train time and throughput.

    Train time is measured around training; for a given or reused run it is the training-loop time
    recorded in its model.pt."""
    resolution = named_preset(preset).model.resolution
    train_seconds: float | None
    if run is None:
        run = Path(out) / "runs" / category
        if not _reusable_run(run, preset=preset, steps=steps):
            start = time.perf_counter()
            api.train(data=data, category=category, preset=preset, out=run, steps=steps, threads=threads,
                      resume=(run / "config.yaml").is_file(), progress=progress)
            train_seconds, source = round(time.perf_counter() - start, 2), "measured"
        else:
            train_seconds, source = load_checkpoint(run / "model.pt").get("train_seconds"), "model.pt"
    else:
        train_seconds, source = load_checkpoint(Path(run) / "model.pt").get("train_seconds"), "model.pt"
    _check_resolution(Path(run), resolution=resolution, preset=preset)
    folder = Path(out) / category / OURS
    metrics, _ = api.test(run=run, data=data, category=category, out=folder, alpha=alpha, overwrite=True,
                          progress=progress)
    metrics.update({"method": OURS, "run": str(run), "resolution": resolution, "train_seconds": train_seconds,
                    "train_seconds_source": source})
    atomic_write_json(folder / "metrics.json", metrics)
    return metrics


def run_baseline(name: str, *, train: Sequence[Sample], test: Sequence[Sample], resolution: int, out: Path,
                 backbone: FeatureExtractor | None = None) -> dict[str, Any]:
    """Fit a baseline on the training images and test it like our model; writes ``out/metrics.json``.

    Train time covers loading the training images and fitting; throughput covers loading the test
    images and scoring them, as for our model."""
    method = BASELINES[name](backbone=backbone)
    start = time.perf_counter()
    method.fit(load_images(list(train), resolution=resolution))
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    maps = method.anomaly_maps(load_images(list(test), resolution=resolution))
    scores = method.image_scores(maps)
    score_seconds = time.perf_counter() - start
    masks = [s.load_mask() for s in test]
    originals = OriginalSizeMaps(maps, [mask.shape for mask in masks])
    metrics = metrics_by_type(maps=originals, masks=masks, scores=[float(s) for s in scores], samples=test)
    metrics.update({"method": name, "resolution": resolution, "train_seconds": round(train_seconds, 2),
                    "score_seconds": round(score_seconds, 2),
                    "images_per_second": round(len(test) / max(score_seconds, 1e-9), 3)})
    atomic_write_json(Path(out) / "metrics.json", metrics)
    return metrics


def run_benchmark(*, data: Path, categories: Sequence[str], methods: Sequence[str], preset: str = "cpu", out: Path,
                  runs: Mapping[str, Path] | None = None, steps: int | None = None, threads: int | None = None,
                  alpha: float | None = None,
                  progress: bool = True) -> tuple[dict[str, dict[str, dict[str, Any]]], str]:
    """Run each method on each category; writes per-method metrics.json, ``table.md``, ``table.csv`` and
    ``results.json`` under ``out``. Returns (results[category][method] = metrics, markdown table)."""
    _check_methods(methods)
    runs = dict(runs or {})
    unknown = set(runs) - set(categories)
    if unknown:
        raise ValueError(f"--runs names categories that are not benchmarked: {', '.join(sorted(unknown))}")
    if not categories:
        raise ValueError("no categories given")
    if threads:
        torch.set_num_threads(threads)
    resolution = named_preset(preset).model.resolution
    out = Path(out)
    if OURS in methods:
        for category in categories:
            if category in runs:
                _check_resolution(runs[category], resolution=resolution, preset=preset)
            else:
                _reusable_run(out / "runs" / category, preset=preset, steps=steps)
    backbone = FeatureExtractor() if set(methods) & set(BASELINES) else None
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for category in categories:
        train, test = train_samples(data, category), test_samples(data, category)
        results[category] = {}
        for method in methods:
            if method == OURS:
                results[category][method] = run_ours(data=data, category=category, preset=preset, out=out,
                                                     run=runs.get(category), steps=steps, threads=threads, alpha=alpha,
                                                     progress=progress)
            else:
                results[category][method] = run_baseline(method, train=train, test=test, resolution=resolution,
                                                         out=out / category / method, backbone=backbone)
    table = write_tables(results, out=out, preset=preset, resolution=resolution)
    atomic_write_json(out / "results.json", results)
    return results, table


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _number(value: float | None, *, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    """Mean over categories; None when any category lacks the value, so an average never hides a gap."""
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def _summary(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    overall = metrics["overall"]
    return {"pixel_auroc": overall.get("pixel_auroc"), "aupro": overall.get("aupro"),
            "image_auroc": overall.get("image_auroc"), "train_seconds": metrics.get("train_seconds"),
            "images_per_second": metrics.get("images_per_second")}


def table_rows(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per category, then "Average") of the benchmark table.

    Columns: category; per method of the paper's Table 1 "(pixel AUROC, PRO)" in percent with one
    decimal; then per method image AUROC (%), train time (s) and test throughput (images/s). Methods
    without results are marked "not run"."""
    header = ["Category"] + [LABELS[m] for m in TABLE_METHODS]
    for method in TABLE_METHODS:
        label = LABELS[method]
        header += [f"{label} image AUROC", f"{label} train (s)", f"{label} images/s"]
    summaries = {c: {m: _summary(v) for m, v in by_method.items()} for c, by_method in results.items()}
    average: dict[str, dict[str, float | None]] = {}
    for method in TABLE_METHODS:
        per_category = [summaries[c].get(method) for c in summaries]
        if per_category and all(s is not None for s in per_category):
            average[method] = {key: _mean([s[key] for s in per_category]) for key in per_category[0]}
    rows = []
    for name, by_method in [*summaries.items(), ("Average", average)]:
        pairs, details = [], []
        for method in TABLE_METHODS:
            s = by_method.get(method)
            if s is None:
                pairs.append(NOT_RUN_CELL)
                details += [NOT_RUN_CELL] * 3
                continue
            pairs.append(f"({_percent(s['pixel_auroc'])}, {_percent(s['aupro'])})")
            details += [_percent(s["image_auroc"]), _number(s["train_seconds"], digits=1),
                        _number(s["images_per_second"], digits=2)]
        rows.append([name, *pairs, *details])
    return header, rows


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def paper_rows(categories: Sequence[str],
               paper: Mapping[str, Mapping[str, tuple[float, float]]]) -> tuple[list[str], list[list[str]]]:
    """The paper's (pixel AUROC, PRO) per category and method where known for certain, else a pointer."""
    header = ["Category"] + [PAPER_LABELS.get(m, LABELS[m]) for m in TABLE_METHODS]
    rows = []
    for category in categories:
        known = paper.get(category, {})
        rows.append([category] + [f"({known[m][0]:.1f}, {known[m][1]:.1f})" if m in known else SEE_PAPER
                                  for m in TABLE_METHODS])
    return header, rows


def format_markdown(results: Mapping[str, Mapping[str, Mapping[str, Any]]], *, preset: str, resolution: int,
                    paper: Mapping[str, Mapping[str, tuple[float, float]]] = PAPER_TABLE1) -> str:
    """The benchmark as Markdown: our results in the paper's Table 1 layout, the extra columns, and a
    separate, labelled section for the paper's own figures."""
    header, rows = table_rows(results)
    pairs = 1 + len(TABLE_METHODS)
    not_run = ", ".join(LABELS[m] for m in TABLE_METHODS if not any(m in r for r in results.values()))
    lines = [
        "# Benchmark (our runs)",
        "",
        f"Preset `{preset}`: every method is tested on the same test images at {resolution}x{resolution} px, "
        "and all metrics are computed by the same code at each image's original size. "
        "PRO is the area under the PRO curve up to a false-positive rate of 0.3, normalised. "
        f"Methods marked \"{NOT_RUN_CELL}\" were not run here" + (f" ({not_run})." if not_run else "."),
        "",
        "## Pixel AUROC and PRO (%), as (pixel AUROC, PRO)",
        "",
        *_markdown(header[:pairs], [row[:pairs] for row in rows]),
        "",
        "## Image AUROC (%), train time (s) and test throughput (images/s)",
        "",
        "Train time: loading the training images and training or fitting; for our model given with --runs "
        "(or reused), the training loop time recorded in its model.pt. Throughput: loading and scoring test images.",
        "",
        *_markdown([header[0], *header[pairs:]], [[row[0], *row[pairs:]] for row in rows]),
        "",
        "## The paper's Table 1, for reference (the paper's figures, NOT our results)",
        "",
        "(pixel AUROC, PRO) in percent as published; figures not entered here are not reproduced "
        f"from memory: \"{SEE_PAPER}\".",
        "",
        *_markdown(*paper_rows(list(results), paper)),
    ]
    return "\n".join(lines) + "\n"


def format_csv(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The same table as CSV: one row per category and an "Average" row."""
    header, rows = table_rows(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(results: Mapping[str, Mapping[str, Mapping[str, Any]]], *, out: Path, preset: str,
                 resolution: int) -> str:
    """Write ``table.md`` and ``table.csv`` into ``out``; returns the Markdown."""
    markdown = format_markdown(results, preset=preset, resolution=resolution)
    atomic_write_text(Path(out) / "table.md", markdown)
    atomic_write_text(Path(out) / "table.csv", format_csv(results))
    return markdown


def sweep_alpha(*, run: Path, alphas: Sequence[float], test_dir: Path | None = None,
                out: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """Metrics of a finished test for each alpha, from its cached raw maps (the model is never run).

    Writes ``alpha_sweep.md``, ``alpha_sweep.csv`` and, with matplotlib installed, ``alpha_sweep.png``
    into ``out`` (default: the test folder). Returns ([{"alpha": a, **metrics}], markdown)."""
    if not alphas:
        raise ValueError("no alphas given")
    for alpha in alphas:
        check_alpha(alpha)
    test_dir = Path(test_dir) if test_dir is not None else Path(run) / "test"
    out = Path(out) if out is not None else test_dir
    scored = load_raw_maps(test_dir / "raw_maps.npz")
    model = load_model(run)
    masks = [s.load_mask() for s in scored.samples]
    sweep = [{"alpha": float(alpha), **evaluate_scored(model, scored, alpha=alpha, masks=masks)[0]}
             for alpha in alphas]
    markdown = format_sweep_markdown(sweep, run_alpha=model.config.score.alpha)
    atomic_write_text(out / "alpha_sweep.md", markdown)
    atomic_write_text(out / "alpha_sweep.csv", format_sweep_csv(sweep))
    plot_sweep(sweep, path=out / "alpha_sweep.png")
    return sweep, markdown


SWEEP_KEYS = (("pixel_auroc", "pixel AUROC"), ("aupro", "PRO"), ("image_auroc", "image AUROC"))


def format_sweep_markdown(sweep: Sequence[Mapping[str, Any]], *, run_alpha: float) -> str:
    """Overall metrics (%) per alpha as Markdown; the run's own alpha is marked."""
    header = ["alpha"] + [f"{label} (%)" for _, label in SWEEP_KEYS]
    rows = [[f"{row['alpha']:g}" + (" (run)" if row["alpha"] == run_alpha else "")]
            + [_percent(row["overall"][key]) for key, _ in SWEEP_KEYS] for row in sweep]
    return "\n".join(["# Alpha sweep", "", "final map = alpha * pixel map + (1 - alpha) * feature map", "",
                      *_markdown(header, rows)]) + "\n"


def format_sweep_csv(sweep: Sequence[Mapping[str, Any]]) -> str:
    """Overall metrics (fractions, as in metrics.json) per alpha as CSV; undefined ones are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["alpha", *(key for key, _ in SWEEP_KEYS)])
    for row in sweep:
        writer.writerow([f"{row['alpha']:g}", *("" if row["overall"][key] is None else f"{row['overall'][key]:.6f}"
                                                for key, _ in SWEEP_KEYS)])
    return buffer.getvalue()


def plot_sweep(sweep: Sequence[Mapping[str, Any]], *, path: Path) -> bool:
    """Plot pixel AUROC, PRO and image AUROC against alpha as PNG; returns False (and writes nothing)
    when matplotlib (the optional extra ``plot``) is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(5, 3.5))
    axes = figure.subplots()
    alphas = [row["alpha"] for row in sweep]
    for key, label in SWEEP_KEYS:
        values = [float("nan") if row["overall"][key] is None else 100 * row["overall"][key] for row in sweep]
        axes.plot(alphas, values, marker="o", label=label)
    axes.set_xlabel("alpha (weight of the pixel map)")
    axes.set_ylabel("%")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_save(path, figure, save=lambda fig, tmp: fig.savefig(tmp, format="png", dpi=120))
    return True

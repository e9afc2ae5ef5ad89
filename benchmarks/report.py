"""Render the bottle measurements written by benchmarks/bottle.sh as Markdown for BENCHMARKS.md.

    python benchmarks/report.py --run RUN --out OUT [--train-log RUN.log]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from defectdiff.storage import load_checkpoint


def _time_v(path: Path) -> dict[str, str]:
    """Wall time and peak memory from a `/usr/bin/time -v` report."""
    text = path.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall": wall.group(1) if wall else "?",
            "peak_gb": f"{int(rss.group(1)) / 2**20:.2f}" if rss else "?"}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def metrics_table(metrics: dict) -> list[str]:
    lines = ["| set | images | pixel AUROC | AUPRO@0.3 | image AUROC |", "|---|---|---|---|---|"]
    for name, m in [("overall", metrics["overall"]), *metrics["per_defect"].items()]:
        lines.append(f"| {name} | {m['images']} | {_pct(m['pixel_auroc'])} | {_pct(m['aupro'])} | "
                     f"{_pct(m['image_auroc'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-log", type=Path)
    args = parser.parse_args()
    model = load_checkpoint(args.run / "model.pt")
    lines = ["### Training", ""]
    lines.append(f"- training loop: {model['train_seconds'] / 60:.1f} min for "
                 f"{model['config']['train']['steps']} steps, peak memory {model['peak_rss_mb'] / 1024:.2f} GB")
    if args.train_log and args.train_log.exists():
        t = _time_v(args.train_log)
        lines.append(f"- whole command (loading, features, training, calibration): {t['wall']} wall, "
                     f"peak memory {t['peak_gb']} GB")
    metrics = json.loads((args.run / "test" / "metrics.json").read_text())
    t = _time_v(args.out / "test.time")
    lines += ["", f"### Test (alpha {metrics['alpha']})", "",
              f"- scoring {metrics['score_seconds']} s ({metrics['images_per_second']} images/s); whole command "
              f"{t['wall']} wall, peak memory {t['peak_gb']} GB", "", *metrics_table(metrics)]
    variants = json.loads((args.out / "variants.json").read_text())
    lines += ["", "### Scoring variants (masks at 256 px, indicative)", "",
              "| variant | pixel map alone | feature map alone | alpha 0.25 | alpha 0.5 |", "|---|---|---|---|---|"]
    for name, row in variants.items():
        cells = []
        for key in ("alpha=1.0", "alpha=0.0", "alpha=0.25", "alpha=0.5"):
            m = row[key]
            cells.append(f"{_pct(m['pixel_auroc'])} / {_pct(m['aupro'])} / {_pct(m['image_auroc'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

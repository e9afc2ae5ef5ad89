"""Command line: a thin layer over the library (``defectdiff --help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .api import demo, predict, test, train
from .config import PRESETS
from .data import DataError
from .storage import CheckpointError
from .training import RunFolderError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the denoising model on <data>/<category>/train/good")
    p.add_argument("--data", required=True, type=Path, help="dataset root holding category folders")
    p.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named configuration (default cpu)")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--steps", type=int, help="override the preset's number of training steps")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; use 1 beside other jobs)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="score a labelled test set and compute the metrics")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("--data", type=Path, help="dataset root (default: the one the run was trained on)")
    p.add_argument("--category", help="category (default: the run's)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/test)")
    p.add_argument("--alpha", type=float, help="weight of the pixel map in the final map (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score unlabelled images: map, overlay and score per image")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--alpha", type=float, help="weight of the pixel map in the final map (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="make a synthetic set, train a small model, test it (a few minutes)")
    p.add_argument("--out", type=Path, default=Path("defectdiff-demo"), help="output folder (default ./defectdiff-demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectdiff",
        description="Find and outline defects in images of parts with a diffusion model trained on good parts only.")
    parser.add_argument("--version", action="version", version=f"defectdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_test, _add_predict, _add_demo):
        add(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if args.command == "train":
        start = time.perf_counter()
        model_path = train(data=args.data, category=args.category, preset=args.preset, out=args.out,
                           steps=args.steps, seed=args.seed, threads=args.threads, resume=args.resume, overwrite=args.overwrite,
                           progress=progress)
        print(f"trained in {time.perf_counter() - start:.0f} s: {model_path}")
    elif args.command == "test":
        out = args.out or args.run / "test"
        _, table = test(run=args.run, data=args.data, category=args.category, out=out, alpha=args.alpha,
                        progress=progress)
        print(table)
        print(f"results in {out} (metrics.json, scores.csv, anomaly_maps/, overlays/)")
    elif args.command == "predict":
        results = predict(run=args.run, inputs=args.inputs, out=args.out, alpha=args.alpha, progress=progress)
        for path, score in results:
            print(f"{score:10.4f}  {path}")
        print(f"results in {args.out} (scores.csv, anomaly_maps/, overlays/)")
    elif args.command == "demo":
        table, out = demo(out=args.out, steps=args.steps, progress=progress)
        print(table)
        print(f"demo results in {out.resolve()}: metrics.json, scores.csv, overlays/ under {out / 'run' / 'test'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return run(args)
    except (DataError, CheckpointError, RunFolderError, ValueError, FileNotFoundError) as error:
        print(f"defectdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"defectdiff {args.command}: interrupted; the last checkpoint stays readable", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

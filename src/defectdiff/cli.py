"""Command line: a thin layer over the library (``defectdiff --help``)."""

from __future__ import annotations

import argparse
import sys
import warnings
import time
from pathlib import Path

from . import __version__
from .api import bench, demo, predict, reconstruct, sweep_alpha, test, train
from .benchmark import RUNNABLE, parse_list, parse_runs
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


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    """Options shared by test and predict."""
    p.add_argument("--alpha", type=float, help="weight of the pixel map in the final map (default: the run's)")
    p.add_argument("--bf16", action="store_true", help="run the UNet under bfloat16 autocast (faster on AMX CPUs, GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow start, faster passes; for GPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_test(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("test", help="score a labelled test set and compute the metrics")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("--data", type=Path, help="dataset root (default: the one the run was trained on)")
    p.add_argument("--category", help="category (default: the run's)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/test)")
    _add_scoring_options(p)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score unlabelled images: map, overlay and score per image")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_scoring_options(p)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="make a synthetic set, train a small model, test it (a few minutes)")
    p.add_argument("--out", type=Path, default=Path("defectdiff-demo"), help="output folder (default ./defectdiff-demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare our model with PaDiM and SPADE per category (table.md, table.csv)")
    p.add_argument("--data", required=True, type=Path, help="dataset root holding category folders")
    p.add_argument("--categories", required=True, help="comma-separated categories, e.g. bottle,hazelnut")
    p.add_argument("--methods", default=",".join(RUNNABLE),
                   help=f"comma-separated methods (default {','.join(RUNNABLE)})")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                   help="preset of our model (default cpu); its resolution is used for every method")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder: runs/, <category>/<method>/, table.md, table.csv")
    p.add_argument("--runs", help="trained runs to use instead of training: CATEGORY=RUN_DIR,...")
    p.add_argument("--steps", type=int, help="override the preset's number of training steps")
    p.add_argument("--threads", type=int, help="CPU threads for torch (use 1 beside other jobs)")
    p.add_argument("--alpha", type=float, help="our pixel-map weight (default: each run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct",
                       help="remove defects by gradient denoising; writes reconstructions and Figure-4 panels")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--loops", type=int, default=100, help="gradient steps (default 100)")
    p.add_argument("--step-size", type=float, default=0.02, help="gradient step size s (default 0.02)")
    p.add_argument("--denoise-every", type=int, default=5,
                   help="one model step after every N gradient steps (default 5)")
    p.add_argument("--denoise-t", type=int, default=32, help="diffusion step t of the model step (default 32)")


def _add_sweep_alpha(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep-alpha", help="metrics of a finished test for several alphas, from its cached maps")
    p.add_argument("--run", required=True, type=Path, help="run folder made by `defectdiff train`")
    p.add_argument("--test-dir", type=Path, help="folder of a `defectdiff test` (default: RUN/test)")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1",
                   help="comma-separated alphas in [0, 1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--out", type=Path, help="output folder (default: the test folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectdiff",
        description="Find and outline defects in images of parts with a diffusion model trained on good parts only.")
    parser.add_argument("--version", action="version", version=f"defectdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_test, _add_predict, _add_demo, _add_bench, _add_reconstruct, _add_sweep_alpha):
        add(sub)
    return parser


def _floats(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; a ValueError names the item that is not a number."""
    values = []
    for item in parse_list(text):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{item!r} is not a number") from None
    return values


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
        _, table = test(run=args.run, data=args.data, category=args.category, out=out, alpha=args.alpha, bf16=args.bf16, compile=args.compile,
                        overwrite=args.overwrite,
                        progress=progress)
        print(table)
        print(f"results in {out} (metrics.json, scores.csv, anomaly_maps/, overlays/)")
    elif args.command == "predict":
        results = predict(run=args.run, inputs=args.inputs, out=args.out, alpha=args.alpha, bf16=args.bf16, compile=args.compile,
                        overwrite=args.overwrite,
                          progress=progress)
        for path, score in results:
            print(f"{score:10.4f}  {path}")
        print(f"results in {args.out} (scores.csv, anomaly_maps/, overlays/)")
    elif args.command == "demo":
        table, out = demo(out=args.out, steps=args.steps, progress=progress)
        print(table)
        print(f"demo results in {out.resolve()}: metrics.json, scores.csv, anomaly_maps/, overlays/ under "
              f"{out / 'run' / 'test'}")
    elif args.command == "bench":
        _, table = bench(data=args.data, categories=parse_list(args.categories), methods=parse_list(args.methods),
                         preset=args.preset, out=args.out, runs=parse_runs(args.runs), steps=args.steps,
                         threads=args.threads, alpha=args.alpha, progress=progress)
        print(table)
        print(f"results in {args.out} (table.md, table.csv, <category>/<method>/metrics.json)")
    elif args.command == "reconstruct":
        written = reconstruct(run=args.run, inputs=args.inputs, out=args.out, loops=args.loops,
                              step_size=args.step_size, denoise_every=args.denoise_every, denoise_t=args.denoise_t)
        for source, recon, panel in written:
            print(f"{source} -> {recon}, {panel}")
    elif args.command == "sweep-alpha":
        _, table = sweep_alpha(run=args.run, alphas=_floats(args.alphas), test_dir=args.test_dir, out=args.out)
        print(table)
        print(f"results in {args.out or args.test_dir or args.run / 'test'} (alpha_sweep.md, alpha_sweep.csv, "
              "alpha_sweep.png with matplotlib)")
    return 0


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"defectdiff: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.formatwarning = _one_line_warning
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return run(args)
    except BrokenPipeError:
        sys.stderr.close()
        return 141
    except (DataError, CheckpointError, RunFolderError, ValueError, OSError) as error:
        print(f"defectdiff {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"defectdiff {args.command}: interrupted; a finished checkpoint stays readable "
              "(continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

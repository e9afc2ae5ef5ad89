"""Scoring speed on this CPU against its arithmetic floor, for ours, PaDiM and SPADE.

For each method: warm-up, several timed repetitions, the median images per second at the run's
resolution, the FLOPs of one image (counted with torch.utils.flop_counter) and the floor those FLOPs
imply at this machine's measured fp32 matmul rate. For ours it also times the scored timesteps as
one batched forward pass against a loop of separate passes, and contiguous (NCHW) weights against
channels_last, which load_model uses since this measurement.

    python benchmarks/speed.py --run RUN [--threads 2] [--out RUN/speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from defectdiff.baselines import PaDiM, SPADE
from defectdiff.data import test_samples, train_samples
from defectdiff.scoring import RawMaps, load_model
from defectdiff.training import load_images


def matmul_rate(*, size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s (median of repeats)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def timed(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def separate_passes(model, images: torch.Tensor) -> RawMaps:
    """The slow way, for comparison: one UNet pass per scored timestep."""
    maps = []
    for t in model.config.score.timesteps:
        single = copy.deepcopy(model.config)
        single.score.timesteps = [t]
        maps.append(type(model)(config=single, unet=model.unet, backbone=model.backbone,
                                feature_mean=model.feature_mean, feature_std=model.feature_std,
                                calibration=model.calibration).raw_maps(images))
    return maps[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    root, category = Path(model.config.data_root), model.config.category
    res = model.config.model.resolution
    images = load_images(test_samples(root, category)[: args.batch], resolution=res)
    rate = matmul_rate()
    rows = []

    def add(method: str, fn: Callable[[], object], per_image_flops: float) -> None:
        seconds = timed(fn, warmup=1, repeats=args.repeats)
        ips = len(images) / seconds
        floor = per_image_flops / rate
        rows.append({"method": method, "images_per_second": round(ips, 2), "gflop_per_image": round(per_image_flops / 1e9, 2),
                     "floor_images_per_second": round(1 / floor, 2), "fraction_of_floor": round(ips * floor, 3)})
        print(json.dumps(rows[-1]), flush=True)

    model.unet.to(memory_format=torch.contiguous_format)
    ours = lambda: model.raw_maps(images)  # noqa: E731
    ours_flops = flops_of(ours) / len(images)
    add("ours (one batched pass, all timesteps)", ours, ours_flops)
    add("ours (a pass per timestep)", lambda: separate_passes(model, images), ours_flops)
    model.unet.to(memory_format=torch.channels_last)
    add("ours (channels_last)", ours, ours_flops)
    model.unet.to(memory_format=torch.contiguous_format)
    model.config.score.bf16 = True
    add("ours (bf16 autocast)", ours, ours_flops)
    model.config.score.bf16 = False

    train_images = load_images(train_samples(root, category), resolution=res)
    for method in (PaDiM(backbone=model.backbone), SPADE(backbone=model.backbone)):
        method.fit(train_images)
        with torch.inference_mode():
            fn = lambda m=method: m.anomaly_maps(images)  # noqa: E731
            add(method.name, fn, flops_of(fn) / len(images))
        del method

    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "matmul_gflops": round(rate / 1e9, 1), "resolution": res, "batch": len(images), "rows": rows}
    out = args.out or args.run / "speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

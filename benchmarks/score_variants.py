"""Measure scoring variants of one trained run: which timesteps and smoothing make each map work.

For each variant the test set is scored again (the model is cheap to run at inference) and the pixel
map alone, the feature map alone and mixes are evaluated. Masks are resized to the model resolution
(nearest) for speed, so figures are indicative; the final ones come from `defectdiff test`. Each
variant gets its own calibration on the training images, as training would have saved for it.

    python benchmarks/score_variants.py --run RUN [--out RUN/variants.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from defectdiff.data import resize_mask, test_samples, train_samples
from defectdiff.evaluation import score_samples
from defectdiff.metrics import aupro, image_auroc, pixel_auroc
from defectdiff.scoring import RawMaps, calibrate, combine, load_model, top_k_score
from defectdiff.training import load_images

VARIANTS = {
    "t20": {"timesteps": [20]},
    "t201": {"timesteps": [201]},
    "t401": {"timesteps": [401]},
    "t201+401": {"timesteps": [201, 401]},
    "paper 20+201+401": {"timesteps": [20, 201, 401]},
    "paper, no smoothing": {"timesteps": [20, 201, 401], "smoothing_sigma": 0.0},
    "paper, sigma 8": {"timesteps": [20, 201, 401], "smoothing_sigma": 8.0},
}


def evaluate(maps: torch.Tensor, masks: list[np.ndarray], labels: list[int], top_k: int) -> dict[str, float]:
    arrays = [m.numpy() for m in maps]
    scores = top_k_score(maps, top_k=top_k).numpy()
    return {"pixel_auroc": round(pixel_auroc(arrays, masks), 4), "aupro": round(aupro(arrays, masks), 4),
            "image_auroc": round(image_auroc(scores, labels), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    samples = test_samples(Path(model.config.data_root), model.config.category)
    res = model.config.model.resolution
    masks = [resize_mask(s.load_mask(), (res, res)) for s in samples]
    labels = [s.label for s in samples]
    train = train_samples(Path(model.config.data_root), model.config.category)
    train_images = load_images(train, resolution=res)
    base = copy.deepcopy(model.config.score)
    results = {}
    for name, change in VARIANTS.items():
        model.config.score = copy.deepcopy(base)
        for key, value in change.items():
            setattr(model.config.score, key, value)
        start = time.perf_counter()
        scored = score_samples(model, samples, progress=False)
        raw = RawMaps(pixel=torch.from_numpy(scored.pixel), feature=torch.from_numpy(scored.feature))
        row = {"score_seconds": round(time.perf_counter() - start, 1)}
        calibration = calibrate(model.unet, backbone=model.backbone, config=model.config, images=train_images, feature_mean=model.feature_mean, feature_std=model.feature_std)
        for alpha in (1.0, 0.0, 0.25, 0.5):
            maps = combine(raw, calibration=calibration, alpha=alpha)
            row[f"alpha={alpha}"] = evaluate(maps, masks, labels, base.top_k)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    out = args.out or args.run / "variants.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

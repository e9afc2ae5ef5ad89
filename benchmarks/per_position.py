"""Try per-position calibration: standardise each map by its per-pixel mean and spread over training
images (bottle parts are aligned), against the global calibration. Masks at model resolution.

    python benchmarks/per_position.py --run RUN [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from defectdiff.data import resize_mask, test_samples, train_samples
from defectdiff.evaluation import score_samples
from defectdiff.metrics import aupro, image_auroc, pixel_auroc
from defectdiff.scoring import load_model, top_k_score


def report(label: str, maps: np.ndarray, masks: list[np.ndarray], labels: list[int]) -> None:
    scores = top_k_score(torch.from_numpy(maps), top_k=64).numpy()
    print(f"{label}: pixel AUROC {pixel_auroc(list(maps), masks):.4f}  AUPRO {aupro(list(maps), masks):.4f}  "
          f"image AUROC {image_auroc(scores, labels):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.run)
    root, category, res = Path(model.config.data_root), model.config.category, model.config.model.resolution
    test = test_samples(root, category)
    reference = train_samples(root, category)[::3]
    masks = [resize_mask(s.load_mask(), (res, res)) for s in test]
    labels = [s.label for s in test]
    for steps in ([20], [20, 201, 401]):
        model.config.score.timesteps = steps
        train_maps, test_maps = score_samples(model, reference, progress=False), score_samples(model, test, progress=False)
        z = {}
        for name in ("pixel", "feature"):
            ref, maps = getattr(train_maps, name), getattr(test_maps, name)
            report(f"steps {steps} {name} global", (maps - ref.mean()) / ref.std(), masks, labels)
            z[name] = (maps - ref.mean(0)) / (ref.std(0) + 1e-6)
            report(f"steps {steps} {name} per-position", z[name], masks, labels)
        for alpha in (0.25, 0.5):
            report(f"steps {steps} mix alpha {alpha} per-position", alpha * z["pixel"] + (1 - alpha) * z["feature"],
                   masks, labels)


if __name__ == "__main__":
    main()

"""Seconds per training step of a preset's UNet on this machine (random data, the real loss terms).

    python benchmarks/train_step.py --preset cpu [--threads 2] [--steps 3] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from defectdiff.config import preset
from defectdiff.diffusion import make_schedule, q_sample, vb_term
from defectdiff.networks import UNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast even where the preset uses it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    batch = args.batch or config.train.batch_size
    bf16 = config.train.bf16 and not args.fp32
    res = config.model.resolution
    model = UNet(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    schedule = make_schedule()
    x0 = torch.rand(batch, 3, res, res) * 2 - 1
    target = torch.randn(batch, config.model.feature_channels, config.model.feature_size, config.model.feature_size)
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        t = torch.randint(config.train.max_timestep, (batch,))
        noise = torch.randn_like(x0)
        xt = q_sample(schedule, x0=x0, index=t, noise=noise)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            eps, var, feat = model(xt, t)
        eps, var, feat = eps.float(), var.float(), feat.float()
        loss = ((eps - noise) ** 2).mean() + vb_term(schedule, x0=x0, xt=xt, index=t, eps=eps.detach(),
                                                     var_interp=var).mean() + ((feat - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({
        "preset": args.preset, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": batch, "resolution": res, "threads": args.threads, "bf16": bf16,
        "seconds_per_step_median": round(statistics.median(times[1:]), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
    main()

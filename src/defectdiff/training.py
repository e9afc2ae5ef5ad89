"""Training the denoising model on defect-free images, with EMA, checkpoints and exact resume.

A run folder holds ``config.yaml``, ``run.json`` (versions, seed, the training files with sizes),
``log.jsonl`` (one line per step), ``checkpoints/last.pt`` (everything needed to resume) and, at the
end, ``model.pt`` (EMA weights, feature statistics and map calibration), which scoring loads.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import __version__
from .backbone import FeatureExtractor
from .config import RunConfig, differences, from_dict, load_yaml, save_yaml, to_dict, validate
from .data import Sample, to_tensor, train_samples
from .diffusion import make_schedule, q_sample, vb_term
from .networks import UNet
from .scoring import MODEL_FORMAT, calibrate
from .storage import CheckpointError, atomic_save, atomic_write_json, atomic_write_text, load_checkpoint

CHECKPOINT_FORMAT = "defectdiff-checkpoint-v1"
RESUMABLE_CHANGES = ("train.steps:", "train.num_threads:")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (exists without --overwrite/--resume, or mismatched)."""


def load_images(samples: list[Sample], *, resolution: int) -> torch.Tensor:
    """Load and resize images to an Nx3xRxR tensor in [0, 1]."""
    return torch.stack([to_tensor(s.load_image(), resolution) for s in samples])


@torch.no_grad()
def backbone_features(
    backbone: FeatureExtractor, images: torch.Tensor, *, feature_size: int, batch_size: int = 16
) -> torch.Tensor:
    """Backbone features of clean images in [0, 1], batched."""
    return torch.cat([backbone(images[i : i + batch_size], feature_size=feature_size)
                      for i in range(0, len(images), batch_size)])


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over images and positions, used to standardise the feature targets."""
    mean = features.mean(dim=(0, 2, 3))
    std = features.std(dim=(0, 2, 3)).clamp(min=1e-6)
    return mean, std


def learning_rate(config: RunConfig, step: int) -> float:
    """Linear warm-up, then constant or linear decay to zero at the last step."""
    train = config.train
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if not train.lr_decay:
        return train.lr
    span = max(train.steps - train.warmup_steps, 1)
    return train.lr * max(0.0, 1.0 - (step - train.warmup_steps) / span)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def _prepare_folder(out: Path, config: RunConfig, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder, refusing to overwrite a run unless asked, and checking a resumed config."""
    config_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder")
    if resume:
        if not config_path.exists():
            raise RunFolderError(f"{out}: nothing to resume (no config.yaml)")
        saved = load_yaml(config_path)
        changed = [d for d in differences(saved, config) if not d.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise RunFolderError(f"{out}: the saved run's config differs from this one: " + "; ".join(changed))
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunFolderError(f"{out}: folder exists and is not empty; pass --overwrite or --resume")
        for name in ("model.pt", "log.jsonl", "checkpoints/last.pt", "config.yaml", "run.json"):
            path = out / name
            if path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _run_record(config: RunConfig, samples: list[Sample]) -> dict[str, Any]:
    return {
        "defectdiff_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seed": config.train.seed,
        "preset": config.preset,
        "train_files": [{"path": str(s.image_path), "bytes": s.image_path.stat().st_size} for s in samples],
    }


def _checkpoint(model: UNet, ema: UNet, optimizer: torch.optim.Optimizer, step: int,
                generator: torch.Generator, config: RunConfig) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": to_dict(config),
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def check_config_matches(saved: dict[str, Any], config: RunConfig, *, path: Path, ignore_steps: bool) -> None:
    """Refuse a checkpoint whose config differs from ``config``, saying what differs."""
    try:
        saved_config = from_dict(saved, source=str(path))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: checkpoint config unreadable: {error}") from error
    changed = differences(saved_config, config)
    if ignore_steps:
        changed = [d for d in changed if not d.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise CheckpointError(f"{path}: checkpoint was made with another config: " + "; ".join(changed))


def train(
    config: RunConfig,
    *,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train on ``<data_root>/<category>/train/good`` and write the run folder; returns ``out/model.pt``.

    ``stop_after`` ends the process's work after that many steps (for tests of interruption).
    Launched by torchrun, each process trains on its shard of every batch and rank 0 alone writes.
    """
    validate(config)
    _maybe_init_distributed()
    rank, world = _world()
    out = Path(out)
    if config.train.batch_size % world:
        raise ValueError(f"batch size {config.train.batch_size} is not divisible by {world} processes")
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    samples = train_samples(Path(config.data_root), config.category)
    res = config.model.resolution
    images = load_images(samples, resolution=res)
    if rank == 0:
        _prepare_folder(out, config, resume=resume, overwrite=overwrite)
        save_yaml(config, out / "config.yaml")
        atomic_write_json(out / "run.json", _run_record(config, samples))
    if world > 1:
        dist.barrier()

    torch.manual_seed(config.train.seed)
    generator = torch.Generator().manual_seed(config.train.seed)
    backbone = FeatureExtractor()
    features = backbone_features(backbone, images, feature_size=config.model.feature_size)
    feature_mean, feature_std = feature_statistics(features)
    targets = ((features - feature_mean[None, :, None, None]) / feature_std[None, :, None, None]).half()
    del features

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model = UNet(config.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    start = 0
    seconds_before = 0.0
    last_path = out / "checkpoints" / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{last_path}: not a defectdiff training checkpoint")
        check_config_matches(state["config"], config, path=last_path, ignore_steps=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        seconds_before = float(state.get("train_seconds", 0.0))
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    schedule = make_schedule()
    log_path = out / "log.jsonl"
    if rank == 0:
        _truncate_log(log_path, keep_steps=start)
    local_batch = config.train.batch_size // world
    end = config.train.steps if stop_after is None else min(config.train.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.train.steps, disable=not progress or rank != 0,
               desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    model.train()
    for step in bar:
        idx = torch.randint(len(images), (config.train.batch_size,), generator=generator)
        t = torch.randint(config.train.max_timestep, (config.train.batch_size,), generator=generator)
        noise = torch.randn((config.train.batch_size, 3, res, res), generator=generator)
        shard = slice(rank * local_batch, (rank + 1) * local_batch)
        idx, t, noise = idx[shard], t[shard].to(device), noise[shard].to(device)
        x0 = images[idx].to(device) * 2.0 - 1.0
        xt = q_sample(schedule, x0=x0, index=t, noise=noise)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
            eps, var_interp, feat = train_model(xt, t)
        eps, var_interp, feat = eps.float(), var_interp.float(), feat.float()
        mse = ((eps - noise) ** 2).mean()
        vb = vb_term(schedule, x0=x0, xt=xt, index=t, eps=eps.detach(), var_interp=var_interp).mean()
        feat_mse = ((feat - targets[idx].to(device).float()) ** 2).mean()
        loss = mse + config.train.vb_weight * vb + config.train.feature_weight * feat_mse
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - config.train.ema_decay)
        done = step + 1
        terms = torch.stack([loss.detach(), mse.detach(), vb.detach(), feat_mse.detach()])
        if world > 1:
            dist.all_reduce(terms)
            terms /= world
        loss_v, mse_v, vb_v, feat_v = terms.tolist()
        record = {"step": done, "loss": loss_v, "mse": mse_v, "vb": vb_v, "feature": feat_v,
                  "grad_norm": float(grad_norm), "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
        bar.set_postfix(loss=f"{record['loss']:.4f}", mse=f"{record['mse']:.4f}", feat=f"{record['feature']:.3f}")
        if rank == 0:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if done % config.train.checkpoint_every == 0 or done == config.train.steps:
                state = _checkpoint(model, ema, optimizer, done, generator, config)
                state["train_seconds"] = seconds_before + time.perf_counter() - t0
                atomic_save(last_path, state)
    bar.close()
    if world > 1:
        dist.barrier()
    if end < config.train.steps:
        return last_path
    if rank == 0:
        ema = ema.cpu().eval()
        calibration = calibrate(ema, backbone=backbone, config=config, images=images,
                                feature_mean=feature_mean, feature_std=feature_std)
        atomic_save(out / "model.pt", {
            "format": MODEL_FORMAT,
            "config": to_dict(config),
            "ema": ema.state_dict(),
            "feature_mean": feature_mean,
            "feature_std": feature_std,
            "calibration": calibration,
            "train_seconds": round(seconds_before + time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        })
    if world > 1:
        dist.barrier()
    return out / "model.pt"


def _truncate_log(path: Path, *, keep_steps: int) -> None:
    """Drop log lines past the checkpoint a resumed run restarts from, so the log has each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= keep_steps:
                kept.append(line)
        except (ValueError, KeyError):
            break
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))

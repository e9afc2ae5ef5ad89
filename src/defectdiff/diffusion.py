"""The DDPM noise schedule and its Gaussian math, as pure tensor functions apart from any network.

Conventions follow improved DDPM: a model predicts the noise ``eps`` and a variance interpolation
``v`` in [-1, 1]; its reverse-step log variance is ``frac * log(beta_t) + (1 - frac) * log(beta~_t)``
with ``frac = (v + 1) / 2``. A :class:`Schedule` may be a respacing of the 1000-step one; it keeps the
original step numbers in ``timesteps`` so a network is always conditioned on original steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NUM_TIMESTEPS = 1000


def linear_betas(*, num_timesteps: int = NUM_TIMESTEPS, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """The DDPM linear beta schedule in float64."""
    return np.linspace(start, end, num_timesteps, dtype=np.float64)


def respaced_steps(*, num_timesteps: int = NUM_TIMESTEPS, count: int = 250) -> list[int]:
    """Original steps kept when ``num_timesteps`` steps are respaced evenly to ``count`` (rounded stride).

    With 1000 steps and count 250, respaced indices 5, 50, 100 are original steps 20, 201, 401.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"respacing count must be in [1, {num_timesteps}], got {count}")
    if count == 1:
        return [0]
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({int(round(i * stride)) for i in range(count)})


@dataclass(frozen=True)
class Schedule:
    """Precomputed float64 arrays of a (possibly respaced) diffusion; index ``i`` is step ``timesteps[i]``."""

    timesteps: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def index_of(self, *, step: int) -> int:
        """Index of an original step in this schedule; error if the respacing skipped it."""
        hits = np.nonzero(self.timesteps == step)[0]
        if len(hits) == 0:
            raise ValueError(f"step {step} is not in this schedule ({self.num_steps} steps)")
        return int(hits[0])


def make_schedule(*, betas: np.ndarray | None = None, keep_steps: list[int] | None = None) -> Schedule:
    """Build a schedule from ``betas`` (default linear, T=1000), optionally respaced to ``keep_steps``.

    Respacing keeps the cumulative alphas of the kept steps and recomputes each step's beta as
    ``1 - abar_t / abar_prev_kept``, as improved DDPM does.
    """
    betas = linear_betas() if betas is None else np.asarray(betas, dtype=np.float64)
    full_abar = np.cumprod(1.0 - betas)
    steps = np.arange(len(betas)) if keep_steps is None else np.asarray(sorted(set(keep_steps)), dtype=np.int64)
    if steps.min() < 0 or steps.max() >= len(betas):
        raise ValueError(f"kept steps must lie in [0, {len(betas)})")
    abar = full_abar[steps]
    abar_prev = np.append(1.0, abar[:-1])
    new_betas = 1.0 - abar / abar_prev
    post_var = new_betas * (1.0 - abar_prev) / (1.0 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(new_betas)
    return Schedule(
        timesteps=steps,
        betas=new_betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=new_betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - new_betas) / (1.0 - abar),
    )


def _take(array: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather ``array[index]`` as a tensor broadcastable against ``like`` (B, 1, 1, ...)."""
    values = torch.as_tensor(array, dtype=torch.float64, device=index.device)[index].to(like.dtype)
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, *, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x0): sqrt(abar) x0 + sqrt(1 - abar) noise."""
    abar = _take(schedule.alphas_cumprod, index, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def q_posterior(
    schedule: Schedule, *, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log variance of the true posterior q(x_{t-1} | x_t, x0)."""
    mean = _take(schedule.posterior_mean_coef1, index, xt) * x0 + _take(schedule.posterior_mean_coef2, index, xt) * xt
    log_var = _take(schedule.posterior_log_variance_clipped, index, xt).expand_as(xt)
    return mean, log_var


def predict_x0(schedule: Schedule, *, xt: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The clean image implied by a noise prediction."""
    abar = _take(schedule.alphas_cumprod, index, xt)
    return (xt - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def p_mean_variance(
    schedule: Schedule, *, xt: torch.Tensor, index: torch.Tensor, eps: torch.Tensor, var_interp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's p(x_{t-1} | x_t): mean, log variance and predicted x0.

    ``var_interp`` is the raw network output in [-1, 1] that interpolates log beta_t and log beta~_t.
    """
    min_log = _take(schedule.posterior_log_variance_clipped, index, xt)
    max_log = _take(np.log(schedule.betas), index, xt)
    frac = (var_interp + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    x0_hat = predict_x0(schedule, xt=xt, index=index, eps=eps)
    mean, _ = q_posterior(schedule, x0=x0_hat, xt=xt, index=index)
    return mean, log_var, x0_hat


def normal_kl(
    *, mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(*, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log likelihood of 8-bit data ``x`` in [-1, 1] under a Gaussian discretised to 256 bins (decoder term)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = _standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_term(
    schedule: Schedule,
    *,
    x0: torch.Tensor,
    xt: torch.Tensor,
    index: torch.Tensor,
    eps: torch.Tensor,
    var_interp: torch.Tensor,
) -> torch.Tensor:
    """Per-sample variational-bound term in bits per dimension.

    KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL at t = 0. Pass ``eps``
    detached to train only the variance with it, as improved DDPM does.
    """
    true_mean, true_log_var = q_posterior(schedule, x0=x0, xt=xt, index=index)
    mean, log_var, _ = p_mean_variance(schedule, xt=xt, index=index, eps=eps, var_interp=var_interp)
    kl = normal_kl(mean1=true_mean, log_var1=true_log_var, mean2=mean, log_var2=log_var)
    kl = kl.flatten(1).mean(dim=1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x=x0, mean=mean, log_scale=0.5 * log_var)
    nll = nll.flatten(1).mean(dim=1) / math.log(2.0)
    return torch.where(index == 0, nll, kl)

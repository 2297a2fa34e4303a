"""Linear flow matching: the path, its velocity target, the loss, and ODE samplers with CFG.

Convention (the paper's): t = 0 is data, t = 1 is noise.
    z_t = (1 - t)·z_0 + t·eps,   dz_t/dt = eps - z_0.
Sampling integrates dz/dt = v(z, t) from t = 1 (noise) down to t = 0 (data) on a uniform grid.

Everything here is a pure function of tensors; randomness comes only from the `torch.Generator`
passed in (or, in `sample`, one seeded from `seed`), never from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn
from torch.nn import functional as F

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""v(z (B, ...), t (B,)) -> (B, ...): the ODE's right-hand side."""


class VelocityModel(Protocol):
    """model(z (B, ...), t (B,), y (B,) long) -> velocity (B, ...)."""

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def _per_sample(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t (B,) or scalar -> broadcastable against `like` (B, ...): (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def interpolate(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """z_t = (1 - t)·z0 + t·eps; z0, eps (B, ...), t (B,) or a scalar -> (B, ...)."""
    t = _per_sample(t, z0)
    return (1 - t) * z0 + t * eps


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """dz_t/dt = eps - z0, (B, ...)."""
    return eps - z0


def sample_t_logit_normal(batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std²): (batch,) float32 in (0, 1), median sigmoid(mean)."""
    n = torch.randn(batch, generator=generator, device=generator.device) * std + mean  # (B,)
    return torch.sigmoid(n).to(device if device is not None else generator.device)


@dataclass
class FlowLoss:
    """`loss`: scalar MSE (mean over every element); `t`: (B,) the times drawn, for logging."""

    loss: torch.Tensor
    t: torch.Tensor


@dataclass
class FlowDraws:
    """The random draws of one flow-matching loss: `t` (B,) in (0, 1), `eps` (B, ...) ~ N(0, I)."""

    t: torch.Tensor
    eps: torch.Tensor


def draw_flow(batch: int, shape: tuple[int, ...], generator: torch.Generator, t_mean: float = 0.0,
              t_std: float = 1.0) -> FlowDraws:
    """t (batch,) logit-normal, then eps (batch, *shape) float32, both from `generator`, on its device."""
    t = sample_t_logit_normal(batch, generator, t_mean, t_std)  # (B,)
    eps = torch.randn((batch, *shape), generator=generator, device=generator.device)  # (B, ...)
    return FlowDraws(t=t, eps=eps)


def flow_matching_loss(model: VelocityModel, z0: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator | None = None, t_mean: float = 0.0, t_std: float = 1.0, *,
                       draws: FlowDraws | None = None) -> FlowLoss:
    """MSE between model(z_t, t, y) and eps - z0, with t logit-normal and eps ~ N(0, I).

    z0 (B, C, H, W) clean latents, y (B,) labels. The draws come from `generator` (`draw_flow`: t first,
    then eps) or, made by the caller, from `draws` (training draws them for the global batch and gives
    each rank its slice); exactly one of the two. They are moved to z0's device and dtype.
    """
    if (generator is None) == (draws is None):
        raise ValueError("flow_matching_loss: pass exactly one of `generator` and `draws`")
    if draws is None:
        draws = draw_flow(z0.shape[0], tuple(z0.shape[1:]), generator, t_mean, t_std)
    if draws.t.shape != z0.shape[:1] or draws.eps.shape != z0.shape:
        raise ValueError(f"flow_matching_loss: draws t {tuple(draws.t.shape)}, eps {tuple(draws.eps.shape)} "
                         f"do not fit z0 {tuple(z0.shape)}")
    t = draws.t.to(z0.device)  # (B,)
    eps = draws.eps.to(z0.device, z0.dtype)  # (B, C, H, W)
    z_t = interpolate(z0, eps, t)  # (B, C, H, W)
    v = model(z_t, t.to(z0.dtype), y)  # (B, C, H, W)
    loss = F.mse_loss(v.float(), velocity_target(z0, eps).float())
    return FlowLoss(loss=loss, t=t)


@dataclass
class ODESolution:
    """`z`: (B, ...) the state at t = 0; `trajectory`: (steps + 1, B, ...) from t = 1 to 0, or None;
    `times`: (steps + 1,) the grid, 1 -> 0."""

    z: torch.Tensor
    trajectory: torch.Tensor | None
    times: torch.Tensor


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """LightningDiT's timestep shift, in this project's convention (t = 1 is noise): t / (s - (s - 1)·t).

    LightningDiT runs time the other way (t_LD = 1 - t) and maps t_LD -> s·t_LD / (1 + (s - 1)·t_LD);
    substituting t_LD = 1 - t gives the formula above, so `shift` means the same number in both codebases.
    s = 1 (LightningDiT's 0, "off") is the identity; s < 1 puts more of the grid near the noise end.
    The end points 0 and 1 are fixed.
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return t / (shift - (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Grid from 1 (noise) to 0 (data): (steps + 1,) float64, uniform, then `shift_time`-ed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def _integrate(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int, heun: bool,
               return_trajectory: bool, shift: float = 1.0) -> ODESolution:
    times = time_grid(steps, shift)
    z = noise
    path = [z] if return_trajectory else None
    for t_cur, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        dt = t_next - t_cur  # negative: we integrate backwards in t
        v = velocity_fn(z, torch.full((z.shape[0],), t_cur, dtype=z.dtype, device=z.device))  # (B, ...)
        z_next = z + dt * v  # Euler predictor, (B, ...)
        if heun:  # trapezoidal corrector with the slope at the predicted point
            v_next = velocity_fn(z_next, torch.full((z.shape[0],), t_next, dtype=z.dtype, device=z.device))
            z_next = z + dt * 0.5 * (v + v_next)  # (B, ...)
        z = z_next
        if path is not None:
            path.append(z)
    trajectory = torch.stack(path) if path is not None else None
    return ODESolution(z=z, trajectory=trajectory, times=times)


def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int,
                 return_trajectory: bool = False, shift: float = 1.0) -> ODESolution:
    """First-order Euler from t = 1 (`noise`, (B, ...)) to t = 0 in `steps` steps of `time_grid(steps, shift)`
    (steps NFE)."""
    return _integrate(velocity_fn, noise, steps, heun=False, return_trajectory=return_trajectory, shift=shift)


def heun_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int,
                return_trajectory: bool = False, shift: float = 1.0) -> ODESolution:
    """Second-order Heun from t = 1 to t = 0 in `steps` uniform steps (2·steps NFE; the corrector is
    applied on the last step too, as the velocity is defined at t = 0)."""
    return _integrate(velocity_fn, noise, steps, heun=True, return_trajectory=return_trajectory, shift=shift)


def guided_velocity(model: VelocityModel, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float,
                    interval: tuple[float, float] | None = None, *, null_class: int) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + scale·(v_cond - v_uncond) for samples whose t lies in
    `interval` = (t_lo, t_hi) (closed; None = everywhere), the conditional velocity elsewhere.

    z (B, ...), t (B,), y (B,) -> (B, ...). The guided case is one forward of the batch
    [cond; uncond] (2B); scale 1 or no t in the interval costs one conditional forward of B.
    """
    if scale == 1.0:
        return model(z, t, y)
    inside = torch.ones_like(t, dtype=torch.bool) if interval is None else (t >= interval[0]) & (t <= interval[1])
    if not bool(inside.any()):
        return model(z, t, y)
    v_cond, v_uncond = model(torch.cat([z, z]), torch.cat([t, t]),
                             torch.cat([y, torch.full_like(y, null_class)])).chunk(2)  # (B, ...) each
    guided = v_uncond + scale * (v_cond - v_uncond)  # (B, ...)
    return torch.where(_per_sample(inside, z).bool(), guided, v_cond)


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, latent_shape: tuple[int, int, int], steps: int,
           cfg_scale: float = 1.0, interval: tuple[float, float] | None = None, seed: int = 0,
           method: Literal["euler", "heun"] = "euler", timestep_shift: float = 1.0) -> torch.Tensor:
    """Generate latents (B, C, H, W) for `labels` (B,) by integrating the model's guided velocity.

    `interval` is in this project's convention, t = 1 is noise: guidance applies for t_lo <= t <= t_hi.
    LightningDiT counts time the other way (t_LD = 1 - t), so its interval [a, b] is [1 - b, 1 - a] here.
    `timestep_shift`: see `shift_time` (1.0 = uniform grid).

    The initial noise is drawn on the CPU from `torch.Generator().manual_seed(seed)`, so a seed gives
    the same samples on any device. The model runs in eval mode (no label dropout) and is put back
    in its previous mode afterwards; its null class is `model.num_classes`.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {interval}")
    device = next(model.parameters()).device
    labels = labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0], *latent_shape), generator=generator).to(device)  # (B, C, H, W)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_velocity(model, z, t, labels, cfg_scale, interval, null_class=model.num_classes)

    was_training = model.training
    model.eval()
    try:
        solver = euler_sample if method == "euler" else heun_sample
        return solver(velocity, noise, steps, shift=timestep_shift).z
    finally:
        model.train(was_training)

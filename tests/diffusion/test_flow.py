"""Flow matching: the path, the loss, the samplers' orders and classifier-free guidance, on tiny CPU tensors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from aligntok.diffusion.dit import LightningDiT
from aligntok.diffusion.flow import (
    FlowDraws,
    FlowLoss,
    ODESolution,
    draw_flow,
    euler_sample,
    flow_matching_loss,
    guided_velocity,
    heun_sample,
    interpolate,
    sample,
    sample_t_logit_normal,
    velocity_target,
)


def test_path_endpoints_and_target() -> None:
    z0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(z0, eps, torch.zeros(3)), z0)
    assert torch.equal(interpolate(z0, eps, torch.ones(3)), eps)
    assert torch.equal(velocity_target(z0, eps), eps - z0)
    t = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(interpolate(z0, eps, t)[1], 0.5 * z0[1] + 0.5 * eps[1])
    torch.testing.assert_close(interpolate(z0, eps, t)[2], 0.25 * z0[2] + 0.75 * eps[2])
    # the finite difference along the path is the target velocity (the path is linear)
    torch.testing.assert_close(interpolate(z0, eps, 0.7) - interpolate(z0, eps, 0.3),
                               0.4 * velocity_target(z0, eps), atol=1e-5, rtol=1e-5)


def test_logit_normal_t() -> None:
    t = sample_t_logit_normal(20_000, torch.Generator().manual_seed(0))
    assert t.shape == (20_000,) and t.dtype == torch.float32
    assert bool((t > 0).all() and (t < 1).all())
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = sample_t_logit_normal(20_000, torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02
    assert torch.equal(t, sample_t_logit_normal(20_000, torch.Generator().manual_seed(0)))


def test_loss_is_zero_for_an_oracle_and_reproducible() -> None:
    z0 = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)

    def oracle(z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # knows z0, hence eps = (z_t - (1 - t) z0) / t and the velocity eps - z0 = (z_t - z0) / t
        return (z_t - z0) / t.view(-1, 1, 1, 1)

    out = flow_matching_loss(oracle, z0, y, torch.Generator().manual_seed(1))
    assert isinstance(out, FlowLoss) and out.loss.ndim == 0 and out.t.shape == (8,)
    assert out.loss.item() < 1e-20

    def zero(z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z_t)

    a = flow_matching_loss(zero, z0, y, torch.Generator().manual_seed(2))
    b = flow_matching_loss(zero, z0, y, torch.Generator().manual_seed(2))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    assert a.loss.item() > 0.5  # E|eps - z0|^2 = 2 per element


def test_loss_with_the_draws_passed_in() -> None:
    z0, y = torch.randn(4, 2, 3, 3), torch.zeros(4, dtype=torch.long)

    def model(z_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * z_t + t.view(-1, 1, 1, 1)

    drawn = flow_matching_loss(model, z0, y, torch.Generator().manual_seed(3), t_mean=0.5, t_std=0.8)
    draws = draw_flow(4, (2, 3, 3), torch.Generator().manual_seed(3), t_mean=0.5, t_std=0.8)
    given = flow_matching_loss(model, z0, y, draws=draws)
    assert torch.equal(given.loss, drawn.loss) and torch.equal(given.t, drawn.t)  # the same draws, the same loss
    z_t = (1 - draws.t.view(-1, 1, 1, 1)) * z0 + draws.t.view(-1, 1, 1, 1) * draws.eps
    expected = ((model(z_t, draws.t, y) - (draws.eps - z0)) ** 2).mean()
    torch.testing.assert_close(given.loss, expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="exactly one of `generator` and `draws`"):
        flow_matching_loss(model, z0, y)
    with pytest.raises(ValueError, match="exactly one"):
        flow_matching_loss(model, z0, y, torch.Generator(), draws=draws)
    with pytest.raises(ValueError, match=r"do not fit z0 \(4, 2, 3, 3\)"):
        flow_matching_loss(model, z0, y, draws=FlowDraws(t=draws.t[:3], eps=draws.eps[:3]))


C = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)  # (B=2, 2)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_euler_is_exact_for_a_constant_field(steps: int) -> None:
    z1 = torch.randn(2, 2, dtype=torch.float64)
    out = euler_sample(lambda z, t: C.clone(), z1, steps, return_trajectory=True)
    torch.testing.assert_close(out.z, z1 - C, atol=1e-12, rtol=0)
    assert out.trajectory is not None and out.trajectory.shape == (steps + 1, 2, 2)
    assert torch.equal(out.trajectory[0], z1) and torch.equal(out.trajectory[-1], out.z)
    assert out.times[0] == 1.0 and out.times[-1] == 0.0 and out.times.shape == (steps + 1,)


def test_orders_on_a_field_linear_in_t() -> None:
    """v = 2t·c: exact z(0) = z(1) - c. Euler (left points on 1 -> 0) gives z(1) - (1 + 1/n)·c."""
    z1 = torch.randn(2, 2, dtype=torch.float64)

    def field(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 2 * t.view(-1, 1) * C

    for n in (4, 8, 16):
        euler_error = euler_sample(field, z1, n).z - (z1 - C)
        torch.testing.assert_close(euler_error, -C / n, atol=1e-12, rtol=0)
        torch.testing.assert_close(heun_sample(field, z1, n).z, z1 - C, atol=1e-12, rtol=0)


def test_orders_on_an_autonomous_linear_field() -> None:
    """dz/dt = z from t = 1 to 0: z(0) = z(1)/e. Doubling steps halves Euler's error, quarters Heun's."""
    z1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = z1 / math.e

    def errors(solver: Callable[..., ODESolution], n: int) -> float:
        return (solver(lambda z, t: z, z1, n).z - exact).abs().max().item()

    euler_ratio = errors(euler_sample, 16) / errors(euler_sample, 32)
    heun_ratio = errors(heun_sample, 16) / errors(heun_sample, 32)
    assert 1.9 < euler_ratio < 2.1, euler_ratio
    assert 3.8 < heun_ratio < 4.2, heun_ratio
    assert errors(heun_sample, 16) < errors(euler_sample, 16) / 10


class ToyModel(torch.nn.Module):
    """v = z·(1 + y) + t: class-dependent, so guidance is visible; counts calls and batch sizes."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives `sample` a device
        self.batches: list[int] = []

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.batches.append(z.shape[0])
        return z * (1 + y.to(z.dtype)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_guidance_scales_and_interval() -> None:
    model = ToyModel()
    z, y = torch.randn(2, 1, 2, 2), torch.tensor([0, 2])
    t = torch.tensor([0.5, 0.5])
    cond, uncond = model(z, t, y), model(z, t, torch.full_like(y, 3))
    model.batches.clear()
    assert torch.equal(guided_velocity(model, z, t, y, 1.0, null_class=3), cond)
    assert model.batches == [2]
    torch.testing.assert_close(guided_velocity(model, z, t, y, 0.0, null_class=3), uncond)
    model.batches.clear()
    torch.testing.assert_close(guided_velocity(model, z, t, y, 4.0, null_class=3), uncond + 4 * (cond - uncond))
    assert model.batches == [4]  # one forward of [cond; uncond]
    # outside the interval: the conditional velocity, in one forward of B
    model.batches.clear()
    assert torch.equal(guided_velocity(model, z, t, y, 4.0, (0.6, 1.0), null_class=3), cond)
    assert model.batches == [2]
    # per-sample: only the sample whose t is inside is guided
    t_mixed = torch.tensor([0.2, 0.8])
    c_m, u_m = model(z, t_mixed, y), model(z, t_mixed, torch.full_like(y, 3))
    out = guided_velocity(model, z, t_mixed, y, 4.0, (0.6, 1.0), null_class=3)
    torch.testing.assert_close(out[0], c_m[0])
    torch.testing.assert_close(out[1], u_m[1] + 4 * (c_m[1] - u_m[1]))


def _tiny_dit() -> LightningDiT:
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, in_channels=2, num_classes=3, hidden_size=16, depth=1, num_heads=2)
    with torch.no_grad():  # leave the zero init so the velocity is not identically zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_sample_is_deterministic_per_seed() -> None:
    model = _tiny_dit().train()
    labels = torch.tensor([0, 1, 2])
    a = sample(model, labels, (2, 4, 4), steps=3, cfg_scale=2.0, interval=(0.0, 0.8), seed=7)
    b = sample(model, labels, (2, 4, 4), steps=3, cfg_scale=2.0, interval=(0.0, 0.8), seed=7)
    c = sample(model, labels, (2, 4, 4), steps=3, cfg_scale=2.0, interval=(0.0, 0.8), seed=8)
    assert a.shape == (3, 2, 4, 4) and torch.equal(a, b) and not torch.allclose(a, c)
    assert model.training  # the mode is restored
    # the noise is the seeded CPU draw; with cfg 1 sampling is plain Euler on the model
    noise = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        expected = euler_sample(lambda z, t: model(z, t, labels), noise, 3).z
    torch.testing.assert_close(sample(model, labels, (2, 4, 4), steps=3, seed=7), expected)
    heun = sample(model, labels, (2, 4, 4), steps=3, seed=7, method="heun")
    assert heun.shape == a.shape and not torch.allclose(heun, expected)
    with pytest.raises(ValueError, match="method"):
        sample(model, labels, (2, 4, 4), steps=3, method="rk4")  # type: ignore[arg-type]

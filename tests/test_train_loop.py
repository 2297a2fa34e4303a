from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from aligntok.train.checkpoint import TrainState, module_weights
from aligntok.train.loop import LoopSettings, NonFiniteLossError, StepLosses, run_loop, update_ema, warmup_factor


class Crash(RuntimeError):
    pass


def make_state(ema: bool = True) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    critic = torch.nn.Linear(1, 1)
    modules = {"model": model, "critic": critic}
    if ema:
        modules["ema"] = copy.deepcopy(model).requires_grad_(False)
    optimizers = {
        "main": torch.optim.AdamW(model.parameters(), lr=1e-2),
        "critic": torch.optim.AdamW(critic.parameters(), lr=1e-2),
    }
    return TrainState(step=0, modules=modules, optimizers=optimizers)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def objective_for(state: TrainState, crash_at: int | None = None, nan_at: int | None = None):
    model, critic = state.modules["model"], state.modules["critic"]

    def objective(batch, step: int) -> StepLosses:
        if step == crash_at:
            raise Crash(step)
        x, y = batch
        pred = model(x)
        noise = torch.randn_like(pred) * 0.01  # consumes the RNG: resume must restore it
        loss = ((pred + noise - y) ** 2).mean()
        if step == nan_at:
            loss = loss * float("nan")
        critic_loss = (critic(pred.detach()) - y).pow(2).mean()
        return StepLosses(main=loss, aux={"critic": critic_loss}, logs={"mse": loss.item()})

    return objective


SETTINGS = LoopSettings(steps=30, warmup_steps=5, grad_clip=1.0, ema_decay=0.9, checkpoint_every=7, name="toy")


def train(path: Path, crash_at: int | None = None) -> TrainState:
    state = make_state()
    run_loop(settings=SETTINGS, state=state, objective=objective_for(state, crash_at), batches=batches, checkpoint=path)
    return state


def test_resume_after_a_crash_gives_identical_weights(tmp_path: Path) -> None:
    torch.manual_seed(123)
    reference = train(tmp_path / "ref.safetensors")
    torch.manual_seed(999)  # a different process would start with a different RNG
    with pytest.raises(Crash):
        train(tmp_path / "run.safetensors", crash_at=17)
    assert module_weights(tmp_path / "run.safetensors", "model")  # checkpoint of step 14 exists
    resumed = train(tmp_path / "run.safetensors")
    for role in ("model", "ema", "critic"):
        for (name, a), (_, b) in zip(reference.modules[role].state_dict().items(),
                                     resumed.modules[role].state_dict().items()):
            assert torch.equal(a, b), f"{role}.{name} differs after resume"
    # ...and the loss actually went down, so this is a real training run.
    x, y = batches(0)
    assert ((resumed.modules["model"](x) - y) ** 2).mean() < 0.5 * y.var()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    state = make_state()
    with pytest.raises(NonFiniteLossError, match=r"stage toy: loss 'main' is nan at step 10.*kept"):
        run_loop(settings=SETTINGS, state=state, objective=objective_for(state, nan_at=10), batches=batches,
                 checkpoint=path)
    sidecar = path.with_suffix(".json").read_text()
    assert '"step": 7' in sidecar
    weights = module_weights(path, "model")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_warmup_and_ema() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.fill_(0.0)
    update_ema(ema, model, decay=0.75)
    assert ema.weight.item() == pytest.approx(0.25)

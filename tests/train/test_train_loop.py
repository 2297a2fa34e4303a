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


def _assert_same_modules(reference: TrainState, other: TrainState) -> None:
    for role in reference.modules:
        for (name, a), (_, b) in zip(reference.modules[role].state_dict().items(),
                                     other.modules[role].state_dict().items()):
            assert torch.equal(a, b), f"{role}.{name} differs"


def test_resume_inside_the_warmup_gives_identical_weights(tmp_path: Path) -> None:
    # The checkpoint at step 3 holds the warmed-up rate lr * 3/10; the resumed run must warm up from the
    # base rate, not from that.
    settings = LoopSettings(steps=16, warmup_steps=10, grad_clip=1.0, ema_decay=0.9, checkpoint_every=3, name="toy")

    def run(path: Path, crash_at: int | None = None) -> TrainState:
        state = make_state()
        run_loop(settings=settings, state=state, objective=objective_for(state, crash_at), batches=batches,
                 checkpoint=path, progress=False)
        return state

    torch.manual_seed(123)
    reference = run(tmp_path / "ref.safetensors")
    with pytest.raises(Crash):
        run(tmp_path / "run.safetensors", crash_at=5)
    assert '"step": 3' in (tmp_path / "run.json").read_text()
    resumed = run(tmp_path / "run.safetensors")
    _assert_same_modules(reference, resumed)
    for role in ("main", "critic"):
        assert [g["lr"] for g in resumed.optimizers[role].param_groups] == pytest.approx([1e-2])


def test_a_corrupt_checkpoint_is_moved_aside_and_training_starts_over(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    reference = train(tmp_path / "ref.safetensors")
    path = tmp_path / "run.safetensors"
    garbage = (tmp_path / "ref.safetensors").read_bytes()[:1000]  # a truncated file
    path.write_bytes(garbage)
    path.with_suffix(".json").write_text('{"step": 14}')
    torch.manual_seed(5)
    with caplog.at_level("WARNING", logger="aligntok.train.loop"):
        again = train(path)
    assert "unusable checkpoint" in caplog.text and "starting over from step 0" in caplog.text
    assert (tmp_path / "run.safetensors.corrupt").read_bytes() == garbage
    assert (tmp_path / "run.json.corrupt").is_file()
    _assert_same_modules(reference, again)
    assert '"step": 30' in path.with_suffix(".json").read_text()


def test_a_checkpoint_that_does_not_fit_leaves_the_state_untouched(tmp_path: Path) -> None:
    from aligntok.train.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint

    other = make_state(ema=False)
    with torch.no_grad():
        other.modules["model"][0].weight.add_(1.0)
    save_checkpoint(tmp_path / "c.safetensors", other, {})
    state = make_state()  # has an "ema" role that the file lacks
    before = {k: v.clone() for k, v in state.modules["model"].state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match=r"c\.safetensors: unusable checkpoint .*'ema'"):
        load_checkpoint(tmp_path / "c.safetensors", state)
    assert all(torch.equal(before[k], v) for k, v in state.modules["model"].state_dict().items())


def test_cleaning_sets_other_fingerprints_aside_and_removes_temporaries(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from aligntok.train.checkpoint import STALE, clean_checkpoint_folder

    names = ["aaaa.safetensors", "aaaa.json", "aaaa.safetensors.corrupt", "bbbb.safetensors", "bbbb.json",
             "bbbb.safetensors.corrupt", ".aaaa.safetensors.tmp-4242", ".bbbb.json.tmp-17", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / STALE).mkdir()
    (tmp_path / STALE / "bbbb.json").write_text("an older set-aside copy")
    with caplog.at_level("INFO"):
        touched = clean_checkpoint_folder(tmp_path / "aaaa.safetensors")
    assert sorted(touched) == sorted([".aaaa.safetensors.tmp-4242", ".bbbb.json.tmp-17", "bbbb.json",
                                      "bbbb.safetensors", "bbbb.safetensors.corrupt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aaaa.json", "aaaa.safetensors",
                                                          "aaaa.safetensors.corrupt", "notes.txt", STALE]
    kept = {p.name: p.read_text() for p in (tmp_path / STALE).iterdir()}  # moved, with their contents
    assert kept == {"bbbb.json": "an older set-aside copy",  # not overwritten: the new ones are numbered, together
                    **{name.replace("bbbb", "bbbb-1"): name
                       for name in ("bbbb.json", "bbbb.safetensors", "bbbb.safetensors.corrupt")}}
    assert any("aside" in r.message and "bbbb.safetensors" in r.message and r.levelname == "WARNING"
               for r in caplog.records)
    assert clean_checkpoint_folder(tmp_path / "missing" / "x.safetensors") == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc (Linux)")
def test_checkpoint_writes_are_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from aligntok.train.checkpoint import save_checkpoint

    names: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync, noting which file it was given
        names.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path / "c.safetensors", make_state(), {})
    temp_files = [n for n in names if n.startswith(".c.") and ".tmp-" in n]
    assert len(temp_files) == 2 and {n.split(".tmp-")[0] for n in temp_files} == {".c.safetensors", ".c.json"}
    assert names.count(tmp_path.name) == 2  # the folder, after each rename
    assert names.index(tmp_path.name) > names.index(temp_files[0])

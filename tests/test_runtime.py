"""The fast paths of params.yaml `runtime:` (aligntok/runtime.py): each changes speed, never the result."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from aligntok import runtime
from aligntok.config import ConfigError, RuntimeConfig, load_params
from aligntok.data.loader import ImageSet
from aligntok.tokenizer.decoder import Decoder

from support.paths import REPO


def failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
    raise RuntimeError("no C++ compiler on this machine")


def test_compile_falls_back_to_eager_when_the_compiler_fails(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A compiler that fails at the first call (as a missing toolchain does): warned once, then eager."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    model = torch.nn.Linear(4, 3)
    forward = runtime.CompiledOrEager(model, "unit")
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger="aligntok.runtime"):
        out = forward(x)
        forward(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert not forward.is_compiled and "no C++ compiler" in forward.eager_reason
    warnings = [r.getMessage() for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and warnings[0].startswith("unit:")


def test_compile_that_cannot_even_start_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", refuse)
    model = torch.nn.Linear(4, 3)
    forward = runtime.CompiledOrEager(model, "unit")
    x = torch.randn(2, 4)
    torch.testing.assert_close(forward(x), model(x), rtol=0, atol=0)
    assert "Windows" in forward.eager_reason


def test_compile_off_is_eager_and_says_why() -> None:
    forward = runtime.CompiledOrEager(torch.nn.Linear(4, 3), "unit", enabled=False)
    assert not forward.is_compiled and forward.eager_reason == "runtime.compile is off"


def test_compiled_forward_matches_eager_and_model_errors_are_not_swallowed() -> None:
    """The real compiler (inductor, C++ on this CPU): same numbers; a wrong input still raises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    forward = runtime.CompiledOrEager(model, "unit")
    x = torch.randn(5, 8)
    torch.testing.assert_close(forward(x), model(x), rtol=1e-5, atol=1e-6)
    assert forward.is_compiled
    with pytest.raises(Exception, match="same reduction dim|shape"):
        forward(torch.randn(5, 7))  # the model's own error: raised, not a reason to fall back
    assert forward.is_compiled


def test_prefetch_returns_the_same_batches_built_on_a_background_thread() -> None:
    built_on: dict[int, str] = {}

    def batches(step: int) -> torch.Tensor:
        built_on[step] = threading.current_thread().name
        return torch.full((2,), float(step))

    inline, ahead = runtime.Prefetcher(batches, 0), runtime.Prefetcher(batches, 2)
    try:
        expected = [inline(step, 6) for step in range(6)]
        assert set(built_on.values()) == {threading.current_thread().name}
        built_on.clear()
        got = [ahead(step, 6) for step in range(6)]
    finally:
        ahead.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert sorted(built_on) == list(range(6))  # every step once, none past the last
    assert all(name.startswith("aligntok-prefetch") for name in built_on.values())


def test_training_loop_with_prefetch_matches_inline(tmp_path: Path) -> None:
    from aligntok.train.checkpoint import TrainState
    from aligntok.train.loop import LoopSettings, StepLosses, run_loop

    def train(prefetch: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        state = TrainState(step=0, modules={"model": model},
                           optimizers={"main": torch.optim.SGD(model.parameters(), lr=0.1)})

        def objective(batch: torch.Tensor, step: int) -> StepLosses:
            return StepLosses(main=(model(batch) ** 2).mean())

        run_loop(settings=LoopSettings(steps=7, checkpoint_every=100), state=state, objective=objective,
                 batches=lambda step: torch.randn(4, 3, generator=torch.Generator().manual_seed(step)),
                 checkpoint=tmp_path / f"p{prefetch}.safetensors", progress=False, prefetch=prefetch)
        return model.weight.detach().clone()

    torch.testing.assert_close(train(2), train(0), rtol=0, atol=0)


def _png(seed: int, side: int = 24) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_threads_give_the_same_batch() -> None:
    encoded = [_png(i) for i in range(9)]
    labels = torch.arange(9)
    keys = [str(i) for i in range(9)]
    indices = torch.tensor([8, 0, 3, 3, 5])
    one = ImageSet(encoded, labels, keys).batch(indices)
    threaded_set = ImageSet(encoded, labels, keys, decode_threads=3)
    three = threaded_set.batch(indices)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert threaded_set._pool is not None  # the threads were used


def test_channels_last_decoder_same_output_and_saved_weights() -> None:
    torch.manual_seed(0)
    decoder = Decoder(latent_channels=4, channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                      latent_size=4)
    z = torch.randn(3, 4, 4, 4)
    reference = decoder(z)
    runtime.channels_last(True, decoder, None)
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(decoder(runtime.nhwc(z, True)), reference, rtol=1e-4, atol=1e-5)
    from safetensors.torch import load_file

    from aligntok.fileio import atomic_save_safetensors

    with __import__("tempfile").TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        atomic_save_safetensors(decoder.state_dict(), path, {})  # NHWC weights are saved contiguous
        loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in decoder.state_dict().items())
    runtime.channels_last(False, decoder)  # off: nothing moves back or forth
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_threads_default_divides_cores_among_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert runtime.default_threads() == 2
        assert runtime.configure_threads(RuntimeConfig()) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert runtime.default_threads() == 1  # never zero
        assert runtime.configure_threads(RuntimeConfig(threads=3)) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_autocast_is_bf16_on_cuda_only_under_auto() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.autocast_dtype(RuntimeConfig(), cpu) is None
    assert runtime.autocast_dtype(RuntimeConfig(), cuda) is torch.bfloat16
    assert runtime.autocast_dtype(RuntimeConfig(autocast="off"), cuda) is None
    assert runtime.autocast_dtype(RuntimeConfig(autocast="bf16"), cpu) is torch.bfloat16
    with runtime.autocast(RuntimeConfig(autocast="bf16"), cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with runtime.autocast(RuntimeConfig(), cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_runtime_section_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("runtime: {decode_threads: -1}\n")
    with pytest.raises(ConfigError, match=r"runtime\.decode_threads: -1 is invalid"):
        load_params(path)
    path.write_text("runtime: {autocast: fp8}\n")
    with pytest.raises(ConfigError, match=r"runtime\.autocast"):
        load_params(path)
    embedded = load_params(REPO / "params.yaml").runtime
    assert embedded.compile and embedded.channels_last and RuntimeConfig().compile is True
    assert load_params(REPO / "configs" / "tiny.yaml").runtime.compile is False  # a minute-long run: not worth it


def test_every_command_records_its_resources(tmp_path: Path) -> None:
    log = tmp_path / "resources.jsonl"
    env = {**os.environ, runtime.RESOURCE_LOG_ENV: str(log)}
    for argv in (["config"], ["--set", "runtime.threads=0", "config"]):
        subprocess.run([sys.executable, "-m", "aligntok", *argv], cwd=REPO, env=env, capture_output=True, timeout=120)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["command"], r["exit_code"]) for r in records] == [("config", 0), ("config", 1)]
    for r in records:
        assert r["peak_rss_mb"] > 10 and r["wall_seconds"] > 0 and r["user_seconds"] > 0
        assert r["started"] <= r["ended"]
    summary = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage_resources.py"), str(log),
                              "--out", str(tmp_path / "r.md")], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    assert "| config |" in summary.stdout and "**all 2 stages**" in summary.stdout
    assert (tmp_path / "r.md").read_text().startswith("# Per-stage resources")
    log.write_text(log.read_text() + "{not json\n")
    broken = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stage_resources.py"), str(log)],
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0 and f"{log}:3: not a JSON record" in broken.stderr

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aligntok.cli import build_parser, main
from aligntok.config import Params, load_params

from support.paths import REPO

COMMANDS = {"config", "encoder", "snapshot", "ingest", "validate", "align_latent", "align_perceptual",
            "refine_decoder", "vae_baseline", "cache_latents", "train_dit", "fid_reference", "evaluate", "sample",
            "encode", "decode", "study", "promote", "rollback", "lineage",
            "text_features", "t2i_latents", "train_t2i", "evaluate_t2i"}


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aligntok", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command() -> None:
    result = run_module("--help")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert COMMANDS <= listed
    subparsers = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(subparsers) == COMMANDS


def test_config_prints_resolved_params_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--params", str(REPO / "params.yaml"), "--set", "data.resolution=64",
                 "--set", "encoder.image_size=224", "config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["data"]["resolution"], resolved["encoder"]["image_size"]) == (64, 224)
    assert resolved["encoder"]["depth"] == 8


def test_bad_param_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  resolution: -4\n")
    result = run_module("--params", str(bad), "ingest", "fashion-mnist", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "data.resolution: -4" in result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_set_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--params", str(REPO / "params.yaml"), "--set", "data.resolution", "config"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


def test_config_out_writes_a_complete_params_file_that_loads_to_the_preset(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    assert main(["--params", str(REPO / "configs" / "tiny.yaml"), "config", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"# Written from {REPO / 'configs' / 'tiny.yaml'}")
    written = yaml.safe_load(text)
    assert set(written) == set(Params().to_dict())  # every section spelled out, for DVC to read
    assert load_params(out) == load_params(REPO / "configs" / "tiny.yaml")
    assert written["data"]["max_images"] == 600 and written["align_latent"]["steps"] == 6


@pytest.mark.parametrize(("command", "module", "function", "args"), [
    ("align_latent", "aligntok.tokenizer.stages", "run_tokenizer_stage",
     ["--data", "d", "--encoder", "e", "--out", "o"]),
    ("train_dit", "aligntok.diffusion.train", "run_train_dit", ["--latents", "l", "--tokenizer", "t", "--out", "o"]),
    ("train_t2i", "aligntok.diffusion.t2i_train", "run_train_t2i",
     ["--latents", "l", "--text", "t", "--tokenizers", "k", "--out", "o"]),
])
def test_the_cli_passes_each_training_stage_its_code_digest(command: str, module: str, function: str,
                                                            args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The library takes the code digest of its checkpoint fingerprint from the CLI (it never imports the CLI)."""
    import importlib

    from aligntok.ops.lineage import code_digest

    seen: dict[str, str] = {}

    def capture(*_args: object, code: str = "", **_kwargs: object) -> object:
        seen["code"] = code
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module(module), function, capture)
    with pytest.raises(SystemExit):
        main(["--params", str(REPO / "params.yaml"), command, *args])
    assert seen["code"] == code_digest(command) and len(seen["code"]) == 64

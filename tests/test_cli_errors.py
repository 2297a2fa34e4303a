"""Bad input to any command is one line on stderr that names the input, exit code 1; `--debug` shows the
traceback. Inputs: `--set` values, corrupt tokenizer / DiT folders and latents files, images that are
not images or are decompression bombs."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from aligntok.cli import main
from aligntok.config import parse_params
from aligntok.diffusion.dit import build_dit
from aligntok.tokenizer.api import build_from_description, save_tokenizer_folder
from aligntok.encoder import create_random_encoder

from support.paths import REPO
from support.tiny import TINY_MODEL


def fail_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process; it must fail with exactly one stderr line (returned) and no traceback."""
    code = main(["--params", str(REPO / "params.yaml"), *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` (1-bit grey) in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A working tiny tokenizer folder, a DiT folder around it, and a 20x20 photo-like PNG."""
    root = tmp_path_factory.mktemp("models")
    params = parse_params(TINY_MODEL)
    torch.manual_seed(0)
    _, desc = create_random_encoder("vit_small_patch14_dinov2", params.encoder.depth, params.encoder.image_size)
    description = {"kind": "aligned", "tokenizer": params.tokenizer.model_dump(mode="json"),
                   "latent": params.latent.model_dump(mode="json"), "encoder": desc.to_dict(),
                   "resolution": params.data.resolution}
    save_tokenizer_folder(root / "tokenizer", build_from_description(description), description)

    dit_dir = root / "dit"
    dit_dir.mkdir()
    C, h = params.latent.channels, desc.grid_size
    save_file(build_dit(params.dit, C, h, 2).state_dict(), str(dit_dir / "dit.safetensors"))
    (dit_dir / "dit.json").write_text(json.dumps({
        "format": "aligntok-dit/1", "dit": params.dit.model_dump(mode="json"),
        "sample": params.sample.model_dump(mode="json"), "latent_shape": [C, h, h], "num_classes": 2}))
    (dit_dir / "stats.json").write_text(json.dumps({"mean": [0.0] * C, "std": [1.0] * C}))
    shutil.copytree(root / "tokenizer", dit_dir / "tokenizer")

    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(image)
    return {"tokenizer": root / "tokenizer", "dit": dit_dir, "image": image}


def broken(source: Path, tmp_path: Path, name: str, edit: Callable[[bytes], bytes]) -> tuple[Path, Path]:
    """A copy of a model folder with file `name` replaced by `edit(its bytes)`; returns (folder, that file)."""
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    path = folder / name
    path.write_bytes(edit(path.read_bytes()))
    return folder, path


def edit_json(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        value = json.loads(data)
        change(value)
        return json.dumps(value).encode()
    return edit


# ------------------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(("item", "expected"), [
    ("data.resolution=[1", "aligntok config: error: --set 'data.resolution=[1': the value is not valid YAML: "),
    ("data.resolution=a: b: c", "--set 'data.resolution=a: b: c': the value is not valid YAML: "),
    ("data.resolution.x=1", "params.yaml: override data.resolution.x=1: data.resolution is 32, not a section"),
    ("sample.cfg_interval=[0.9, 0.1]", "params.yaml: sample.cfg_interval: [0.9, 0.1] is invalid"),
    ("train_dit.lr=.nan", "params.yaml: train_dit.lr: nan is invalid"),
])
def test_bad_set_is_one_line(capsys: pytest.CaptureFixture[str], item: str, expected: str) -> None:
    assert expected in fail_line(capsys, "--set", item, "config")


# ------------------------------------------------------------------------------------------ encode


def test_good_model_encodes_and_decodes(models: dict[str, Path], tmp_path: Path) -> None:
    """The checks below refuse only broken inputs."""
    latents = tmp_path / "z.safetensors"
    assert main(["encode", str(models["image"]), "--model", str(models["tokenizer"]), "--out", str(latents)]) == 0
    assert main(["decode", str(latents), "--model", str(models["tokenizer"]), "--out-dir", str(tmp_path / "x")]) == 0
    assert Image.open(tmp_path / "x" / "photo.png").size == (16, 16)


TOKENIZER_BREAKS = {
    "json": ("tokenizer.json", lambda data: b"{not json", "cannot read the model description: Expecting"),
    "format": ("tokenizer.json", edit_json(lambda d: d.update(format="other/1")), "format 'other/1'"),
    "key": ("tokenizer.json", edit_json(lambda d: d.pop("resolution")), "missing key 'resolution'"),
    "config": ("tokenizer.json", edit_json(lambda d: d["tokenizer"].update(adapter_hidden="wide")), "adapter_hidden: Input should be"),
    "kind": ("tokenizer.json", edit_json(lambda d: d.update(kind="gan")), "kind: 'gan' is neither"),
    "arch": ("tokenizer.json", edit_json(lambda d: d["encoder"].update(arch="no_such_vit")), "no_such_vit"),
    "weights": ("tokenizer.safetensors", lambda data: data[: len(data) // 3], "cannot read the weights"),
    "garbage": ("tokenizer.safetensors", lambda data: b"\x00" * 64, "cannot read the weights"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_BREAKS))
def test_corrupt_tokenizer_is_one_line_naming_the_file(capsys: pytest.CaptureFixture[str], models: dict[str, Path],
                                                       tmp_path: Path, case: str) -> None:
    name, edit, reason = TOKENIZER_BREAKS[case]
    folder, path = broken(models["tokenizer"], tmp_path, name, edit)
    line = fail_line(capsys, "encode", str(models["image"]), "--model", str(folder), "--out", str(tmp_path / "z"))
    assert line.startswith(f"aligntok encode: error: {path}: ") and reason in line


def test_weights_of_another_architecture_name_the_weights(capsys: pytest.CaptureFixture[str],
                                                          models: dict[str, Path], tmp_path: Path) -> None:
    """tokenizer.json says 8 latent channels, the weights were trained with 4."""
    folder, _ = broken(models["tokenizer"], tmp_path, "tokenizer.json", edit_json(lambda d: d["latent"].update(channels=8)))
    line = fail_line(capsys, "encode", str(models["image"]), "--model", str(folder), "--out", str(tmp_path / "z"))
    assert f"{folder / 'tokenizer.safetensors'}: the tensors do not fit the architecture" in line
    assert "of another shape (first adapter." in line


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: png_header(p, 20_000, 20_000), "too large: Image size (400000000 pixels) exceeds limit"),  # > 2x PIL's
    (lambda p: png_header(p, 10_000, 10_000), "too large: 10000x10000 = 100000000 pixels > max_pixels 89478485"),
    (lambda p: p.write_text("not an image"), "cannot read image: cannot identify image file"),
])
def test_bad_image_is_one_line_naming_it(capsys: pytest.CaptureFixture[str], models: dict[str, Path], tmp_path: Path,
                                         make: Callable[[Path], Any], reason: str) -> None:
    image = tmp_path / "input.png"
    make(image)
    line = fail_line(capsys, "encode", str(image), "--model", str(models["tokenizer"]), "--out", str(tmp_path / "z"))
    assert line.startswith(f"aligntok encode: error: {image}: {reason}")


def test_max_pixels_option(capsys: pytest.CaptureFixture[str], models: dict[str, Path], tmp_path: Path) -> None:
    line = fail_line(capsys, "encode", str(models["image"]), "--model", str(models["tokenizer"]),
                     "--out", str(tmp_path / "z"), "--max-pixels", "100")
    assert line.endswith(f"{models['image']}: too large: 20x20 = 400 pixels > max_pixels 100")


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize(("make", "reason"), [
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"), "not a latents file from `aligntok encode`"),
    (lambda p: save_file({"other": torch.zeros(1, 4, 4, 4)}, str(p)), "not a latents file from `aligntok encode`"),
    (lambda p: save_file({"latents": torch.zeros(1, 3, 4, 4)}, str(p)), "latents (1, 3, 4, 4), but the tokenizer"),
    (lambda p: save_file({"latents": torch.zeros(1, 4, 4, 4)}, str(p), metadata={"files": "{"}),
     "not a latents file from `aligntok encode`"),
])
def test_bad_latents_file_is_one_line_naming_it(capsys: pytest.CaptureFixture[str], models: dict[str, Path],
                                                tmp_path: Path, make: Callable[[Path], Any], reason: str) -> None:
    latents = tmp_path / "z.safetensors"
    make(latents)
    line = fail_line(capsys, "decode", str(latents), "--model", str(models["tokenizer"]), "--out-dir", str(tmp_path))
    assert line.startswith(f"aligntok decode: error: {latents}: {reason}")


# ------------------------------------------------------------------------------------------ sample


def test_good_dit_samples(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(models["dit"]), "--steps", "2", "--per-class", "1", "--out", str(out)]) == 0
    assert out.is_file()


DIT_BREAKS = {
    "json": ("dit.json", lambda data: data[:10], "cannot read the model description"),
    "preset": ("dit.json", edit_json(lambda d: d["dit"].update(preset="DiT-XL/2")), "preset: Value error, unknown preset"),
    "sample": ("dit.json", edit_json(lambda d: d.pop("sample")), "missing key 'sample'"),
    "weights": ("dit.safetensors", lambda data: data[:100], "cannot read the weights"),
    "stats": ("stats.json", lambda data: b"[1, 2", "cannot read the latent statistics"),
    "stats_key": ("stats.json", edit_json(lambda d: d.pop("std")), "missing key 'std'"),
    "tokenizer": ("tokenizer/tokenizer.json", lambda data: b"", "cannot read the model description"),
}


@pytest.mark.parametrize("case", sorted(DIT_BREAKS))
def test_corrupt_dit_is_one_line_naming_the_file(capsys: pytest.CaptureFixture[str], models: dict[str, Path],
                                                 tmp_path: Path, case: str) -> None:
    name, edit, reason = DIT_BREAKS[case]
    folder, path = broken(models["dit"], tmp_path, name, edit)
    line = fail_line(capsys, "sample", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "g.png"))
    assert line.startswith(f"aligntok sample: error: {path}: ") and reason in line


def test_unknown_registered_model_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    line = fail_line(capsys, "sample", "--model", "models:/no-such-model@champion", "--out", str(tmp_path / "g.png"))
    assert line.startswith("aligntok sample: error: models:/no-such-model@champion: cannot fetch the model: ")


# ------------------------------------------------------------------------------------------ the real process


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "aligntok", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_process_prints_one_line_and_debug_the_traceback(models: dict[str, Path], tmp_path: Path) -> None:
    """As a user sees it: no PIL warning, no traceback; `--debug` shows where it failed."""
    bomb = png_header(tmp_path / "bomb.png", 10_000, 10_000)  # PIL only warns below 2x its limit
    argv = ["encode", str(bomb), "--model", str(models["tokenizer"]), "--out", str(tmp_path / "z")]
    plain = run_cli(*argv)
    assert plain.returncode == 1
    assert plain.stderr.splitlines() == [f"aligntok encode: error: {bomb}: too large: 10000x10000 = 100000000 "
                                         "pixels > max_pixels 89478485"]
    debug = run_cli("--debug", *argv)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "read_image" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].endswith("pixels > max_pixels 89478485")

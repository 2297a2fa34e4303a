"""A tokenizer stage's checkpoint: its fingerprint (params, inputs, perceptual network, code), stale files
cleaned, a corrupt checkpoint moved aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aligntok.config import Params, parse_params
from aligntok.tokenizer.stages import DISCRIMINATOR, StagePaths, fingerprint, run_tokenizer_stage

from support.tiny import QUICK_STAGE1, TINY_MODEL, make_inputs, one_thread  # noqa: F401 (fixture)

TINY = {**TINY_MODEL, "align_latent": {**QUICK_STAGE1, "checkpoint_every": 1}}
pytestmark = pytest.mark.usefixtures("one_thread")  # see support.tiny.one_thread


@pytest.fixture(scope="module")
def params() -> Params:
    return parse_params(TINY)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_inputs(tmp_path_factory.mktemp("stage"))


def test_fingerprint_covers_perceptual_network_code_and_carried_discriminator(
        params: Params, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    data, encoder = inputs
    paths = StagePaths(data=data, encoder=encoder, out=tmp_path / "out")
    base = fingerprint("align_latent", params, paths, "efficientnet-lite0", code="c1")
    assert fingerprint("align_latent", params, paths, "encoder-feature-distance", code="c1") != base
    assert fingerprint("align_latent", params, paths, None, code="c1") != base
    assert fingerprint("align_latent", params, paths, "efficientnet-lite0", code="c2") != base
    assert fingerprint("align_latent", params, paths, "efficientnet-lite0") != base  # "": the code left out

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "tokenizer.safetensors").write_bytes(b"weights")
    with_previous = StagePaths(data=data, encoder=encoder, out=tmp_path / "out", previous=previous)
    before = fingerprint("refine_decoder", params, with_previous, None, code="c1")
    (previous / DISCRIMINATOR).write_bytes(b"discriminator")
    assert fingerprint("refine_decoder", params, with_previous, None, code="c1") != before


def test_stage_cleans_stale_checkpoints_and_starts_over_after_a_corrupt_one(
        params: Params, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    data, encoder = inputs
    paths = StagePaths(data=data, encoder=encoder, out=tmp_path / "out", checkpoints=tmp_path / "ck")
    key = fingerprint("align_latent", params, paths, None)  # QUICK_STAGE1 has no perceptual term
    folder = tmp_path / "ck" / "align_latent"
    folder.mkdir(parents=True)
    (folder / f"{key}.safetensors").write_bytes(b"\x00" * 64)  # a checkpoint whose write was torn
    stale = ["0123456789abcdef.safetensors", "0123456789abcdef.json", f".{key}.safetensors.tmp-99"]
    for name in stale:
        (folder / name).write_text("old")
    result = run_tokenizer_stage("align_latent", params, paths, register=False, progress=False)
    assert (result.out / "tokenizer.safetensors").is_file()
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{key}.safetensors", f"{key}.json",
                                                              f"{key}.safetensors.corrupt", "stale"])
    assert sorted(p.name for p in (folder / "stale").iterdir()) == sorted(stale[:2])  # set aside; the temp file removed
    assert json.loads((folder / f"{key}.json").read_text())["step"] == QUICK_STAGE1["steps"]


def test_other_fingerprints_go_to_stale_without_overwriting_what_is_there(tmp_path: Path) -> None:
    from aligntok.train.checkpoint import STALE, clean_checkpoint_folder

    folder = tmp_path / "ckpt"
    folder.mkdir()
    current = folder / "00aa.safetensors"
    for run in ("first", "second"):  # the same older fingerprint trained twice, set aside twice
        for name in ("11bb.safetensors", "11bb.json"):
            (folder / name).write_text(run)
        (folder / "11bb.snapshots").mkdir()
        (folder / "11bb.snapshots" / "step_000002.safetensors").write_text(run)
        (folder / "00aa.json").write_text("ours")
        (folder / "00aa.snapshots").mkdir(exist_ok=True)
        (folder / ".00aa.safetensors.tmp-123").write_text("interrupted write")
        moved = clean_checkpoint_folder(current)
        assert sorted(moved) == [".00aa.safetensors.tmp-123", "11bb.json", "11bb.safetensors", "11bb.snapshots"]
    assert sorted(p.name for p in folder.iterdir()) == ["00aa.json", "00aa.snapshots", STALE]
    stale = folder / STALE
    assert sorted(p.name for p in stale.iterdir()) == [
        "11bb-1.json", "11bb-1.safetensors", "11bb-1.snapshots", "11bb.json", "11bb.safetensors", "11bb.snapshots"]
    assert (stale / "11bb.json").read_text() == "first" and (stale / "11bb-1.json").read_text() == "second"
    assert (stale / "11bb-1.snapshots" / "step_000002.safetensors").read_text() == "second"

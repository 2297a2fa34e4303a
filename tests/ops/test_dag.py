from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aligntok.ops.dag import stage_order

from support.paths import REPO


def test_repo_pipeline_order_respects_every_dependency() -> None:
    order = stage_order(REPO / "dvc.yaml")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(order) == set(stages)
    position = {name: i for i, name in enumerate(order)}
    assert position["snapshot"] < position["ingest"] < position["validate"] < position["align_latent"]
    assert position["encoder"] < position["align_latent"] < position["align_perceptual"] < position["refine_decoder"]


def test_order_follows_outs_not_file_order(tmp_path: Path) -> None:
    dvc = {"stages": {
        "late": {"cmd": "x", "deps": ["data/a/file.bin"], "outs": ["data/b"]},
        "early": {"cmd": "x", "outs": ["data/a"]},
        "report": {"cmd": "x", "deps": ["data/b"], "metrics": [{"reports/m.json": {"cache": False}}]},
    }}
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump(dvc, sort_keys=False))
    assert stage_order(path) == ["early", "late", "report"]


def test_cycle_is_an_error(tmp_path: Path) -> None:
    dvc = {"stages": {"a": {"cmd": "x", "deps": ["b.out"], "outs": ["a.out"]},
                      "b": {"cmd": "x", "deps": ["a.out"], "outs": ["b.out"]}}}
    path = tmp_path / "dvc.yaml"
    path.write_text(yaml.safe_dump(dvc))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(path)

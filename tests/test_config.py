from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aligntok.config import ConfigError, load_params, parse_params

from conftest import REPO


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_and_match_defaults_keys() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.encoder.source == "embedded:dinov2_vits14"
    assert params.data.source == "fashion-mnist"
    # params.yaml spells out every key (DVC tracks keys by name).
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    resolved = params.to_dict()
    for section, values in resolved.items():
        assert set(raw[section]) == set(values), section


def test_paper_preset_loads_through_the_same_path() -> None:
    params = load_params(REPO / "configs" / "imagenet256.yaml")
    assert params.encoder.arch == "vit_large_patch14_dinov2"
    assert params.encoder.source == "timm:vit_large_patch14_dinov2.lvd142m"
    assert params.data.resolution == 256
    grid = params.encoder.image_size // 14
    assert (params.latent.channels, grid, grid) == (32, 16, 16)


@pytest.mark.parametrize(
    ("raw", "fragments"),
    [
        ({"data": {"resolutoin": 32}}, ["data.resolutoin", "unknown key", "32"]),
        ({"dataa": {}}, ["dataa", "unknown key"]),
        ({"data": {"resolution": "32"}}, ["data.resolution", "'32'", "integer"]),
        ({"data": {"resolution": 32.0}}, ["data.resolution", "32.0"]),
        ({"encoder": {"depth": 0}}, ["encoder.depth", "0", "greater than or equal to 1"]),
        ({"data": {"val_fraction": 1.5}}, ["data.val_fraction", "1.5"]),
        ({"data": {"image_format": "gif"}}, ["data.image_format", "'gif'"]),
        ({"encoder": {"source": "hub:dinov2"}}, ["encoder.source", "'hub:dinov2'", "embedded:"]),
        ({"data": {"source": "folder:/x"}}, ["data.source", "'folder:/x'"]),
        ({"validate": {"max_class_imbalance": 0.5}}, ["validate.max_class_imbalance", "0.5"]),
        ({"validate": {"sample_per_shard": True}}, ["validate.sample_per_shard", "True"]),
    ],
)
def test_bad_values_name_key_and_value(tmp_path: Path, raw: dict, fragments: list[str]) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"encoder": {"depth": -1}, "data": {"seed": "x"}}, "p.yaml")
    assert "encoder.depth" in str(info.value) and "data.seed" in str(info.value)


def test_partial_file_takes_defaults_and_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"resolution": 64}})
    params = load_params(path, {"encoder.depth": 4})
    assert params.data.resolution == 64
    assert params.encoder.depth == 4
    assert params.data.val_fraction == 0.1


def test_config_is_frozen() -> None:
    params = parse_params({})
    with pytest.raises(Exception):
        params.data.resolution = 8  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listed)

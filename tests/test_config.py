from __future__ import annotations

from pathlib import Path

import math
import subprocess
import sys

import pytest
import yaml

from aligntok.config import (
    DIT_PRESET_NAMES, TOKENIZER_STAGES, ConfigError, Params, discriminator_logit_side, load_params, parse_params,
    stage_alias,
)

from support.paths import REPO

NO_GAN = {stage: {"train": ["decoder"], "steps": 1, "losses": {"gan": 0.0}}
          for stage in ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline")}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_and_match_defaults_keys() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.encoder.source == "embedded:dinov2_vits14"
    assert params.data.source == "fashion-mnist-captioned"  # the default run trains the text-to-image branch too
    # params.yaml spells out every key (DVC tracks keys by name).
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    resolved = params.to_dict()
    for section, values in resolved.items():
        assert set(raw[section]) == set(values), section


def test_the_python_defaults_are_params_yaml_by_value() -> None:
    """One set of defaults: `--help`, a preset's omitted keys and a row's identity fallback read the Python
    defaults, which must be the values of the default run's params.yaml, key by key."""
    defaults, repo = Params().to_dict(), load_params(REPO / "params.yaml").to_dict()

    def differences(a: object, b: object, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(a.keys() | b.keys()) for d in differences(a.get(k), b.get(k), f"{key}.{k}")]
        return [] if a == b else [f"{key.lstrip('.')}: Python {a!r}, params.yaml {b!r}"]

    assert differences(defaults, repo, "") == []


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
        # values that used to pass here and fail much later
        ({"data": {"val_fraction": 0.0}}, ["data.val_fraction: 0.0 is invalid", "greater than 0"]),
        ({"dit": {"preset": "DiT-XL/2"}}, ["dit.preset: 'DiT-XL/2' is invalid", "LightningDiT-T/1"]),
        ({"sample": {"cfg_interval": [0.8, 0.2]}}, ["sample.cfg_interval: [0.8, 0.2] is invalid", "t_low < t_high"]),
        ({"sample": {"cfg_interval": [0.5, 0.5]}}, ["sample.cfg_interval: [0.5, 0.5] is invalid"]),
        ({"sample": {"cfg_interval": [-0.1, 0.5]}}, ["sample.cfg_interval: [-0.1, 0.5] is invalid"]),
        ({"sample": {"cfg_interval": [0.1, 0.5, 0.9]}}, ["sample.cfg_interval: [0.1, 0.5, 0.9] is invalid"]),
        ({"train_dit": {"t_mean": math.nan}}, ["train_dit.t_mean: nan is invalid", "finite"]),
        ({"train_dit": {"lr": math.inf}}, ["train_dit.lr: inf is invalid", "finite"]),
        ({"sample": {"cfg_scale": math.inf}}, ["sample.cfg_scale: inf is invalid", "finite"]),
        ({"train_dit": {"betas": [math.nan, 0.9]}}, ["train_dit.betas.0: nan is invalid", "finite"]),
        ({"sample": {"cfg_interval": [0.1, math.nan]}}, ["sample.cfg_interval.1: nan is invalid", "finite"]),
        ({"align_latent": {"train": ["decoder"], "steps": 1, "losses": {"l1": -math.inf}}},
         ["align_latent.losses.l1: -inf is invalid", "finite"]),
        ({"encoder": {"image_size": 100}}, ["encoder.image_size: 100 is invalid", "patch size 14"]),
        ({"encoder": {"source": "timm:vit_base_patch16_224", "image_size": 120}},
         ["encoder.image_size: 120 is invalid", "patch size 16", "vit_base_patch16_224"]),
        ({"encoder": {"source": "file:/w.safetensors", "arch": "vit_base_patch16_224", "image_size": 120}},
         ["encoder.image_size: 120 is invalid", "patch size 16"]),
        ({"data": {"resolution": 64}},
         ["data.resolution: 64 is invalid", "latent grid 8", "upsampling 4", "makes 32"]),
        ({"data": {"resolution": 64}, "tokenizer": {"decoder": {"channel_mult": [1, 2, 2, 2, 2]}}},
         ["data.resolution: 64 is invalid", "upsampling 16", "makes 128"]),
        ({"encoder": {"source": "file:/w.safetensors"}, "data": {"resolution": 30}},
         ["data.resolution: 30 is invalid", "not divisible", "upsampling 4"]),
        ({"tokenizer": {"discriminator": {"layers": 4}}},
         ["tokenizer.discriminator.layers: 4 is invalid", "data.resolution 32", "align_latent"]),
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
    params = load_params(path, {"encoder.depth": 4, "encoder.image_size": 224})  # 16x16 grid x 4 = 64
    assert params.data.resolution == 64
    assert (params.encoder.depth, params.encoder.image_size) == (4, 224)
    assert params.data.val_fraction == 0.1


def test_consistent_values_pass_the_cross_checks() -> None:
    """The checks above refuse only what cannot run: these near misses are fine."""
    parse_params({"sample": {"cfg_interval": [0, 1]}, "dit": {"preset": "LightningDiT-XL/1"}})
    parse_params({"encoder": {"source": "timm:vit_base_patch16_224", "image_size": 128}})  # 8 x 4 = 32
    parse_params({"encoder": {"source": "file:/w.safetensors", "image_size": 100}})  # patch unknown: the stage checks
    parse_params({"tokenizer": {"discriminator": {"layers": 4}}, **NO_GAN})  # no GAN term, no discriminator
    parse_params({"data": {"val_fraction": 1e-6}})


def test_dit_preset_names_are_the_models_presets() -> None:
    from aligntok.diffusion.dit import PRESETS

    assert set(DIT_PRESET_NAMES) == set(PRESETS)


def test_discriminator_logit_side_is_the_discriminators() -> None:
    from aligntok.tokenizer.discriminator import patch_output_side

    for resolution in range(8, 80):
        for layers in range(1, 7):
            assert discriminator_logit_side(resolution, layers) == patch_output_side(resolution, layers)


def test_loading_a_config_imports_no_torch() -> None:
    """`aligntok config`, ingest and validate check the whole file before any heavy import."""
    code = ("import sys; from aligntok.config import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in ('torch', 'timm', 'aligntok.diffusion.dit') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_yaml_nan_and_inf_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f"train_dit:\n  t_std: {text}\n")
    with pytest.raises(ConfigError, match=r"train_dit\.t_std: -?(nan|inf) is invalid: Input should be a finite"):
        load_params(path)


def test_override_inside_a_scalar_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"resolution": 32}})
    with pytest.raises(ConfigError) as info:
        load_params(path, {"data.resolution.x": 1})
    assert str(info.value) == f"{path}: override data.resolution.x=1: data.resolution is 32, not a section"


def test_override_fills_an_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train_dit:\n")  # a section key with no value is None in YAML
    assert load_params(path, {"train_dit.steps": 7}).train_dit.steps == 7


def test_config_is_frozen() -> None:
    params = parse_params({})
    with pytest.raises(Exception):
        params.data.resolution = 8  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(bad)
    assert "\n" not in str(info.value) and "line 1, column 16" in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(listed)


def test_a_stage_row_says_what_makes_its_stage_distinct() -> None:
    params = load_params(REPO / "params.yaml")
    assert TOKENIZER_STAGES == ("align_latent", "align_perceptual", "refine_decoder", "vae_baseline")
    rows = {name: params.stage(name) for name in TOKENIZER_STAGES}
    assert [(r.kind, r.start_from, r.registered_model, stage_alias(n, r)) for n, r in rows.items()] == [
        ("aligned", None, "aligntok-tokenizer", "stage1"),
        ("aligned", "align_latent", "aligntok-tokenizer", "stage2"),
        ("aligned", "align_perceptual", "aligntok-tokenizer", "stage3"),
        ("vae", None, "aligntok-vae-baseline", "baseline")]
    with pytest.raises(ConfigError, match="unknown tokenizer stage 'stage9'; the rows are: align_latent"):
        params.stage("stage9")


def test_a_row_that_omits_its_identity_keeps_the_default_rows() -> None:
    params = parse_params({"align_perceptual": {"train": ["decoder"], "steps": 3},
                           "vae_baseline": {"train": ["decoder"], "steps": 3, "alias": "vanilla"}})
    assert params.align_perceptual.start_from == "align_latent" and params.align_perceptual.alias == "stage2"
    assert params.vae_baseline.kind == "vae" and params.vae_baseline.alias == "vanilla"


@pytest.mark.parametrize(("rows", "fragment"), [
    ({"align_latent": {"start_from": "refine_decoder"}},
     "align_latent.start_from: 'refine_decoder' is invalid: not a tokenizer row before align_latent"),
    ({"refine_decoder": {"start_from": "vae_baseline"}}, "refine_decoder.start_from: 'vae_baseline' is invalid"),
    ({"refine_decoder": {"kind": "vae"}},
     "refine_decoder.start_from: 'align_perceptual' is invalid: its model is aligned, refine_decoder.kind is vae"),
    ({"align_perceptual": {"carry_discriminator": True, "start_from": None}},
     "align_perceptual.carry_discriminator: True is invalid: the stage starts from no other row"),
    ({"align_latent": {"losses": {"gan": 0.0}}, "align_perceptual": {"carry_discriminator": True}},
     "align_perceptual.carry_discriminator: True is invalid: align_latent trains no discriminator"),
    ({"vae_baseline": {"registered_model": "aligntok-tokenizer", "alias": "stage1"}},
     "vae_baseline.alias: 'stage1' is invalid: align_latent already registers aligntok-tokenizer@stage1"),
])
def test_stage_rows_must_chain(rows: dict, fragment: str) -> None:
    raw = {name: {"train": ["decoder"], "steps": 1, **row} for name, row in rows.items()}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("raw", "key"), [({"cache_latents": {"tokenizer": "stage3"}}, "cache_latents.tokenizer"),
                                          ({"evaluate": {"tokenizers": ["align_latent", "x"]}}, "evaluate.tokenizers")])
def test_stages_named_elsewhere_must_be_rows(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: '.*' is invalid: not a tokenizer row"):
        parse_params(raw)

"""Gated promotion against a real MLflow registry (a SQLite file): refusals, promotions, force, rollback, records."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aligntok.cli import main
from aligntok.config import ConfigError, PromoteConfig, parse_params
from aligntok.ops.promote import PromotionError, PromotionRefused, promote, rollback


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import mlflow

    root = tmp_path_factory.mktemp('registry')
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("ALIGNTOK_LOCK_DIR", str(root / "locks"))  # promotion locks: not in the user's cache
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture
def model(registry) -> str:
    name = f"aligntok-tokenizer-{uuid.uuid4().hex[:8]}"
    registry.create_registered_model(name)
    return name


def config_for(model: str) -> PromoteConfig:
    """The default tokenizer rules, under the test's model name."""
    default = PromoteConfig()
    return default.model_copy(update={"models": {model: default.models["aligntok-tokenizer"]}})


def version(registry, model: str, **tags: float) -> str:
    tags_text = {k: f"{v:g}" for k, v in tags.items()}
    return str(registry.create_model_version(model, source="file:///nowhere", tags=tags_text).version)


def champion(registry, model: str, alias: str = "champion") -> str:
    return str(registry.get_model_version_by_alias(model, alias).version)


GOOD = {"eval_rfid": 110.0, "eval_psnr": 23.5, "eval_lp_top1": 0.78, "val_psnr": 23.7, "val_ssim": 0.83}


def test_first_version_becomes_champion_then_a_worse_one_is_refused_by_name(registry, model, capsys) -> None:
    first = version(registry, model, **GOOD)
    decision = promote(model, first, config_for(model))
    assert decision.outcome == "promoted" and champion(registry, model) == first
    assert "first champion" in decision.message

    worse = version(registry, model, **(GOOD | {"eval_rfid": 130.5}))
    with pytest.raises(PromotionRefused) as refused:
        promote(model, worse, config_for(model))
    message = str(refused.value)
    assert "\n" not in message and "eval_rfid 130.5" in message and "by 20.5" in message
    assert "eval_psnr" not in message  # only the metric that is worse is named
    assert champion(registry, model) == first  # nothing moved
    tags = registry.get_model_version(model, worse).tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.against"] == first
    assert json.loads(tags["promotion.metrics"])["eval_rfid"] == {"candidate": 130.5, "champion": 110.0}
    assert "eval_rfid lower (tolerance 2)" in tags["promotion.rule"]


def test_better_within_tolerance_moves_champion_and_keeps_previous_then_rollback_swaps(registry, model) -> None:
    first = version(registry, model, **GOOD)
    promote(model, first, config_for(model))
    # better rFID, PSNR 0.05 dB lower: inside the 0.1 dB tolerance
    better = version(registry, model, **(GOOD | {"eval_rfid": 100.0, "eval_psnr": 23.45}))
    decision = promote(model, f"{better}", config_for(model), reason="nightly")
    assert decision.outcome == "promoted" and decision.rule_set == "evaluation"
    assert champion(registry, model) == better and champion(registry, model, "previous") == first
    tags = registry.get_model_version(model, better).tags
    assert tags["promotion.reason"] == "nightly" and tags["promotion.at"].endswith("+00:00")
    assert registry.get_model_version(model, first).tags["promotion.superseded_by"] == better

    back = rollback(model, config_for(model), reason="bad samples")
    assert back.outcome == "rollback" and champion(registry, model) == first
    assert champion(registry, model, "previous") == better
    assert registry.get_model_version(model, first).tags["promotion.reason"] == "bad samples"
    rollback(model, config_for(model))  # a second rollback undoes the first
    assert champion(registry, model) == better


def test_promoting_the_champion_again_changes_nothing(registry, model) -> None:
    first = version(registry, model, **GOOD)
    promote(model, first, config_for(model))
    history = registry.get_model_version(model, first).tags["promotion.history"]
    again = promote(model, "@champion", config_for(model))
    assert again.outcome == "unchanged"
    assert registry.get_model_version(model, first).tags["promotion.history"] == history
    with pytest.raises(Exception):  # no @previous was created by the no-op
        registry.get_model_version_by_alias(model, "previous")


def test_no_metrics_is_refused_unless_forced_and_force_is_recorded(registry, model) -> None:
    bare = version(registry, model)
    with pytest.raises(PromotionRefused, match="has no tag eval_rfid.*has no tag val_psnr"):
        promote(model, bare, config_for(model))
    with pytest.raises(PromotionError, match="no @champion version"):
        rollback(model, config_for(model))
    forced = promote(model, bare, config_for(model), force=True, reason="hotfix")
    assert forced.outcome == "forced" and champion(registry, model) == bare
    tags = registry.get_model_version(model, bare).tags
    assert tags["promotion.decision"] == "forced" and tags["promotion.reason"] == "hotfix"
    assert [entry["decision"] for entry in json.loads(tags["promotion.history"])] == ["refused", "forced"]


def test_validation_figures_decide_while_the_champion_has_no_evaluation(registry, model) -> None:
    old = version(registry, model, val_psnr=22.0, val_ssim=0.80)  # registered, never evaluated
    promote(model, old, config_for(model))
    new = version(registry, model, **GOOD)
    decision = promote(model, new, config_for(model))
    assert decision.rule_set == "validation" and {c.metric for c in decision.comparisons} == {"val_psnr", "val_ssim"}
    worse = version(registry, model, val_psnr=23.7, val_ssim=0.70)  # not evaluated: the validation rules decide
    with pytest.raises(PromotionRefused, match=r"val_ssim 0.7 is worse than the champion's 0.83 by 0.13"):
        promote(model, worse, config_for(model))


def test_bad_references_name_what_is_missing(registry, model) -> None:
    with pytest.raises(PromotionError, match="no version 42"):
        promote(model, "42", config_for(model))
    with pytest.raises(PromotionError, match="no version has the alias @stage9"):
        promote(model, "@stage9", config_for(model))
    with pytest.raises(PromotionError, match="'latest-ish' is not a version"):
        promote(model, "latest-ish", config_for(model))
    with pytest.raises(PromotionError, match="no-such-model: no such registered model"):
        promote("no-such-model", "1", config_for(model))
    first = version(registry, model, **GOOD)
    with pytest.raises(PromotionError, match="no promotion rules"):
        promote(model, first, PromoteConfig())


def test_cli_refusal_exits_1_with_one_line_and_promotion_exits_0(registry, model, tmp_path: Path, capsys) -> None:
    params = tmp_path / "params.yaml"
    rules = config_for(model).model_dump(mode="json")
    rules["pipeline_candidates"] = []
    import yaml

    params.write_text(yaml.safe_dump({"promote": rules}))
    first = version(registry, model, **GOOD)
    assert main(["--params", str(params), "promote", model, first]) == 0
    assert "promoted to @champion" in capsys.readouterr().out
    worse = version(registry, model, **(GOOD | {"eval_lp_top1": 0.70}))
    assert main(["--params", str(params), "promote", model, worse]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("aligntok promote: error:") and "eval_lp_top1 0.7" in err
    assert main(["--params", str(params), "promote", model, worse, "--force", "--reason", "demo"]) == 0
    assert main(["--params", str(params), "rollback", model]) == 0
    assert champion(registry, model) == first


def test_promote_section_is_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="promote.pipeline_candidates: 'refine_decodr' is invalid"):
        parse_params({"promote": {"pipeline_candidates": ["refine_decodr"]}})
    rule = {"metric": "eval_rfid", "better": "lower"}
    with pytest.raises(ConfigError, match="'eval_rfid' is invalid: named twice"):
        parse_params({"promote": {"models": {"aligntok-tokenizer": {"evaluation": [rule, rule]}}}})
    with pytest.raises(ConfigError, match="better"):
        parse_params({"promote": {"models": {"m": {"evaluation": [{"metric": "x", "better": "up"}]}}}})
    with pytest.raises(ConfigError, match="same as promote.champion_alias"):
        parse_params({"promote": {"previous_alias": "champion"}})

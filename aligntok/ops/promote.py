"""Metric-gated promotion in the MLflow model registry: `@champion` moves only to a better (or not worse) version.

The figures are model-version tags: `eval_*` written by the `evaluate` stage, `val_*` written by the training
stage at registration. `params.yaml` (`promote:`) names, per registered model, the tags compared, which
direction is better and how much worse a candidate may be (an absolute tolerance). Two rule sets are tried in
order, `evaluation` then `validation`; the first that both the candidate and the champion carry decides.

- A candidate without the figures of any rule set is refused (`--force` overrides, and says so in the tags).
- The first version of a model becomes champion when there is none.
- The champion it replaces keeps the alias `previous`; `rollback` swaps the two back.
- Every decision is written on the candidate as `promotion.*` tags (when, outcome, rule, figures, reason), and
  appended to its `promotion.history`. Promoting the current champion again changes nothing.

Promotions and rollbacks of one model are serialised: each reads `@champion` and then moves `@previous` and
`@champion` (two alias moves, not a transaction), so each holds a lock (`aligntok.locks.file_lock`) from that
read to its last tag. The lock is a file in `$ALIGNTOK_LOCK_DIR` (default `~/.cache/aligntok/locks`, under
`$XDG_CACHE_HOME` when set) named from a hash of the registry URI and the model, so it serialises promotions on
one host, or on hosts that share that folder (on a file system whose flocks they share); promotions from hosts
that do not share it are not serialised. A promotion waits up to `lock_timeout` seconds (default 600) for
another one, then fails with one line naming the holder.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aligntok.config import PromoteConfig, PromoteRule
from aligntok.errors import AligntokError
from aligntok.locks import LockBusy, file_lock

log = logging.getLogger(__name__)

HISTORY_LIMIT = 4000
"""Characters of `promotion.history` kept (MLflow caps a tag value at 5,000)."""
LOCK_DIR_ENV = "ALIGNTOK_LOCK_DIR"
"""The folder of the promotion locks (default: `aligntok/locks` in the user's cache folder)."""
LOCK_TIMEOUT = 600.0
"""Seconds a promotion waits for another promotion of the same model before failing."""


class PromotionError(AligntokError):
    """The request cannot be decided: unknown model, version or alias, no rules, nothing to roll back to."""


class PromotionRefused(AligntokError):
    """The gate said no; the message is one line naming each metric that is worse and by how much."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


@dataclass(frozen=True)
class Comparison:
    metric: str
    better: str
    tolerance: float
    candidate: float
    champion: float

    @property
    def worse_by(self) -> float:
        """How much worse the candidate is (negative: better)."""
        return self.champion - self.candidate if self.better == "higher" else self.candidate - self.champion

    @property
    def passes(self) -> bool:
        return self.worse_by <= self.tolerance

    def describe(self) -> str:
        return (f"{self.metric} {self.candidate:.6g} is worse than the champion's {self.champion:.6g} by "
                f"{self.worse_by:.4g} (tolerance {self.tolerance:g}, {self.better} is better)")


@dataclass(frozen=True)
class Decision:
    model: str
    version: str
    outcome: str
    """promoted | forced | refused | unchanged | rollback"""
    message: str
    champion_before: str | None = None
    rule_set: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["comparisons"] = [asdict(c) | {"worse_by": c.worse_by, "passes": c.passes} for c in self.comparisons]
        return out


def promote(model: str, ref: str, config: PromoteConfig, *, force: bool = False, reason: str | None = None,
            mlflow_client: Any = None, lock_timeout: float = LOCK_TIMEOUT) -> Decision:
    """Move `config.champion_alias` of `model` to `ref` (a version number or `@alias`) if the gate allows.

    Returns the decision (promoted, forced or unchanged); raises `PromotionRefused` after recording a refusal,
    `PromotionError` when the request names something that does not exist, or when another promotion of `model`
    holds the registry for more than `lock_timeout` seconds."""
    client = mlflow_client or _client()
    with promotion_lock(client, model, f"promote {model} {ref}", lock_timeout):
        return _promote(client, model, str(ref), config, force, reason)


def _promote(client: Any, model: str, ref: str, config: PromoteConfig, force: bool, reason: str | None) -> Decision:
    candidate = _resolve(client, model, ref)
    champion = _alias_version(client, model, config.champion_alias)
    if champion is not None and str(champion.version) == str(candidate.version):
        return Decision(model, str(candidate.version), "unchanged",
                        f"{model} v{candidate.version} is already @{config.champion_alias}; nothing changed",
                        champion_before=str(candidate.version), reason=reason)
    rules = config.models.get(model)
    if rules is None and not force:
        raise PromotionError(f"{model}: no promotion rules in params.yaml promote.models "
                             f"(rules exist for: {', '.join(config.models) or 'none'}); add them or use --force")
    rule_set, comparisons, missing = _compare(rules, candidate, champion) if rules else (None, [], "no rules")
    failed = [c for c in comparisons if not c.passes]
    before = str(champion.version) if champion is not None else None
    if missing or failed:
        problem = (f"{model} v{candidate.version} refused: " +
                   ("; ".join(c.describe() for c in failed) if failed else missing))
        if not force:
            decision = Decision(model, str(candidate.version), "refused", problem, before, rule_set, comparisons, reason)
            _record(client, decision, config)
            raise PromotionRefused(decision)
        outcome, message = "forced", f"{model} v{candidate.version} forced to @{config.champion_alias} ({problem})"
    else:
        outcome = "promoted"
        message = (f"{model} v{candidate.version} promoted to @{config.champion_alias}" +
                   (f" (was v{before}, now @{config.previous_alias}; {rule_set} rules passed)" if before
                    else " (first champion of the model)"))
    if champion is not None:
        client.set_registered_model_alias(model, config.previous_alias, champion.version)
    client.set_registered_model_alias(model, config.champion_alias, candidate.version)
    decision = Decision(model, str(candidate.version), outcome, message, before, rule_set, comparisons, reason)
    _record(client, decision, config)
    if champion is not None:
        client.set_model_version_tag(model, champion.version, "promotion.superseded_by", str(candidate.version))
    return decision


def rollback(model: str, config: PromoteConfig, *, reason: str | None = None, mlflow_client: Any = None,
             lock_timeout: float = LOCK_TIMEOUT) -> Decision:
    """Swap `@champion` and `@previous` of `model` (a second rollback swaps them back), under the promotion lock."""
    client = mlflow_client or _client()
    with promotion_lock(client, model, f"rollback {model}", lock_timeout):
        return _rollback(client, model, config, reason)


def _rollback(client: Any, model: str, config: PromoteConfig, reason: str | None) -> Decision:
    _registered(client, model)
    champion = _alias_version(client, model, config.champion_alias)
    previous = _alias_version(client, model, config.previous_alias)
    if champion is None or previous is None:
        missing = config.champion_alias if champion is None else config.previous_alias
        raise PromotionError(f"{model}: no @{missing} version, so there is nothing to roll back to")
    client.set_registered_model_alias(model, config.champion_alias, previous.version)
    client.set_registered_model_alias(model, config.previous_alias, champion.version)
    decision = Decision(model, str(previous.version), "rollback",
                        f"{model}: @{config.champion_alias} rolled back from v{champion.version} to v{previous.version} "
                        f"(v{champion.version} is now @{config.previous_alias})", str(champion.version), reason=reason)
    _record(client, decision, config)
    client.set_model_version_tag(model, champion.version, "promotion.superseded_by", str(previous.version))
    return decision


def lock_dir() -> Path:
    """`$ALIGNTOK_LOCK_DIR`, else `aligntok/locks` in the user's cache folder (`$XDG_CACHE_HOME` or ~/.cache)."""
    if configured := os.environ.get(LOCK_DIR_ENV):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligntok" / "locks"


def lock_path(registry_uri: str, model: str) -> Path:
    """The lock file of `model`'s promotions in the registry at `registry_uri`."""
    digest = hashlib.sha256(f"{registry_uri}\n{model}".encode()).hexdigest()[:24]
    return lock_dir() / f"promote-{digest}.lock"


@contextmanager
def promotion_lock(client: Any, model: str, action: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock of `model`'s promotions in `client`'s registry; wait up to `timeout` s for another holder,
    then raise `PromotionError` naming it."""
    uri = str(getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", None) or _tracking_uri())
    path = lock_path(uri, model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PromotionError(f"{path.parent}: cannot create the promotion lock folder ({exc.strerror or exc}); "
                             f"set {LOCK_DIR_ENV} to a writable folder") from None
    holder = (f"{action}: pid {os.getpid()} on {socket.gethostname()} ({getpass.getuser()}), "
              f"since {datetime.now(UTC).isoformat(timespec='seconds')}")

    def waiting(other: str) -> None:
        log.info("%s: waiting up to %g s for another promotion of %s (%s)", path, timeout, model, other)

    with ExitStack() as held:
        try:
            held.enter_context(file_lock(path, holder=holder, what=f"promotions of {model} at {uri}",
                                         timeout=timeout, on_wait=waiting))
        except LockBusy as exc:
            raise PromotionError(f"{model}: another promotion holds the registry ({exc.holder}); gave up after "
                                 f"waiting {timeout:g} s (lock {path})") from None
        yield


def _client() -> Any:
    from aligntok.ops.tracking import client

    return client()


def _tracking_uri() -> str:
    from aligntok.ops.tracking import tracking_uri

    return tracking_uri()


def _registered(client: Any, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            names = sorted(m.name for m in client.search_registered_models())
            raise PromotionError(f"{model}: no such registered model (the registry has: "
                                 f"{', '.join(names) or 'none'})") from None
        raise


def _resolve(client: Any, model: str, ref: str) -> Any:
    """The model version `ref` names: `7` or `@alias`."""
    from mlflow.exceptions import MlflowException

    _registered(client, model)
    if ref.startswith("@"):
        found = _alias_version(client, model, ref[1:])
        if found is None:
            raise PromotionError(f"{model}: no version has the alias {ref}")
    elif ref.isdigit():
        try:
            found = client.get_model_version(model, ref)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                raise
            raise PromotionError(f"{model}: no version {ref}") from None
    else:
        raise PromotionError(f"{ref!r} is not a version: give a number (7) or an alias (@stage3)")
    if found.status != "READY":
        raise PromotionError(f"{model} v{found.version} is {found.status}, not READY: its registration did not finish")
    return found


def _alias_version(client: Any, model: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "INVALID_PARAMETER_VALUE" in str(exc.error_code):
            return None
        raise


def _figures(version: Any, rules: list[PromoteRule]) -> dict[str, float] | str:
    """The version's value of each rule's tag, or a sentence naming the first tag it lacks or cannot read."""
    values = {}
    for rule in rules:
        raw = version.tags.get(rule.metric)
        if raw is None:
            return f"v{version.version} has no tag {rule.metric}"
        try:
            values[rule.metric] = float(raw)
        except ValueError:
            return f"v{version.version} tag {rule.metric}={raw!r} is not a number"
    return values


def _compare(rules: Any, candidate: Any, champion: Any | None) -> tuple[str | None, list[Comparison], str | None]:
    """(rule set used, comparisons, why nothing could be compared or None)."""
    reasons = []
    for kind in ("evaluation", "validation"):
        ruleset: list[PromoteRule] = getattr(rules, kind)
        if not ruleset:
            continue
        mine = _figures(candidate, ruleset)
        if isinstance(mine, str):
            reasons.append(f"{kind}: {mine}")
            continue
        if champion is None:
            return kind, [], None
        theirs = _figures(champion, ruleset)
        if isinstance(theirs, str):
            reasons.append(f"{kind}: champion {theirs}")
            continue
        return kind, [Comparison(r.metric, r.better, r.tolerance, mine[r.metric], theirs[r.metric])
                      for r in ruleset], None
    return None, [], "no rule set can compare them (" + "; ".join(reasons) + "); run `dvc repro evaluate` first"


def _record(client: Any, decision: Decision, config: PromoteConfig) -> None:
    """The decision as tags on its version, plus one entry in the version's `promotion.history`."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    rules = config.models.get(decision.model)
    rule_text = "; ".join(f"{r.metric} {r.better} (tolerance {r.tolerance:g})"
                          for r in getattr(rules, decision.rule_set)) if rules and decision.rule_set else ""
    tags = {
        "promotion.decision": decision.outcome,
        "promotion.at": now,
        "promotion.by": f"{getpass.getuser()}@{socket.gethostname()}",
        "promotion.rule": rule_text or ("none: forced" if decision.outcome == "forced" else "-"),
        "promotion.metrics": json.dumps({c.metric: {"candidate": c.candidate, "champion": c.champion}
                                         for c in decision.comparisons}),
        "promotion.against": decision.champion_before or "-",
        "promotion.reason": decision.reason or "-",
        "promotion.message": decision.message[:4900],
    }
    for key, value in tags.items():
        client.set_model_version_tag(decision.model, decision.version, key, value)
    version = client.get_model_version(decision.model, decision.version)
    history = json.loads(version.tags.get("promotion.history", "[]"))
    history.append({"at": now, "decision": decision.outcome, "against": decision.champion_before,
                    "reason": decision.reason})
    while len(json.dumps(history)) > HISTORY_LIMIT and len(history) > 1:
        history.pop(0)
    client.set_model_version_tag(decision.model, decision.version, "promotion.history", json.dumps(history))

"""Where a registered model version came from, in the registry itself, and how to check its inputs out again.

Every registration and every tagging rewrites a version's description in the registry (what it is, its figures,
how to load it, where it came from: `aligntok.ops.model_card.version_description`, written by
`aligntok.ops.tracking.describe_version`; registered models get `MODEL_DESCRIPTIONS`). A pipeline flow run ends (flows/pipeline.py) with `record_run`:
every version the run registered, and the run's MLflow parent run, get the `aligntok.*` tags of `RunRecord` (the run commit
and branch, the git remote, the source fingerprint, the code commit, the deployment and flow run).

The MLflow calls themselves live in aligntok.ops.tracking and what a version's description says in
aligntok.ops.model_card; this module tags the versions a run made and reads their lineage back.

`lineage("aligntok-tokenizer@champion")` reads them back (`aligntok lineage`): the version, its runs, the
commits, and the commands that reproduce its inputs in a fresh clone (`git checkout`, `dvc pull`, a no-op
`dvc repro`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aligntok.ops.model_card import (CODE_COMMIT, DEPLOYMENT, FLOW_RUN, GIT_REMOTE, PIPELINE_RUN, RUN_BRANCH, RUN_COMMIT,
                                 SOURCE, figures)
from aligntok.ops.tracking import LineageError, model_version, set_run_tags, tag_model_version, tracking_uri

__all__ = ["LineageError", "RunRecord", "lineage", "parse_ref", "record_run"]

@dataclass(frozen=True)
class RunRecord:
    """What one pipeline flow run produced and where its result lives."""

    run_commit: str
    run_branch: str
    code_commit: str
    git_remote: str | None
    source_fingerprint: str | None
    deployment: str
    flow_run: str
    pipeline_run_id: str | None

    def tags(self) -> dict[str, str]:
        values = {RUN_COMMIT: self.run_commit, RUN_BRANCH: self.run_branch, CODE_COMMIT: self.code_commit,
                  GIT_REMOTE: self.git_remote, SOURCE: self.source_fingerprint, DEPLOYMENT: self.deployment,
                  FLOW_RUN: self.flow_run, PIPELINE_RUN: self.pipeline_run_id}
        return {key: value for key, value in values.items() if value}


def record_run(record: RunRecord, versions: list[tuple[str, str]]) -> None:
    """Tag the run's versions and parent run with `record`, and refresh those versions' descriptions."""
    tags = record.tags()
    if record.pipeline_run_id:
        set_run_tags(record.pipeline_run_id, tags)
    for model, number in versions:
        tag_model_version(model, number, tags)  # (which rewrites the description)


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name@alias`, `name/version` or `name:version` (with or without `models:/`) -> (name, alias, version)."""
    found = re.match(r"^(?:models:/)?([^@/:]+)(?:@([A-Za-z0-9_-]+)|[/:](\d+))$", ref.strip())
    if not found:
        raise LineageError(f"{ref!r}: name a version as MODEL@ALIAS or MODEL/VERSION (e.g. aligntok-tokenizer@champion)")
    return found.group(1), found.group(2), found.group(3)


def lineage(ref: str) -> str:
    """Where the version `ref` names came from, and the commands that check its inputs out again."""
    name, alias, number = parse_ref(ref)
    version, run = model_version(name, alias=alias, number=number)
    tags = dict(version.tags)
    model = version.name
    aliases = sorted(getattr(version, "aliases", []) or [])
    lines = [f"{model} v{version.version}" + (f" ({', '.join('@' + a for a in aliases)})" if aliases else ""),
             f"  registry       {tracking_uri()}",
             f"  model files    {version.source}"]
    if run is not None:
        parent = run.data.tags.get("mlflow.parentRunId")
        lines.append(f"  MLflow run     {run.info.run_id} (stage {run.data.tags.get('stage', '?')})"
                     + (f", pipeline run {parent}" if parent else ""))
    shown = figures(tags)
    if shown:
        lines.append("  figures        " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    if tags.get("promotion.decision"):
        lines.append(f"  promotion      {tags['promotion.decision']}: {tags.get('promotion.message', '')}".rstrip(": "))
    commit = tags.get(RUN_COMMIT)
    if not commit:
        code = tags.get("git_commit") or (run.data.tags.get("git_commit") if run is not None else None) or "unknown"
        lines += [f"  code commit    {code}",
                  "  run commit     none: registered outside a pipeline flow run, so no commit records the dvc.lock",
                  "                 that made it; the code commit's dvc.lock may describe other outputs."]
        return "\n".join(lines) + "\n"
    remote = tags.get(GIT_REMOTE)
    lines += [f"  run commit     {commit} on branch {tags.get(RUN_BRANCH, '?')}"
              + (f" ({tags[DEPLOYMENT]}, flow run {tags.get(FLOW_RUN, '?')})" if tags.get(DEPLOYMENT) else ""),
              f"  code commit    {tags.get(CODE_COMMIT, '?')}",
              f"  source         fingerprint {tags.get(SOURCE, 'not recorded')} (data/source.json, sha256)",
              "",
              "Check its inputs out again (the run commit holds params.yaml and dvc.lock; the DVC remote the outputs):"]
    lines += ([f"  git clone {remote} aligntok-{version.version} && cd aligntok-{version.version}"] if remote else
              ["  cd <a clone of the repository that holds the run branch>"])
    lines += [f"  git checkout {commit}",
              "  dvc pull        # outputs from the DVC remote (configure its credentials in .dvc/config.local)",
              "  dvc repro       # a no-op: only `snapshot` reruns, and finds the source unchanged"]
    return "\n".join(lines) + "\n"

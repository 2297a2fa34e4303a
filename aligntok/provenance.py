"""Where a registered model version came from, in the registry itself, and how to check its inputs out again.

Every registration and every tagging rewrites a version's description in the registry (what it is, its figures,
how to load it, where it came from: `version_description`, written by `aligntok.tracking.describe_version`;
registered models get `MODEL_DESCRIPTIONS`). A pipeline flow run ends (flows/pipeline.py) with `record_run`:
every version the run registered, and the run's MLflow parent run, get the `aligntok.*` tags of `RunRecord` (the run commit
and branch, the git remote, the source fingerprint, the code commit, the deployment and flow run).

The MLflow calls themselves live in aligntok.tracking; this module decides what they say.

`lineage("aligntok-tokenizer@champion")` reads them back (`aligntok lineage`): the version, its runs, the
commits, and the commands that reproduce its inputs in a fresh clone (`git checkout`, `dvc pull`, a no-op
`dvc repro`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aligntok.errors import AligntokError

RUN_COMMIT, RUN_BRANCH, GIT_REMOTE = "aligntok.run_commit", "aligntok.run_branch", "aligntok.git_remote"
SOURCE, CODE_COMMIT = "aligntok.source_fingerprint", "aligntok.code_commit"
DEPLOYMENT, FLOW_RUN, PIPELINE_RUN = "aligntok.deployment", "aligntok.flow_run", "aligntok.pipeline_run_id"

MODEL_DESCRIPTIONS = {
    "aligntok-tokenizer": "Image tokenizer: a frozen DINOv2 encoder with a small adapter to a compact latent, and a "
                          "pixel decoder (stages align_latent, align_perceptual, refine_decoder of "
                          "arXiv 2509.25162). pyfunc ops: encode (uint8 images -> latents), decode.",
    "aligntok-vae-baseline": "Baseline: a VA-VAE-style convolutional VAE trained from scratch, the tokenizer the "
                             "aligned ones are compared with. pyfunc ops: encode, decode.",
    "aligntok-dit": "Class-conditional LightningDiT trained with flow matching on the tokenizer's latents; carries its "
                    "tokenizer and latent statistics. pyfunc op: sample (class labels -> images).",
    "aligntok-t2i": "Text-to-image FLUX-style DiT (double- then single-stream blocks) trained with flow matching on a "
                    "tokenizer's latents, conditioned on a frozen text encoder; one version per tokenizer "
                    "(alias = the tokenizer stage). pyfunc op: prompts -> images.",
}
"""The registry's description of each registered model (shown in the MLflow UI)."""


class LineageError(AligntokError):
    """A model reference names no version of the registry."""


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


def _figures(tags: dict[str, str]) -> dict[str, str]:
    """The version's headline figures: validation and evaluation tags, per-step ones left out."""
    return {k: v for k, v in sorted(tags.items()) if re.match(r"^(val|eval)_(?!step|run_id)", k)}


def version_description(model: str, version: Any, alias_names: list[str]) -> str:
    """The registry description of one version (markdown): what, figures, how to load, where from."""
    tags = dict(version.tags)
    lines = [MODEL_DESCRIPTIONS.get(model, model), ""]
    stage = tags.get("stage")
    lines.append(f"Version {version.version}" + (f", trained by stage `{stage}`" if stage else "")
                 + (f", aliases {', '.join('@' + a for a in alias_names)}" if alias_names else "") + ".")
    figures = _figures(tags)
    if figures:
        lines += ["", "Figures: " + ", ".join(f"{k} {v}" for k, v in figures.items()) + "."]
    lines += ["", f"Load: `mlflow.pyfunc.load_model(\"models:/{model}/{version.version}\")`"
              + (f" or `models:/{model}@{alias_names[0]}`" if alias_names else "") + "."]
    if tags.get(RUN_COMMIT):
        lines += ["", f"From pipeline run commit {tags[RUN_COMMIT]} (branch {tags.get(RUN_BRANCH, '?')}"
                  + (f" of {tags[GIT_REMOTE]}" if tags.get(GIT_REMOTE) else "") + f"), code {tags.get(CODE_COMMIT, '?')}"
                  + (f", source fingerprint {tags[SOURCE][:16]}" if tags.get(SOURCE) else "")
                  + f". `aligntok lineage {model}/{version.version}` prints how to check its inputs out."]
    return "\n".join(lines)


def record_run(record: RunRecord, versions: list[tuple[str, str]]) -> None:
    """Tag the run's versions and parent run with `record`, and refresh those versions' descriptions."""
    from aligntok.tracking import set_run_tags, tag_model_version

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
    from aligntok.tracking import model_version, tracking_uri

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
    figures = _figures(tags)
    if figures:
        lines.append("  figures        " + ", ".join(f"{k} {v}" for k, v in figures.items()))
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

"""What the model registry says about a version: the `aligntok.*` tag names a pipeline run sets, each registered
model's description, and the description of one version (what it is, its figures, how to load it, where it came
from). Pure text: aligntok.ops.tracking writes it, aligntok.ops.provenance sets the tags it reads."""

from __future__ import annotations

import re
from typing import Any

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


def figures(tags: dict[str, str]) -> dict[str, str]:
    """The version's headline figures: validation and evaluation tags, per-step ones left out."""
    return {k: v for k, v in sorted(tags.items()) if re.match(r"^(val|eval)_(?!step|run_id)", k)}


def version_description(model: str, version: Any, alias_names: list[str]) -> str:
    """The registry description of one version (markdown): what, figures, how to load, where from."""
    tags = dict(version.tags)
    lines = [MODEL_DESCRIPTIONS.get(model, model), ""]
    stage = tags.get("stage")
    lines.append(f"Version {version.version}" + (f", trained by stage `{stage}`" if stage else "")
                 + (f", aliases {', '.join('@' + a for a in alias_names)}" if alias_names else "") + ".")
    shown = figures(tags)
    if shown:
        lines += ["", "Figures: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + "."]
    lines += ["", f"Load: `mlflow.pyfunc.load_model(\"models:/{model}/{version.version}\")`"
              + (f" or `models:/{model}@{alias_names[0]}`" if alias_names else "") + "."]
    if tags.get(RUN_COMMIT):
        lines += ["", f"From pipeline run commit {tags[RUN_COMMIT]} (branch {tags.get(RUN_BRANCH, '?')}"
                  + (f" of {tags[GIT_REMOTE]}" if tags.get(GIT_REMOTE) else "") + f"), code {tags.get(CODE_COMMIT, '?')}"
                  + (f", source fingerprint {tags[SOURCE][:16]}" if tags.get(SOURCE) else "")
                  + f". `aligntok lineage {model}/{version.version}` prints how to check its inputs out."]
    return "\n".join(lines)

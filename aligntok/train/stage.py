"""What every training stage (the tokenizer rows and `train_dit`) does around the loop, written once.

    with training_stage("align_latent", inputs, checkpoints, place, tracked) as stage:
        run_loop(..., checkpoint=stage.checkpoint, sidecar=stage.sidecar, place=place)
        ...  # rank 0: save, register through stage.run

- **Fingerprint**: a digest of what the checkpoint was trained from (the stage's params, its input files, the
  code it runs). It leaves out the world size and every `runtime:` switch, since batches are a pure function of
  (seed, step): a run stopped at 2 processes resumes at 1 or 8 from the same step.
- **Checkpoint folder**: `checkpoints/<stage>/<fingerprint>.safetensors`; rank 0 sets other fingerprints'
  checkpoints aside (`clean_checkpoint_folder`) before anyone reads, and with `ALIGNTOK_RETRAIN=1`
  (`checkpoint.RETRAIN_ENV`, set by the pipeline flow for a forced stage) this fingerprint's too
  (`set_aside_for_retraining`), so the stage trains from step 0 instead of resuming.
- **Tracking**: rank 0 alone opens the MLflow run (the one the checkpoint's sidecar names when resuming), and
  it is marked FAILED when the stage raises, FINISHED when it returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligntok.distributed import Placement
from aligntok.train.checkpoint import clean_checkpoint_folder, retrain_requested, set_aside_for_retraining


def fingerprint(inputs: dict[str, Any]) -> str:
    """16 hex digits of sha256 over `inputs` (JSON, keys sorted): equal inputs, equal fingerprint."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainingStage:
    name: str
    key: str
    """The fingerprint."""
    checkpoint: Path
    place: Placement
    run: Any | None = None
    """The stage's `aligntok.ops.tracking.StageRun` on rank 0 when it registers, else None."""

    def sidecar(self) -> dict[str, Any]:
        """What every checkpoint's JSON sidecar records besides the step: the run to resume logging into."""
        return {"mlflow_run_id": self.run.run_id if self.run is not None else None, "fingerprint": self.key}


@contextmanager
def training_stage(name: str, inputs: dict[str, Any], checkpoints: Path, place: Placement,
                   tracked: dict[str, Any] | None) -> Iterator[TrainingStage]:
    """The scaffold of stage `name`: fingerprint of `inputs`, its checkpoint path under `checkpoints`, the folder
    tidied (rank 0, then a barrier; with `RETRAIN_ENV` set, the checkpoint itself set aside), and with `tracked`
    (the params to log; None: no tracking) an MLflow run on rank 0 that ends FINISHED or FAILED with the stage."""
    key = fingerprint(inputs)
    checkpoint = Path(checkpoints) / name / f"{key}.safetensors"
    retrain = retrain_requested()
    if place.is_main:
        clean_checkpoint_folder(checkpoint)
        if retrain:
            set_aside_for_retraining(checkpoint, name)
    place.barrier()  # nobody reads the folder while rank 0 tidies it
    stage = TrainingStage(name=name, key=key, checkpoint=checkpoint, place=place)
    if tracked is not None and place.is_main:
        from aligntok.ops.tracking import StageRun

        stage.run = StageRun.for_checkpoint(name, tracked, checkpoint)
    try:
        yield stage
    except BaseException:
        if stage.run is not None:
            stage.run.finish("FAILED")
        raise
    if stage.run is not None:
        stage.run.finish()

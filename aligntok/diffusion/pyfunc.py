"""MLflow pyfunc model "from code" over a DiT folder (safetensors + JSON; nothing pickled).

`predict({"labels": [..], "steps": 50, "cfg_scale": 4.0, "seed": 0})` -> images (B, 3, R, R)
float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class DiTModel(PythonModel):
    def load_context(self, context):
        from aligntok.diffusion.api import DiffusionModel, assemble_folder

        self.model = DiffusionModel.load(assemble_folder(Path(context.artifacts["weights"]).parent))

    def predict(self, context, model_input, params=None):  # untyped: MLflow would infer a schema from hints
        def scalar(key, default):
            value = model_input.get(key, default)
            return value.item() if hasattr(value, "item") else value

        labels = np.asarray(model_input["labels"]).reshape(-1).tolist()
        images = self.model.generate(labels, steps=scalar("steps", None), cfg_scale=scalar("cfg_scale", None),
                                     seed=int(scalar("seed", 0)))
        return images.numpy()


mlflow.models.set_model(DiTModel())

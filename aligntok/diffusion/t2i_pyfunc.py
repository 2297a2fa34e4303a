"""MLflow pyfunc model "from code" over a text-to-image model folder (safetensors + JSON; nothing pickled).

`predict({"prompts": ["a red sandal", ...], "steps": 25, "cfg_scale": 4.0, "seed": 0})` -> images (B, 3, R, R)
float32 in [0, 1]. The frozen text encoder is the one the model was trained with (checked by sha256).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TextToImagePyfunc(PythonModel):
    def load_context(self, context):
        from aligntok.diffusion.t2i_api import TextToImageModel, assemble_folder

        self.model = TextToImageModel.load(assemble_folder(Path(context.artifacts["weights"]).parent))

    def predict(self, context, model_input, params=None):  # untyped: MLflow would infer a schema from hints
        def scalar(key, default):
            value = model_input.get(key, default)
            return value.item() if hasattr(value, "item") else value

        prompts = [str(p) for p in np.asarray(model_input["prompts"], dtype=object).reshape(-1).tolist()]
        images = self.model.generate(prompts, steps=scalar("steps", None), cfg_scale=scalar("cfg_scale", None),
                                     seed=int(scalar("seed", 0)))
        return images.numpy()


mlflow.models.set_model(TextToImagePyfunc())

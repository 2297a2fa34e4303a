"""MLflow pyfunc model "from code" over a tokenizer folder (safetensors + JSON; nothing pickled).

`predict` takes a dict:
- `{"op": "encode", "images": array}`: images (B, 3, H, W) float in [0, 1] or (B, H, W, 3) uint8
  -> latents (B, C, h, w) float32;
- `{"op": "decode", "latents": array}`: latents (B, C, h, w) -> images (B, 3, R, R) float32 in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


def _images(array: Any) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(array))
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    return images.float()


class TokenizerModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from aligntok.tokenizer.api import Tokenizer

        self.tokenizer = Tokenizer.load(Path(context.artifacts["weights"]).parent)

    def predict(self, context, model_input, params=None):  # untyped: MLflow would infer a schema from hints
        op = model_input.get("op") if isinstance(model_input, dict) else None
        op = op.item() if hasattr(op, "item") else op
        if op == "encode":
            return self.tokenizer.encode(_images(model_input["images"])).numpy()
        if op == "decode":
            latents = torch.as_tensor(np.asarray(model_input["latents"])).float()
            return self.tokenizer.decode(latents).numpy()
        raise ValueError(f"predict expects {{'op': 'encode'|'decode', ...}}, got op={op!r}")


mlflow.models.set_model(TokenizerModel())

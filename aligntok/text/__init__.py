"""Frozen text encoders for text-to-image models: `load_text_encoder(source, max_length, device).encode(texts)`
-> `TextFeatures` (tokens (B, L, d), mask (B, L), pooled (B, d)).

The model files: `bert` (BERT family), `clip` (CLIP's text tower), `t5` (the T5 encoder); `pooling`,
`weights` (config.json and strict safetensors loading), `layers` (shared pieces and the errors);
`encoder` (sources, tokenizer, `TextEncoder`). tokenizers and safetensors are imported when a model loads.
"""

from aligntok.text.encoder import (
    ARCHITECTURES,
    DEFAULT_SOURCE,
    EMBEDDED,
    TextEncoder,
    TextFeatures,
    load_text_encoder,
)
from aligntok.text.layers import TextEncoderError, TextWeightsMissing
from aligntok.text.pooling import pool

__all__ = ["ARCHITECTURES", "DEFAULT_SOURCE", "EMBEDDED", "TextEncoder", "TextEncoderError", "TextFeatures",
           "TextWeightsMissing", "load_text_encoder", "pool"]

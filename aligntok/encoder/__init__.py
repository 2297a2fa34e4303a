"""The foundation encoder (`encoder` stage): resolve a source, keep the first blocks, load them back."""

from aligntok.encoder.sources import (
    EMBEDDED,
    EncoderSourceError,
    encoder_features,
    export_encoder,
    load_encoder,
    resolve_source,
)

__all__ = ["EMBEDDED", "EncoderSourceError", "encoder_features", "export_encoder", "load_encoder", "resolve_source"]

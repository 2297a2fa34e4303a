"""The foundation encoder: the ViT module and its description (`vit`), and the `encoder` stage that
resolves a source, keeps the first blocks and loads them back (`sources`)."""

from aligntok.encoder.sources import EMBEDDED, export_encoder, load_encoder, resolve_source
from aligntok.encoder.vit import (
    EncoderDescription,
    EncoderSourceError,
    FoundationEncoder,
    create_random_encoder,
    create_vit,
    patch_tokens,
)

__all__ = ["EMBEDDED", "EncoderDescription", "EncoderSourceError", "FoundationEncoder", "create_random_encoder",
           "create_vit", "export_encoder", "load_encoder", "patch_tokens", "resolve_source"]

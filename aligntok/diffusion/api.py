"""`DiffusionModel`: a trained DiT packaged with its latent statistics and tokenizer.

A DiT folder (the `train_dit` out) holds `dit.safetensors` (EMA weights), `dit.json`,
`stats.json` and `tokenizer/`. `DiffusionModel.load` takes that folder or a registry URI
(`models:/aligntok-dit@latest`); `generate(labels, ...)` returns images (B, 3, R, R) in [0, 1].
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from aligntok.config import DiTConfig, SampleConfig
from aligntok.diffusion.dit import build_dit
from aligntok.diffusion.latents import LatentNormalizer
from aligntok.errors import AligntokError, one_line
from aligntok.tokenizer.api import Tokenizer, download, load_weights, read_description

WEIGHTS, CONFIG, FORMAT = "dit.safetensors", "dit.json", "aligntok-dit/1"


def resolve_folder(source: str | Path, weights: str = WEIGHTS, config: str = CONFIG, kind: str = "DiT") -> Path:
    """A model folder (`weights`, `config`, stats.json, tokenizer/) from a folder or a `models:/` / `runs:/` URI
    (pyfunc artifacts are re-assembled); `kind` names the model in the error. The text-to-image models use it too."""
    text = str(source)
    if text.startswith(("models:/", "runs:/")):
        return assemble_folder(download(text), weights, config)
    folder = Path(text)
    if not (folder / config).is_file():
        raise FileNotFoundError(f"{source}: not a {kind} folder (needs {weights}, {config}, stats.json, tokenizer/)")
    return folder


def assemble_folder(artifacts: Path, weights: str = WEIGHTS, config: str = CONFIG) -> Path:
    """A registered model's artifacts folder (files by their own names) -> the model folder layout (in a subfolder
    named after the weights file)."""
    if (artifacts / config).is_file() and (artifacts / "tokenizer" / "tokenizer.json").is_file():
        return artifacts
    folder = artifacts / Path(weights).stem
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    for target in (weights, config, "stats.json", "tokenizer/tokenizer.safetensors", "tokenizer/tokenizer.json"):
        source = artifacts / Path(target).name
        if not source.is_file():
            raise AligntokError(f"{artifacts}: the registered model lacks {Path(target).name}")
        shutil.copyfile(source, folder / target)
    return folder


class DiffusionModel:
    def __init__(self, dit: torch.nn.Module, normalizer: LatentNormalizer, tokenizer: Tokenizer,
                 description: dict) -> None:
        self.dit, self.normalizer, self.tokenizer, self.description = dit.eval(), normalizer, tokenizer, description

    @classmethod
    def load(cls, source: str | Path, weights: Path | None = None,
             device: str | torch.device = "cpu") -> DiffusionModel:
        """`weights`: another safetensors file of the same DiT (a training snapshot) instead of the folder's;
        `device`: where the DiT and its tokenizer run (samples come back on the CPU)."""
        folder = resolve_folder(source)
        description = read_description(folder / CONFIG, FORMAT)
        try:
            SampleConfig.model_validate(description["sample"])  # generate() reads its defaults from there
            C, h, _ = description["latent_shape"]
            dit = build_dit(DiTConfig.model_validate(description["dit"]), C, h, description["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AligntokError(f"{folder / CONFIG}: cannot build the DiT it describes: {one_line(exc)}") from None
        load_weights(dit, weights or folder / WEIGHTS)
        try:
            normalizer = LatentNormalizer.load(folder / "stats.json")
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise AligntokError(f"{folder / 'stats.json'}: cannot read the latent statistics: {one_line(exc)}") \
                from None
        return cls(dit.to(device), normalizer, Tokenizer.load(folder / "tokenizer", device=device), description)

    @property
    def classes(self) -> list[str]:
        return list(self.description.get("classes") or range(self.description["num_classes"]))

    def generate(self, labels: torch.Tensor | list[int], steps: int | None = None, cfg_scale: float | None = None,
                 seed: int = 0, interval: list[float] | None = None, method: str | None = None,
                 timestep_shift: float | None = None) -> torch.Tensor:
        """Class labels (B,) -> images (B, 3, R, R) in [0, 1] (defaults from the model's `sample` settings)."""
        from aligntok.diffusion.sampling import generate

        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1 or (labels < 0).any() or (labels >= self.description["num_classes"]).any():
            raise AligntokError(f"labels must be class indices in [0, {self.description['num_classes']}), "
                                f"got {labels.tolist()}")
        defaults = self.description["sample"]
        return generate(self.dit, self.normalizer, self.tokenizer, labels,
                        steps or defaults["steps"], defaults["cfg_scale"] if cfg_scale is None else cfg_scale,
                        interval if interval is not None else defaults["cfg_interval"], seed,
                        method or defaults["method"],
                        timestep_shift or defaults.get("timestep_shift", 1.0))

"""The VA-VAE baseline (study variant (e)): the VAE stage with the VF alignment loss on the tiny dataset.

The VF term trains a projection head kept outside the tokenizer; these tests check that the term is logged,
that it pulls the projected latent towards the frozen encoder's tokens, and that the head is checkpointed
and restored on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import aligntok.train.loop
from aligntok.config import ConfigError, Params, parse_params
from aligntok.tokenizer.losses import l1_loss, vf_cosine_margin_loss, vf_distance_matrix_loss
from aligntok.tokenizer.api import Tokenizer
from aligntok.encoder import FoundationEncoder, create_random_encoder
from aligntok.tokenizer.outputs import to_signed
from aligntok.tokenizer.objective import TokenizerObjective, VFAlignment
from aligntok.tokenizer.stages import (
    StagePaths,
    build_stage_model,
    run_tokenizer_stage,
    set_trainable,
    vf_alignment,
)

from support.tiny import TINY_MODEL, make_inputs, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

VAE = {"train": ["encoder", "decoder"], "steps": 16, "batch_size": 4, "lr": 1e-2, "val_images": 4,
       "checkpoint_every": 8, "losses": {"gan": 0.0, "perceptual": 0.0, "kl": 1e-6}}


def tiny_params(vf: float, **stage: Any) -> Params:
    losses = {**VAE["losses"], "vf": vf, **stage.pop("losses", {})}
    return parse_params({**TINY_MODEL, "vae_baseline": {**VAE, **stage, "losses": losses}})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def run_stage(params: Params, inputs: tuple[Path, Path], root: Path) -> tuple[dict[str, float], Path]:
    """Train the VAE stage into `root`; its metrics and its (only) checkpoint file."""
    data, encoder = inputs
    paths = StagePaths(data=data, encoder=encoder, out=root / "out", checkpoints=root / "ck")
    result = run_tokenizer_stage("vae_baseline", params, paths, register=False, progress=False)
    (checkpoint,) = (root / "ck" / "vae_baseline").glob("*.safetensors")
    return result.metrics, checkpoint


def initial_state(params: Params, inputs: tuple[Path, Path]) -> tuple[torch.nn.Module, VFAlignment]:
    """The model and VF head as the stage builds them before its first step (same seed, same order)."""
    data, encoder = inputs
    paths = StagePaths(data=data, encoder=encoder, out=Path())
    cfg = params.vae_baseline
    torch.manual_seed(cfg.seed)
    model, _ = build_stage_model("vae_baseline", params, paths)
    set_trainable(model, cfg.train)
    return model, vf_alignment("vae_baseline", cfg, paths, model)


@torch.no_grad()
def alignment(model: torch.nn.Module, vf: VFAlignment, head: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean cosine similarity between head(posterior mean) and the frozen encoder's tokens."""
    return F.cosine_similarity(head(model.encode(images)), vf.target(images), dim=1).mean().item()


@torch.no_grad()
def structure_gap(model: torch.nn.Module, vf: VFAlignment, images: torch.Tensor) -> float:
    """How far the raw latent's position-similarity matrix is from the encoder's (no head, no margin)."""
    return vf_distance_matrix_loss(model.encode(images), vf.target(images), margin=0.0).item()


def head_from(checkpoint: Path, vf: VFAlignment) -> torch.nn.Module:
    head = torch.nn.Conv2d(vf.head.in_channels, vf.head.out_channels, kernel_size=1, bias=False)
    head.load_state_dict({k.removeprefix("vf_head."): v for k, v in load_file(str(checkpoint)).items()
                          if k.startswith("vf_head.")})
    return head


def test_vf_term_is_logged_and_aligns_the_latent_with_the_encoder(
        inputs: tuple[Path, Path], tmp_path: Path) -> None:
    aligned_params = tiny_params(vf=2.0)
    metrics, checkpoint = run_stage(aligned_params, inputs, tmp_path / "vf")
    plain_metrics, _ = run_stage(tiny_params(vf=0.0), inputs, tmp_path / "plain")

    assert {"final_vf_cos", "final_vf_distmat"} <= set(metrics) and metrics["final_vf_weight"] == 2.0
    assert not any(k.startswith("final_vf") for k in plain_metrics)
    stored = load_file(str(checkpoint))
    assert stored["vf_head.weight"].shape == (384, 4, 1, 1)  # latent C = 4 -> ViT-S width D = 384
    tokenizer = Tokenizer.load(tmp_path / "vf" / "out")  # the head stays out of the tokenizer
    assert not any("vf" in k for k in load_file(str(tmp_path / "vf" / "out" / "tokenizer.safetensors")))

    model, vf = initial_state(aligned_params, inputs)
    assert not torch.equal(stored["vf_head.weight"], vf.head.weight)  # the head trains
    plain_model = Tokenizer.load(tmp_path / "plain" / "out").model
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = alignment(model, vf, vf.head, images)
    after = alignment(tokenizer.model, vf, head_from(checkpoint, vf), images)
    plain = alignment(plain_model, vf, vf.head, images)
    assert after > before + 0.15 and after > plain + 0.15, (before, after, plain)  # measured: 0.005 -> 0.31, 0.004
    gaps = [structure_gap(m, vf, images) for m in (model, tokenizer.model, plain_model)]
    assert gaps[1] < min(gaps[0], gaps[2]) - 0.1, gaps  # the latent itself, not just the head (0.52, 0.30, 0.57)
    # the stage's output loads as a VAE with the tiny aligned tokenizer's latent shape (C=4 on a 4x4 grid)
    assert tokenizer.description["kind"] == Tokenizer.load(tmp_path / "plain" / "out").description["kind"] == "vae"
    assert tokenizer.encode(images[:2]).shape == (2, 4, 4, 4)


def test_resume_restores_the_vf_head(inputs: tuple[Path, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    params = tiny_params(vf=1.0, steps=4, checkpoint_every=2)
    _, reference = run_stage(params, inputs, tmp_path / "reference")

    real_save = aligntok.train.loop.save_checkpoint

    def save_then_crash(path: Path, state: Any, sidecar: dict[str, Any]) -> None:
        real_save(path, state, sidecar)
        raise KeyboardInterrupt  # the process dies right after the step-2 checkpoint

    monkeypatch.setattr(aligntok.train.loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(params, inputs, tmp_path / "resumed")
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="aligntok.train.loop"):
        _, resumed = run_stage(params, inputs, tmp_path / "resumed")
    assert "resuming from step 2" in caplog.text and "unusable checkpoint" not in caplog.text

    a, b = load_file(str(reference)), load_file(str(resumed))
    assert "vf_head.weight" in a and a.keys() == b.keys()
    assert [k for k in a if (k.startswith(("model.", "vf_head.", "optim.")) and not torch.equal(a[k], b[k]))] == []


def test_adaptive_vf_weight_balances_gradients_at_the_latent_layer(inputs: tuple[Path, Path]) -> None:
    params = tiny_params(vf=0.1, losses={"vf_adaptive": True})
    model, vf = initial_state(params, inputs)
    objective = TokenizerObjective(model, params.vae_baseline, None, None, None, vf)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    logs = objective((images, torch.zeros(2)), step=0).logs

    torch.manual_seed(3)  # the same posterior sample
    out = model(images)
    cos, distmat = vf(out.latent, images)
    layer = model.encoder.conv_out.weight
    (rec_grad,) = torch.autograd.grad(l1_loss(to_signed(images), out.reconstruction), layer, retain_graph=True)
    (vf_grad,) = torch.autograd.grad(cos + distmat, layer)
    expected = 0.1 * rec_grad.norm() / (vf_grad.norm() + 1e-4)
    assert logs["vf_weight"] == pytest.approx(expected.item(), rel=1e-4)
    assert logs["vf_weight"] != pytest.approx(0.1)
    assert logs["vf_cos"] == pytest.approx(cos.item()) and logs["vf_distmat"] == pytest.approx(distmat.item())


def test_adaptive_vf_needs_a_trained_latent_layer(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    params = tiny_params(vf=0.1, train=["decoder"], losses={"vf_adaptive": True})
    with pytest.raises(ConfigError, match=r"vae_baseline\.losses\.vf_adaptive.*vae_baseline\.train is \['decoder'\]"):
        run_stage(params, inputs, tmp_path)


def test_vf_alignment_pools_the_tokens_to_the_latent_grid() -> None:
    torch.manual_seed(0)
    vit, desc = create_random_encoder("vit_small_patch14_dinov2", depth=1, image_size=56)  # 4x4 tokens
    vf = VFAlignment(FoundationEncoder(vit, desc), latent_channels=3, cos_margin=0.0, distmat_margin=0.0)
    images, latent = torch.rand(2, 3, 16, 16), torch.randn(2, 3, 2, 2)
    cos, distmat = vf(latent, images)
    with torch.no_grad():
        f = F.avg_pool2d(vf.target(images), 2)  # (2, 384, 2, 2): each latent cell averages its 2x2 tokens
    z_proj = vf.head(latent)
    assert cos.item() == pytest.approx(vf_cosine_margin_loss(z_proj, f, 0.0).item(), abs=1e-6)
    assert distmat.item() == pytest.approx(vf_distance_matrix_loss(z_proj, f, 0.0).item(), abs=1e-6)
    cos.backward()
    assert vf.head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in vf.target.parameters())

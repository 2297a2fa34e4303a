"""Tokenizer models: shapes at the default and the paper scale, value ranges, roles, config checks."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from aligntok.config import DiscriminatorConfig, Params, load_params, parse_params
from aligntok.tokenizer import (
    Adapter,
    AlignedTokenizer,
    Decoder,
    PatchDiscriminator,
    VAETokenizer,
    build_discriminator,
    build_tokenizer,
)
from aligntok.encoder import EncoderDescription, FoundationEncoder, create_random_encoder
from aligntok.tokenizer.blocks import AttnBlock, group_norm

from support.paths import REPO


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def params() -> Params:
    # the embedded default, 2 encoder blocks for speed: 32x32 images, 112x112 encoder input, 8x8x32 latent
    return parse_params({"encoder": {"arch": "vit_small_patch14_dinov2", "depth": 2}})


@pytest.fixture(scope="module")
def aligned(params: Params) -> AlignedTokenizer:
    torch.manual_seed(0)
    enc = params.encoder
    vit, desc = create_random_encoder("vit_small_patch14_dinov2", enc.depth, enc.image_size)
    return build_tokenizer(params.tokenizer, params.latent, vit, desc.to_dict(), params.data.resolution)


@pytest.fixture(scope="module")
def vae(params: Params, aligned: AlignedTokenizer) -> VAETokenizer:
    torch.manual_seed(0)
    return build_tokenizer(params.tokenizer, params.latent, None, aligned.encoder.description, params.data.resolution,
                           kind="vae")


def test_default_aligned_shapes_and_value_ranges(aligned: AlignedTokenizer) -> None:
    assert isinstance(aligned, AlignedTokenizer)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = aligned.encode(images)
        decoded = aligned.decode(z)
        out = aligned(images)
    assert z.shape == (2, 32, 8, 8) and aligned.latent_shape == (32, 8, 8)
    assert decoded.shape == (2, 3, 32, 32)
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0
    assert out.latent.shape == (2, 32, 8, 8) and out.reconstruction.shape == (2, 3, 32, 32)
    assert out.posterior_mean is None and out.posterior_logvar is None
    assert torch.allclose(out.latent, z, atol=1e-6)  # deterministic latent


def test_decode_maps_the_signed_prediction_to_unit_range_and_clamps(aligned: AlignedTokenizer) -> None:
    decoder = aligned.decoder
    z = torch.randn(1, 32, 8, 8)
    original = decoder.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            raw = decoder(z)
            assert torch.allclose(aligned.decode(z), ((raw + 1) / 2).clamp(0, 1))
            decoder.conv_out.bias.fill_(5.0)  # far above the [-1, 1] range
            assert aligned.decoder(z).max() > 1.0  # forward's reconstruction is not clamped
            assert torch.equal(aligned.decode(z), torch.ones(1, 3, 32, 32))
            decoder.conv_out.bias.fill_(-5.0)
            assert torch.equal(aligned.decode(z), torch.zeros(1, 3, 32, 32))
    finally:
        with torch.no_grad():
            decoder.conv_out.bias.copy_(original)


def test_vae_baseline_has_the_same_latent_shape(aligned: AlignedTokenizer, vae: VAETokenizer) -> None:
    assert isinstance(vae, VAETokenizer)
    assert vae.latent_shape == aligned.latent_shape
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean = vae.encode(images)
        assert torch.equal(mean, vae.encode(images))  # deterministic: the posterior mean
        out = vae(images)
        assert vae.decode(mean).shape == (2, 3, 32, 32)
    assert mean.shape == (2, 32, 8, 8)
    assert out.latent.shape == out.posterior_mean.shape == out.posterior_logvar.shape == (2, 32, 8, 8)
    assert torch.allclose(out.posterior_mean, mean, atol=1e-6)
    assert not torch.allclose(out.latent, mean)  # reparameterised sample
    assert out.reconstruction.shape == (2, 3, 32, 32)


def test_roles_cover_every_parameter_exactly_once(aligned: AlignedTokenizer, vae: VAETokenizer) -> None:
    for model, roles in ((aligned, {"encoder", "adapter", "decoder"}), (vae, {"encoder", "decoder"})):
        by_role = model.modules_by_role()
        assert set(by_role) == roles
        ids = [id(p) for module in by_role.values() for p in module.parameters()]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters()}


def test_freezing_the_encoder_role_trains_only_adapter_and_decoder(params: Params) -> None:
    torch.manual_seed(0)
    vit, desc = create_random_encoder("vit_small_patch14_dinov2", 1, params.encoder.image_size)
    model = build_tokenizer(params.tokenizer, params.latent, vit, desc, params.data.resolution)
    model.modules_by_role()["encoder"].requires_grad_(False)
    images = torch.rand(1, 3, 32, 32)
    (model(images).reconstruction - (images * 2 - 1)).abs().mean().backward()
    roles = model.modules_by_role()
    assert all(p.grad is None for p in roles["encoder"].parameters())
    for role in ("adapter", "decoder"):
        assert all(p.grad is not None for p in roles[role].parameters()), role


def test_foundation_encoder_resizes_normalises_and_names_features(aligned: AlignedTokenizer) -> None:
    encoder = aligned.encoder
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        grid = encoder(images)
        resized = torch.nn.functional.interpolate(images, size=(112, 112), mode="bicubic", antialias=True)
        assert torch.allclose(encoder(resized), grid, atol=1e-5)  # its own resize
        mean, std = torch.tensor(encoder.description.mean), torch.tensor(encoder.description.std)
        tokens = encoder.vit.forward_features((resized - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        expected = tokens[:, 1:].transpose(1, 2).reshape(2, 384, 8, 8)  # CLS dropped, row-major grid
        assert torch.allclose(grid, expected, atol=1e-5)
        feats = encoder.features(images)
    assert grid.shape == (2, 384, 8, 8)
    assert list(feats) == ["block1", "block2"]
    assert all(f.shape == (2, 384, 8, 8) for f in feats.values())
    with pytest.raises(ValueError, match="1..2"):
        encoder.features(images, blocks=[3])


def test_foundation_encoder_keeps_only_the_first_depth_blocks_and_checks_the_patch() -> None:
    vit, desc = create_random_encoder("vit_small_patch14_dinov2", depth=3, image_size=28)
    wrapped = FoundationEncoder(vit, EncoderDescription(**{**desc.__dict__, "depth": 2}))
    assert len(wrapped.vit.blocks) == 2
    with pytest.raises(ValueError, match="encoder.image_size"):
        FoundationEncoder(vit, EncoderDescription(**{**desc.__dict__, "depth": 2, "image_size": 30}))


def test_adapter_is_a_per_token_mlp() -> None:
    adapter = Adapter(in_channels=16, latent_channels=4)
    assert count(adapter) == (16 * 16 + 16) + (16 * 4 + 4)  # hidden = encoder width by default
    assert count(Adapter(16, 4, hidden=8)) == (16 * 8 + 8) + (8 * 4 + 4)
    x = torch.randn(2, 16, 3, 3)
    y = adapter(x)
    x2 = x.clone()
    x2[0, :, 1, 2] += 1.0  # change one token
    changed = (adapter(x2) - y).abs().sum(dim=1) > 0  # (B, h, w)
    assert changed.sum() == 1 and changed[0, 1, 2]


def test_decoder_layout() -> None:
    decoder = Decoder(latent_channels=4, channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                      attn_resolutions=[4], latent_size=4)
    assert decoder.upsampling_factor == 4
    assert len(decoder.up) == 3 and all(len(level.blocks) == 2 for level in decoder.up)  # num_res_blocks + 1
    # attention in the mid block and after each ResnetBlock of the 4x4 level only
    assert sum(isinstance(m, AttnBlock) for m in decoder.modules()) == 1 + 2
    assert len(decoder.up[0].attns) == 2 and not decoder.up[1].attns
    assert decoder.last_layer is decoder.conv_out.weight
    assert decoder(torch.randn(2, 4, 4, 4)).shape == (2, 3, 16, 16)
    assert [group_norm(c).num_groups for c in (8, 24, 64, 512)] == [8, 8, 32, 32]


def test_build_rejects_a_grid_that_does_not_reach_the_resolution(params: Params) -> None:
    with torch.device("meta"):
        vit, desc = create_random_encoder("vit_small_patch14_dinov2", 1, 112)
    for kind in ("aligned", "vae"):
        with pytest.raises(ValueError) as info:
            build_tokenizer(params.tokenizer, params.latent, vit, desc, resolution=64, kind=kind)  # 8x8 grid x 4 = 32
        for key in ("tokenizer.decoder.channel_mult", "data.resolution", "encoder.image_size"):
            assert key in str(info.value), (kind, key)
    with pytest.raises(ValueError, match="needs the foundation encoder"):
        build_tokenizer(params.tokenizer, params.latent, None, None, resolution=32)


def test_discriminator_shapes_and_norms() -> None:
    cfg = DiscriminatorConfig()
    disc = build_discriminator(cfg, 32)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # the classic 30x30 PatchGAN grid
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    batch = PatchDiscriminator(channels=8, layers=2, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert batch(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="tokenizer.discriminator.layers"):
        build_discriminator(DiscriminatorConfig(layers=5), 32)


def test_paper_scale_counts_and_shapes() -> None:
    """configs/imagenet256.yaml: DINOv2 ViT-L/14 (24 blocks, random init) -> 16x16x32 -> 256x256."""
    p = load_params(REPO / "configs" / "imagenet256.yaml")
    with torch.device("meta"):  # exact parameter counts and shapes without allocating 300M weights
        vit, desc = create_random_encoder(p.encoder.arch, p.encoder.depth, p.encoder.image_size)
        model = build_tokenizer(p.tokenizer, p.latent, vit, desc, p.data.resolution)
        out = model(torch.rand(1, 3, 256, 256))
    roles = {name: count(m) for name, m in model.modules_by_role().items()}
    assert roles["encoder"] == 303_227_904  # ViT-L/14: 24 blocks, 1024 wide, pos_embed for 16x16 tokens
    assert roles["adapter"] == 1024 * 1024 + 1024 + 1024 * 32 + 32 < 3_000_000
    assert 41_000_000 < roles["decoder"] < 43_000_000
    assert out.latent.shape == (1, 32, 16, 16) and out.reconstruction.shape == (1, 3, 256, 256)

    torch.manual_seed(0)
    decoder = Decoder(
        latent_channels=32, channels=128, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
        attn_resolutions=[16], latent_size=16,
    )  # real weights: a real forward of one 16x16 latent
    assert count(decoder) == roles["decoder"]
    with torch.no_grad():
        pixels = decoder(torch.randn(1, 32, 16, 16))
    assert pixels.shape == (1, 3, 256, 256) and torch.isfinite(pixels).all()

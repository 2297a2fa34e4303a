"""TextConditionedDiT (FLUX-style): shapes, zero init, masked padding, the null caption and caption dropout,
RoPE on image tokens only, gradient flow, a training step, presets and their sizes, the guided sampler."""

from __future__ import annotations

import math

import pytest
import torch
from aligntok.config import T2I_PRESET_NAMES
from aligntok.diffusion.flow import euler_sample, flow_matching_loss
from aligntok.diffusion.t2i_dit import (
    PRESETS_T2I,
    TextConditionedDiT,
    build_t2i_dit,
    count_parameters,
    sample_text,
)

C, SIDE, D_TEXT, L_MAX = 3, 4, 12, 8


def tiny(**kw: object) -> TextConditionedDiT:
    torch.manual_seed(0)
    args = dict(input_size=SIDE, in_channels=C, text_width=D_TEXT, text_length=L_MAX, hidden_size=32,
                depth_double=1, depth_single=1, num_heads=2, caption_dropout=0.0)
    return TextConditionedDiT(**(args | kw))  # type: ignore[arg-type]


def perturb(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its (partly zero) init, so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def inputs(batch: int = 3, length: int = L_MAX, real: tuple[int, ...] = (2, 5, 1), seed: int = 1
           ) -> tuple[torch.Tensor, ...]:
    """x, t, text, mask, pooled; sample i has real[i] real tokens then padding (filled with noise too)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, SIDE, SIDE, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, length, D_TEXT, generator=g)
    mask = torch.arange(length)[None] < torch.tensor(real[:batch])[:, None]  # (B, L)
    pooled = torch.randn(batch, D_TEXT, generator=g)
    return x, t, text, mask, pooled


@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_shape_and_exact_zero_init(patch_size: int) -> None:
    model = tiny(patch_size=patch_size)
    x, t, text, mask, pooled = inputs()
    out = model(x, t, text, mask, pooled)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    assert perturb(model)(x, t, text, mask, pooled).abs().sum() > 0
    assert (model.in_channels, model.input_size, model.text_width, model.text_length) == (C, SIDE, D_TEXT, L_MAX)


def test_wrong_shapes_are_refused_with_the_argument_named() -> None:
    model = tiny()
    x, t, text, mask, pooled = inputs()
    with pytest.raises(AssertionError, match="text: 9 tokens"):
        model(x, t, torch.randn(3, 9, D_TEXT), torch.ones(3, 9, dtype=torch.bool), pooled)
    with pytest.raises(AssertionError, match="mask: expected"):
        model(x, t, text, mask.long(), pooled)
    with pytest.raises(AssertionError, match="pooled: expected"):
        model(x, t, text, mask, pooled[:, :5])
    with pytest.raises(AssertionError, match="x: expected"):
        model(x[:, :2], t, text, mask, pooled)


def test_padding_contents_and_length_change_nothing() -> None:
    model = perturb(tiny()).eval()
    x, t, text, mask, pooled = inputs(length=5)  # real tokens: 2, 5, 1
    reference = model(x, t, text, mask, pooled)
    other_pad = torch.where(mask[..., None], text, 100 * torch.randn_like(text))
    torch.testing.assert_close(model(x, t, other_pad, mask, pooled), reference, atol=1e-5, rtol=1e-5)
    nan_pad = text.masked_fill(~mask[..., None], float("nan"))
    torch.testing.assert_close(model(x, t, nan_pad, mask, pooled), reference, atol=1e-5, rtol=1e-5)
    longer = torch.cat([text, torch.randn(3, L_MAX - 5, D_TEXT)], dim=1)  # (B, 8, d): three more pads
    longer_mask = torch.cat([mask, torch.zeros(3, L_MAX - 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, longer, longer_mask, pooled), reference, atol=1e-5, rtol=1e-5)
    unmasked = model(x, t, other_pad, torch.ones_like(mask), pooled)  # the same pads as real tokens do count
    assert (unmasked[0] - reference[0]).abs().max() > 1e-3


def test_the_caption_matters() -> None:
    model = perturb(tiny()).eval()
    x, t, text, mask, pooled = inputs()
    reference = model(x, t, text, mask, pooled)
    other_tokens = model(x, t, text + torch.randn_like(text), mask, pooled)
    other_pooled = model(x, t, text, mask, pooled + torch.randn_like(pooled))
    for out in (other_tokens, other_pooled):
        assert all((out[i] - reference[i]).abs().max() > 1e-3 for i in range(3))


def test_force_drop_is_the_null_caption_whatever_the_caption() -> None:
    model = perturb(tiny(caption_dropout=1.0))
    x, t, text, mask, pooled = inputs()
    drop = torch.tensor([True, False, True])
    model.eval()
    out = model(x, t, text, mask, pooled, force_drop=drop)
    other = model(x, t, torch.randn(3, 3, D_TEXT), torch.ones(3, 3, dtype=torch.bool), torch.randn(3, D_TEXT),
                  force_drop=drop)  # other captions, other length
    torch.testing.assert_close(out[drop], other[drop], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[~drop], model(x, t, text, mask, pooled)[~drop])  # kept ones: conditional
    # the null path spelt out: the null token in position 0, nothing else attended, the null pooled vector
    null_text = model.null_text.detach().expand(3, 1, D_TEXT)
    null = model(x, t, null_text, torch.ones(3, 1, dtype=torch.bool), model.null_pooled.detach().expand(3, -1))
    torch.testing.assert_close(out[drop], null[drop], atol=1e-5, rtol=1e-5)
    model.train()  # force_drop wins over caption_dropout=1 in training too
    torch.testing.assert_close(model(x, t, text, mask, pooled, force_drop=drop), out)


def test_caption_dropout_rate_in_training_only() -> None:
    p, n = 0.3, 4000
    model = tiny(caption_dropout=p)
    text, mask, pooled = torch.randn(n, 2, D_TEXT), torch.ones(n, 2, dtype=torch.bool), torch.randn(n, D_TEXT)
    torch.manual_seed(0)
    _, new_mask, new_pooled = model.train().drop_captions(text, mask, pooled, None)
    dropped = (new_pooled == model.null_pooled).all(dim=1)  # (n,)
    assert torch.equal(new_mask[:, 1], ~dropped)  # a dropped row attends to its null token only
    assert abs(dropped.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    _, _, eval_pooled = model.eval().drop_captions(text, mask, pooled, None)
    assert torch.equal(eval_pooled, pooled)


def test_rope_rotates_image_tokens_only() -> None:
    model = perturb(tiny(pos_embed=False)).eval()
    cos, sin = model.joint_rope(5, torch.device("cpu"))  # (5 + 16, d)
    grid_cos, grid_sin = model.rope.tables(SIDE, SIDE, torch.device("cpu"), torch.float32)
    assert torch.equal(cos[:5], torch.ones_like(cos[:5])) and torch.equal(sin[:5], torch.zeros_like(sin[:5]))
    assert torch.equal(cos[5:], grid_cos) and torch.equal(sin[5:], grid_sin)
    x, t, text, mask, pooled = inputs()
    reference = model(x, t, text, mask, pooled)
    # text carries no position in the DiT: permuting tokens with their mask changes nothing
    order = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    permuted = model(x, t, text[:, order], mask[:, order], pooled)
    torch.testing.assert_close(permuted, reference, atol=1e-5, rtol=1e-5)
    # image tokens do (through RoPE alone, with pos_embed off): a flipped latent is not a flipped output
    flipped = model(x.flip(-1), t, text, mask, pooled).flip(-1)
    assert (flipped - reference).abs().max() > 1e-3


def test_gradients_reach_every_parameter() -> None:
    model = perturb(tiny(depth_double=2, depth_single=2))
    x, t, text, mask, pooled = inputs()
    model(x, t, text, mask, pooled, force_drop=torch.tensor([True, False, False])).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    model.zero_grad()  # with no caption dropped, the null caption alone gets no gradient
    model(x, t, text, mask, pooled, force_drop=torch.zeros(3, dtype=torch.bool)).square().mean().backward()
    dead = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert dead == {"null_text", "null_pooled"}


def test_training_steps_from_zero_init_on_cpu() -> None:
    """FluxDiT-T on the toy shapes (8x8x32 latent, 32 tokens of width 384): flow matching through a closure, as
    the trainer calls it. Zero init opens layer by layer (output, then gates, then the text stream's MLP behind
    its gate), so four AdamW steps without weight decay move every parameter."""
    torch.manual_seed(0)
    model = build_t2i_dit("FluxDiT-T", 32, 8, 384, 32)
    g = torch.Generator().manual_seed(0)
    z0, text, pooled = torch.randn(8, 32, 8, 8, generator=g), torch.randn(8, 32, 384, generator=g), torch.randn(8, 384)
    mask = torch.arange(32)[None] < torch.randint(1, 33, (8, 1), generator=g)
    drop = torch.tensor([True, False] * 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(4):
        result = flow_matching_loss(lambda z_t, t, y: model(z_t, t, text, mask, pooled, force_drop=drop), z0, drop,
                                    torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(result.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - 2.0) < 0.2  # a zero velocity against eps - z0, both N(0, 1): E|eps - z0|² = 2
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved, unmoved
    assert "double_blocks.0.txt_mlp.fc2.weight" in before and "txt_in.weight" in before


def test_presets_and_their_sizes() -> None:
    assert tuple(PRESETS_T2I) == T2I_PRESET_NAMES
    counts = {name: count_parameters(name) for name in PRESETS_T2I}  # 32x32x32 latent, T5-XXL width 4096
    assert list(counts.values()) == sorted(counts.values())
    assert 1.8e9 <= counts["FluxDiT-2B"] <= 2.2e9
    assert counts["FluxDiT-2B"] == 2_048_006_176
    toy = count_parameters("FluxDiT-T", latent_channels=32, latent_size=8, text_width=384, text_length=32)
    assert 3e5 <= toy <= 2e6 and toy == 1_295_304
    for preset in PRESETS_T2I.values():
        assert preset["depth_single"] == 2 * preset["depth_double"]  # FLUX.1's 19:38
    with torch.device("meta"):
        model = build_t2i_dit("FluxDiT-2B", 32, 32, 4096, 512, caption_dropout=0.2, qk_norm=False)
    assert (len(model.double_blocks), len(model.single_blocks), model.caption_dropout) == (13, 26, 0.2)
    without_qk_norm = sum(p.numel() for p in model.parameters())
    assert counts["FluxDiT-2B"] - without_qk_norm == 2 * 128 * (2 * 13 + 26)  # q_norm, k_norm in each qkv


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'FluxDiT-XL'.*FluxDiT-T, FluxDiT-S.*FluxDiT-2B"):
        build_t2i_dit("FluxDiT-XL", 32, 8, 384, 32)


def test_sample_text_shapes_determinism_and_guidance() -> None:
    model = perturb(tiny()).train()
    _, _, text, mask, pooled = inputs()
    shape = (C, SIDE, SIDE)
    a = sample_text(model, text, mask, pooled, shape, steps=3, seed=7)
    assert a.shape == (3, *shape) and model.training  # mode restored
    assert torch.equal(a, sample_text(model, text, mask, pooled, shape, steps=3, seed=7))
    assert not torch.equal(a, sample_text(model, text, mask, pooled, shape, steps=3, seed=8))
    model.eval()
    noise = torch.randn((3, *shape), generator=torch.Generator().manual_seed(7))
    conditional = euler_sample(lambda z, t: model(z, t, text, mask, pooled), noise, 3).z
    torch.testing.assert_close(a, conditional)  # cfg 1: the conditional velocity alone
    drop = torch.ones(3, dtype=torch.bool)

    def guided(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model(z, t, text, mask, pooled), model(z, t, text, mask, pooled, force_drop=drop)
        return v_uncond + 3.0 * (v_cond - v_uncond)

    with torch.no_grad():
        expected = euler_sample(guided, noise, 3, shift=2.0).z
    out = sample_text(model, text, mask, pooled, shape, steps=3, cfg_scale=3.0, seed=7, timestep_shift=2.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not model.training
    outside = sample_text(model, text, mask, pooled, shape, steps=3, cfg_scale=3.0, seed=7, interval=(0.0, 0.01))
    torch.testing.assert_close(outside, a)  # no grid time t in [0, 0.01] but the last, which Euler never evaluates
    assert sample_text(model, text, mask, pooled, shape, steps=2, method="heun").shape == (3, *shape)

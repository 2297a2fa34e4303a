"""LightningDiT: shapes, zero init, gradient flow, the null class, 2-D RoPE, presets and their sizes."""

from __future__ import annotations

import pytest
import torch
from aligntok.config import DiTConfig
from aligntok.diffusion.dit import PRESETS, LightningDiT, RotaryEmbedding2D, build_dit, swiglu_hidden

XL_PARAMS = 674_896_160  # LightningDiT-XL/1, 32 latent channels, 1000 classes, no QKNorm


def tiny(patch_size: int = 1, **kw: object) -> LightningDiT:
    torch.manual_seed(0)
    args = dict(input_size=4, in_channels=3, num_classes=5, patch_size=patch_size, hidden_size=32, depth=2,
                 num_heads=2)
    return LightningDiT(**(args | kw))  # type: ignore[arg-type]


def perturb(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its (partly zero) init, so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def inputs(batch: int = 2, channels: int = 3, side: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side, side, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, 5, (batch,), generator=g)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_output_shape_and_exact_zero_init(patch_size: int) -> None:
    model = tiny(patch_size)
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))
    assert perturb(model)(x, t, y).abs().sum() > 0


def test_unpatchify_layout() -> None:
    """Output Linear features are ordered (i, j, c) inside a p×p patch; check where each lands."""
    model = tiny(patch_size=2)
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(2 * 2 * 3, dtype=torch.float32))
    out = model(*inputs())  # (2, 3, 4, 4); the zero weight leaves only the bias
    for c in range(3):
        for i in range(2):
            for j in range(2):
                patch_values = out[:, c, i::2, j::2]  # (B, h, w): one position inside every patch
                assert bool((patch_values == (i * 2 + j) * 3 + c).all())


def test_gradients_reach_every_parameter() -> None:
    model = perturb(tiny(qk_norm=True))
    x, t, y = inputs(batch=4)
    model(x, t, y).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_one_step_from_zero_init_moves_the_output() -> None:
    model = tiny()
    x, t, y = inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (model(x, t, y) - x).square().mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    optimizer.step()
    assert model(x, t, y).abs().sum() > 0


def test_null_class_and_label_dropout() -> None:
    model = perturb(tiny(class_dropout=1.0))
    x, t, y = inputs()
    null = torch.full_like(y, 5)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)  # eval mode: no dropout, and labels matter
    mixed = model(x, t, y, force_drop=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], uncond[0])
    torch.testing.assert_close(mixed[1], cond[1])
    model.train()
    torch.testing.assert_close(model(x, t, y), uncond)  # class_dropout=1 drops every label


def test_rope_matches_a_hand_rotation_on_a_2x2_grid() -> None:
    """head_dim 4: one frequency (1) per axis; pair (0, 2) turns by the row, pair (1, 3) by the column."""
    rope = RotaryEmbedding2D(head_dim=4)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # (B, heads, N, d)
    out = rope(x, 2, 2)
    for n, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        a, b, c, d = x[0, 0, n].tolist()
        cr, sr = torch.cos(torch.tensor(float(row))).item(), torch.sin(torch.tensor(float(row))).item()
        cc, sc = torch.cos(torch.tensor(float(col))).item(), torch.sin(torch.tensor(float(col))).item()
        expected = [a * cr - c * sr, b * cc - d * sc, c * cr + a * sr, d * cc + b * sc]
        torch.testing.assert_close(out[0, 0, n], torch.tensor(expected, dtype=torch.float64))
    cpu = torch.device("cpu")
    assert rope.tables(2, 2, cpu, torch.float64)[0] is rope.tables(2, 2, cpu, torch.float64)[0]  # cached


def test_rope_scores_depend_only_on_the_relative_offset() -> None:
    h, w, d = 3, 4, 8
    rope = RotaryEmbedding2D(head_dim=d)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, dtype=torch.float64, generator=g), torch.randn(d, dtype=torch.float64, generator=g)
    q_all = rope(q.expand(1, 1, h * w, d), h, w)[0, 0]  # (N, d): the same q at every position
    k_all = rope(k.expand(1, 1, h * w, d), h, w)[0, 0]  # (N, d)
    scores = q_all @ k_all.T  # (N, N)
    positions = [(r, c) for r in range(h) for c in range(w)]
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i, (ri, ci) in enumerate(positions):
        for j, (rj, cj) in enumerate(positions):
            by_offset.setdefault((rj - ri, cj - ci), []).append(scores[i, j].item())
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-12
    distinct = {round(v[0], 9) for v in by_offset.values()}
    assert len(distinct) == len(by_offset)  # and different offsets give different scores
    torch.testing.assert_close(q_all.norm(dim=1), q.norm().expand(h * w))  # a rotation


def test_presets_and_xl_parameter_count() -> None:
    assert swiglu_hidden(1152, 4.0) == 3072
    with torch.device("meta"):
        models = {name: build_dit(DiTConfig(preset=name), 32, 16, 1000) for name in PRESETS}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts["LightningDiT-XL/1"] == XL_PARAMS
    assert abs(counts["LightningDiT-XL/1"] / 675e6 - 1) < 0.02
    assert list(counts.values()) == sorted(counts.values())
    xl = models["LightningDiT-XL/1"]
    assert (len(xl.blocks), xl.blocks[0].attn.num_heads, xl.patch_size) == (28, 16, 1)
    with torch.device("meta"):
        qk = build_dit(DiTConfig(preset="LightningDiT-XL/1", qk_norm=True, class_dropout=0.2), 32, 16, 1000)
    assert sum(p.numel() for p in qk.parameters()) == XL_PARAMS + 28 * 2 * 72
    assert qk.y_embedder.dropout_prob == 0.2


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown preset; known: LightningDiT-T/1.*LightningDiT-XL/1"):
        DiTConfig(preset="DiT-XL/2")  # refused at load, before any training
    unchecked = DiTConfig.model_construct(preset="DiT-XL/2", qk_norm=False, class_dropout=0.1)
    with pytest.raises(ValueError, match=r"dit\.preset='DiT-XL/2'.*LightningDiT-T/1.*LightningDiT-XL/1"):
        build_dit(unchecked, 32, 16, 1000)

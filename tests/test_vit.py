"""Patches, position codes and the ViT classifier."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minidit.vit import (
    VIT_CONFIGS,
    Block,
    PatchEmbed,
    ViT,
    ViTConfig,
    attention_rollout,
    make_vit,
    patchify,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    unpatchify,
)


def test_patchify_cuts_row_major_patches_and_unpatchify_inverts_it():
    torch.manual_seed(0)
    B, C, H, W, P = 2, 3, 8, 12, 4
    x = torch.randn(B, C, H, W)
    tokens = patchify(x, P)
    assert tokens.shape == (B, (H // P) * (W // P), P * P * C)
    for r in range(H // P):
        for c in range(W // P):
            patch = x[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P]  # [B, C, P, P]
            expected = patch.permute(0, 2, 3, 1).reshape(B, -1)  # (row, column, channel)
            torch.testing.assert_close(tokens[:, r * (W // P) + c], expected)
    torch.testing.assert_close(unpatchify(tokens, P, H, W), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(x, 5)


def test_linear_and_conv_patch_embeddings_are_the_same_map():
    torch.manual_seed(0)
    P, C, D = 4, 3, 8
    linear, conv = PatchEmbed(P, C, D, kind="linear"), PatchEmbed(P, C, D, kind="conv")
    with torch.no_grad():  # conv weight [D, C, P, P] -> columns ordered (row, column, channel)
        linear.proj.weight.copy_(conv.proj.weight.permute(0, 2, 3, 1).reshape(D, P * P * C))
        linear.proj.bias.copy_(conv.proj.bias)
    x = torch.randn(2, C, 12, 8)
    torch.testing.assert_close(linear(x), conv(x))


def test_sincos_code_matches_its_formula():
    D, gh, gw = 16, 3, 5
    code = sincos_pos_embed_2d(D, gh, gw)
    assert code.shape == (gh * gw, D)
    quarter = D // 4
    for r in range(gh):
        for c in range(gw):
            expected = []
            for pos in (c, r):  # the column code first, then the row code
                omega = [1 / 10000 ** (2 * i / (D / 2)) for i in range(quarter)]
                expected += [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]
            torch.testing.assert_close(code[r * gw + c], torch.tensor(expected))


def test_sincos_inner_products_depend_only_on_offset():
    # sin a sin b + cos a cos b = cos(a - b): <E(p), E(q)> is a function of p - q
    e = sincos_pos_embed_1d(32, torch.arange(20))
    gram = e @ e.T
    for offset in range(-5, 6):
        diag = torch.diagonal(gram, offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-5, rtol=0)


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = Block(16, 4)
    x = torch.randn(2, 5, 16)
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))
    assert block.mlp[1].approximate == "tanh"


@pytest.mark.parametrize("pool,pos_embed", [("cls", "learned"), ("mean", "sincos"), ("cls", "sincos")])
def test_vit_learns_a_tiny_task(pool, pos_embed):
    # label = whether the bright square sits in the top or bottom half: needs positions
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                    num_classes=2, pool=pool, pos_embed=pos_embed)
    model = ViT(cfg)
    y = torch.arange(32) % 2
    x = -torch.ones(32, 1, 8, 8)
    for i in range(32):
        row, col = 4 * int(y[i]) + i % 3, (i * 5) % 6
        x[i, 0, row : row + 2, col : col + 2] = 1.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(2), abs=1e-4)  # zero head: uniform probabilities
    assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_presets_and_bad_inputs():
    assert set(VIT_CONFIGS) >= {"vit-mnist", "vit-cifar10"}
    model = make_vit("vit-mnist", depth=1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="vit-mnist"):
        make_vit("vit-huge")
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="max")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_returns_each_blocks_attention_and_the_same_logits(pool):
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=4, hidden_size=16, depth=3, num_heads=2, pool=pool)).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    logits, maps = model(x, return_attention=True)
    torch.testing.assert_close(logits, model(x))
    L = 4 + (pool == "cls")
    assert len(maps) == 3 and all(A.shape == (5, 2, L, L) for A in maps)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(5, 2, L, dtype=torch.float64))
    # the first block's weights are softmax(QK^T/sqrt(d)) of its normalised input tokens
    z = model.patch_embed(x)
    if pool == "cls":
        z = torch.cat([model.cls_token.expand(5, -1, -1), z], dim=1)
    _, want = model.blocks[0].attn(model.blocks[0].norm1(z + model.pos_embed), return_weights=True)
    torch.testing.assert_close(maps[0], want)


def test_attention_rollout_multiplies_the_residual_averaged_maps():
    g = torch.Generator().manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    eye = torch.eye(4, dtype=torch.float64)
    bars = [0.5 * A.mean(1) + 0.5 * eye for A in maps]
    R = attention_rollout(maps)
    torch.testing.assert_close(R, bars[2] @ bars[1] @ bars[0])  # the last block on the left
    torch.testing.assert_close(R.sum(-1), torch.ones(2, 4, dtype=torch.float64))  # still a mixing matrix
    # attention that keeps every token to itself rolls out to the identity
    torch.testing.assert_close(attention_rollout([eye.expand(2, 3, 4, 4)] * 2), eye.expand(2, 4, 4))
    with pytest.raises(ValueError, match="maps"):
        attention_rollout([torch.ones(2, 4, 4)])

"""Tutorial 12's checks: they accept the reference solutions and name the classic mistakes of a
masked cross-attention (mask unused, inverted, filled with 0, applied after the softmax) and of
MMDiT's joint attention (streams apart, cross-attention only, mask unused or not extended, bad split)."""

from __future__ import annotations

import math

import pytest
import torch

from minidit import exercises as ex
from minidit.attention import check_key_mask, explicit_attention
from minidit.text_blocks import MMDiTBlock

from exercise_helpers import fails as _fails


# ----------------------------------------------------------------------------------------
# The reference solutions of the notebook, with switches for the classic mistakes


def masked_cross_attention(q, k, v, mask, fill="-inf", use_mask=True, invert=False, after=False, scale="sqrt_d"):
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / {"sqrt_d": math.sqrt(d), "d": d, "none": 1.0}[scale]  # [B, H, N, L]
    keep = ~mask if invert else mask
    if use_mask and not after:
        scores = scores.masked_fill(~keep[:, None, None, :], {"-inf": float("-inf"), "0": 0.0}[fill])
    weights = scores.softmax(dim=-1)
    if after:
        weights = weights * keep[:, None, None, :]
    return weights @ v


def joint_attention(qkv_x, qkv_c, mask, mode="joint", extend=True, split="right"):
    (qx, kx, vx), (qc, kc, vc) = qkv_x, qkv_c
    B, L, N = mask.shape[0], qc.shape[2], qx.shape[2]
    if mode == "separate":
        return masked_cross_attention(qx, kx, vx, mask.new_ones(B, N)), masked_cross_attention(qc, kc, vc, mask)
    if mode == "cross":
        return masked_cross_attention(qx, kc, vc, mask), masked_cross_attention(qc, kc, vc, mask)
    q, k, v = (torch.cat([c, x], dim=2) for c, x in zip((qc, kc, vc), (qx, kx, vx)))
    joint = torch.cat([mask, mask.new_ones(B, N)], dim=1) if extend else torch.cat([mask, mask.new_zeros(B, N)], 1)
    out = masked_cross_attention(q, k, v, joint, use_mask=mode != "no mask")
    return (out[:, :, L:], out[:, :, :L]) if split == "right" else (out[:, :, :N], out[:, :, N:])


def test_checks_accept_the_reference_solutions(capsys):
    ex.check_masked_cross_attention(masked_cross_attention)
    ex.check_joint_attention(joint_attention)
    assert capsys.readouterr().out.count("correct ✓") == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"use_mask": False}, ["padding is attended", "-inf"]),
    ({"invert": True}, ["NaN", "inverted"]),
    ({"fill": "0"}, ["not -inf", "exp(0) = 1"]),
    ({"after": True}, ["zeroed after the softmax"]),
    ({"scale": "none"}, ["wrong scale", "sqrt(d)"]),
    ({"scale": "d"}, ["wrong scale", "not d"]),
])
def test_check_masked_cross_attention_names_the_mistake(kwargs, words):
    _fails(ex.check_masked_cross_attention, lambda q, k, v, m: masked_cross_attention(q, k, v, m, **kwargs), *words)


def test_check_masked_cross_attention_catches_a_padding_leak_the_values_alone_miss():
    # a function right on the check's inputs but reading the padded slots elsewhere fails the second test
    def leaky(q, k, v, mask):
        out = masked_cross_attention(q, k, v, mask)
        return out + float(((k * ~mask[:, None, :, None]).abs() > 100).any())  # reads a padded key

    _fails(ex.check_masked_cross_attention, leaky, "padded")


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "separate"}, ["only to image tokens", "join"]),
    ({"mode": "cross"}, ["only to the words", "cross-attention"]),
    ({"mode": "no mask"}, ["padding is attended", "extend"]),
    ({"extend": False}, ["hides the image keys", "[m; 1]"]),
    ({"split": "wrong"}, ["split at the wrong place"]),
])
def test_check_joint_attention_names_the_mistake(kwargs, words):
    _fails(ex.check_joint_attention, lambda x, c, m: joint_attention(x, c, m, **kwargs), *words)


def test_check_joint_attention_wants_a_pair():
    _fails(ex.check_joint_attention, lambda x, c, m: joint_attention(x, c, m)[0], "return a pair")


def test_the_reference_joint_attention_is_the_library_block_attention():
    # the MMDiT block's own attention, read off its weights, is what the exercise computes
    torch.manual_seed(0)
    block = MMDiTBlock(16, 2, backend="explicit").double()
    x, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    s, mask = torch.randn(2, 16, dtype=torch.float64), torch.tensor([[True, True, False], [True, False, False]])
    mod_x, mod_c = block.image.modulation(s).chunk(6, 1), block.text.modulation(s).chunk(6, 1)
    qkv_x, qkv_c = block.image.qkv(x, mod_x[0], mod_x[1], 2), block.text.qkv(c, mod_c[0], mod_c[1], 2)
    o_x, o_c = joint_attention(qkv_x, qkv_c, mask)
    q, k, v = (torch.cat([a, b], 2) for a, b in zip(qkv_c, qkv_x))
    out, _ = explicit_attention(q, k, v, check_key_mask(torch.cat([mask, mask.new_ones(2, 5)], 1), 2, 8))
    torch.testing.assert_close(torch.cat([o_c, o_x], 2), out)

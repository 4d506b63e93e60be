"""Tutorial 04's checks: they accept the reference solutions and name the classic mistakes of
multi-head attention (scale, softmax, heads) and of patchify (patch order, pixel order, shape)."""

from __future__ import annotations

import math

import pytest
import torch

from minidit import exercises as ex
from minidit.attention import Attention
from minidit.vit import patchify as library_patchify

from exercise_helpers import fails as _fails


# ----------------------------------------------------------------------------------------
# The reference solutions of the notebook, with switches for the classic mistakes


def multi_head_attention(x, attn, scale="sqrt_d", softmax=True, softmax_dim=-1, split="right",
                         merge="right", proj=True):
    B, L, D = x.shape
    H = attn.num_heads
    d = D // H
    q, k, v = attn.qkv(x).split(D, dim=-1)  # 3 x [B, L, D]
    if split == "right":
        q, k, v = (u.reshape(B, L, H, d).transpose(1, 2) for u in (q, k, v))  # [B, H, L, d]
    else:
        q, k, v = (u.reshape(B, H, L, d) for u in (q, k, v))
    divisor = {"sqrt_d": math.sqrt(d), "d": d, "sqrt_D": math.sqrt(D), "none": 1.0}[scale]
    scores = q @ k.transpose(-2, -1) / divisor  # [B, H, L, L]
    weights = scores.softmax(dim=softmax_dim) if softmax else scores
    out = weights @ v  # [B, H, L, d]
    out = out.transpose(1, 2).reshape(B, L, D) if merge == "right" else out.reshape(B, L, D)
    return (attn.proj(out) if proj else out), weights


def patchify(x, P, order="right"):
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // P, P, W // P, P)  # [B, C, h, P, w, P]
    dims = {"right": (0, 2, 4, 3, 5, 1), "columns_first": (0, 4, 2, 3, 5, 1),
            "channel_first": (0, 2, 4, 1, 3, 5), "transposed_patch": (0, 2, 4, 5, 3, 1)}[order]
    return x.permute(*dims).reshape(B, (H // P) * (W // P), P * P * C)


# ----------------------------------------------------------------------------------------
# check_attention


def test_the_reference_attention_equals_the_library_on_both_backends():
    torch.manual_seed(0)
    attn = Attention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    out, weights = multi_head_attention(x, attn)
    torch.testing.assert_close(out, attn(x))  # sdpa backend
    attn.backend = "explicit"
    torch.testing.assert_close(out, attn(x))
    torch.testing.assert_close(weights, attn(x, return_weights=True)[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))


def test_check_attention_accepts_the_reference(capsys):
    ex.check_attention(multi_head_attention)
    assert "correct" in capsys.readouterr().out


def test_check_attention_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    ex.check_attention(multi_head_attention)
    torch.testing.assert_close(torch.rand(3), want)


@pytest.mark.parametrize("kwargs, words", [
    ({"scale": "d"}, ["wrong scale", "sqrt(d)"]),
    ({"scale": "sqrt_D"}, ["wrong scale", "head width"]),
    ({"scale": "none"}, ["wrong scale", "not divided"]),
    ({"softmax": False}, ["no softmax"]),
    ({"softmax_dim": -2}, ["softmax over the queries"]),
    ({"split": "mixed"}, ["heads mixed up", "transpose(1, 2)"]),
    ({"merge": "mixed"}, ["heads mixed up when merging", "the output"]),
    ({"proj": False}, ["output projection"]),
])
def test_check_attention_names_the_mistake(kwargs, words):
    _fails(ex.check_attention, lambda x, attn: multi_head_attention(x, attn, **kwargs), *words)


def test_check_attention_names_shapes_and_pairs():
    def first_head_only(x, attn):
        out, weights = multi_head_attention(x, attn)
        return out, weights[:, 0]

    def first_token_only(x, attn):
        out, weights = multi_head_attention(x, attn)
        return out[:, 0], weights

    _fails(ex.check_attention, lambda x, attn: multi_head_attention(x, attn)[0], "return a pair")
    _fails(ex.check_attention, first_head_only, "has shape (3, 5, 5)", "[B, H, L, L]")
    _fails(ex.check_attention, first_token_only, "the output [B, L, D] has shape (3, 24)")

    def not_done(x, attn):
        raise NotImplementedError()

    _fails(ex.check_attention, not_done, "not implemented")


def test_check_attention_catches_an_unnamed_error():
    def off(x, attn):
        out, weights = multi_head_attention(x, attn)
        return out + 1e-3, weights

    message = _fails(ex.check_attention, off, "the output [B, L, D] is wrong", "largest error")
    assert "heads" not in message and "projection" not in message


# ----------------------------------------------------------------------------------------
# check_patchify


def test_the_reference_patchify_equals_the_library():
    x = torch.randn(3, 2, 12, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(patchify(x, 4), library_patchify(x, 4))


def test_check_patchify_accepts_the_reference(capsys):
    ex.check_patchify(patchify)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("order, words", [
    ("columns_first", ["wrong patch order", "row by row"]),
    ("channel_first", ["channel comes first"]),
    ("transposed_patch", ["rows and columns are swapped"]),
])
def test_check_patchify_names_the_wrong_order(order, words):
    _fails(ex.check_patchify, lambda x, P: patchify(x, P, order), *words)


def test_check_patchify_names_a_plain_reshape_and_a_wrong_shape():
    def strips(x, P):
        B, C, H, W = x.shape
        return x.reshape(B, (H // P) * (W // P), P * P * C)

    _fails(ex.check_patchify, strips, "without permute", "not a P x P square")
    _fails(ex.check_patchify, lambda x, P: patchify(x, P).transpose(1, 2),
           "has shape (2, 48, 6)", "L = (H/P)(W/P) = 6")

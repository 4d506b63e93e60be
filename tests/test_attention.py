"""The fused (SDPA) and explicit attention paths agree, and attention behaves as its formula says."""

from __future__ import annotations

import pytest
import torch

from minidit.attention import Attention, CrossAttention, attend, explicit_attention


def _forward_and_grads(module, inputs, backend):
    """Output and the gradients of a fixed random projection of it w.r.t. inputs and weights."""
    module.backend = backend
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    module.zero_grad()
    out = module(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * probe).sum().backward()
    grads = [x.grad for x in inputs] + [p.grad.clone() for p in module.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_sdpa_and_explicit_agree_forward_and_backward(kind):
    torch.manual_seed(0)
    B, L, Lc, D, H = 3, 10, 5, 32, 4
    x = torch.randn(B, L, D, dtype=torch.float64)
    if kind == "self":
        module, inputs = Attention(D, H).double(), [x]
    else:
        module, inputs = CrossAttention(D, H, context_dim=24).double(), [x, torch.randn(B, Lc, 24).double()]
    out_fused, grads_fused = _forward_and_grads(module, inputs, "sdpa")
    out_explicit, grads_explicit = _forward_and_grads(module, inputs, "explicit")
    torch.testing.assert_close(out_fused, out_explicit)
    assert len(grads_fused) == len(grads_explicit) > 2
    for g_fused, g_explicit in zip(grads_fused, grads_explicit):
        torch.testing.assert_close(g_fused, g_explicit)


def test_explicit_attention_matches_a_loop_over_queries():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    out, weights = explicit_attention(q, k, v)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                scores = torch.stack([q[b, h, i] @ k[b, h, j] for j in range(6)]) / 8**0.5
                w = scores.exp() / scores.exp().sum()
                torch.testing.assert_close(weights[b, h, i], w)
                torch.testing.assert_close(out[b, h, i], (w[:, None] * v[b, h]).sum(0))
    torch.testing.assert_close(attend(q, k, v, "sdpa"), out)


def test_returned_weights_are_stochastic_and_output_unchanged():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 7, 16)
    out, weights = attn(x, return_weights=True)
    assert weights.shape == (2, 2, 7, 7)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 7))
    torch.testing.assert_close(out, attn(x))


def test_self_attention_is_permutation_equivariant():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x, perm = torch.randn(2, 9, 16), torch.randperm(9)
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm])


def test_cross_attention_to_one_token_returns_its_projected_value():
    # softmax over a single key is 1, so every query receives W_o (W_v c + b_v) + b_o
    torch.manual_seed(0)
    D, H = 16, 4
    xattn = CrossAttention(D, H)
    x, context = torch.randn(2, 5, D), torch.randn(2, 1, D)
    value = context @ xattn.kv.weight[D:].T + xattn.kv.bias[D:]  # [B, 1, D]
    expected = xattn.proj(value).expand(2, 5, D)
    torch.testing.assert_close(xattn(x, context), expected)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend"):
        Attention(16, 4, backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        Attention(18, 4)
    with pytest.raises(ValueError, match="backend"):
        attend(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), "fast")

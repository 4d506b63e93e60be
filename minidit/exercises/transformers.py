"""Course exercises of the transformer tutorials: 04 (the Vision Transformer) and 05 (the DiT).

Each check runs the student's function and minidit's on seeded float64 inputs and raises an
`ExerciseError` that names the wrong shape or term (`minidit.exercises.grading`):

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V, per head                       [ViT; Vaswani et al.]
    modulate(x, shift, scale) = x · (1 + scale) + shift                      [DiT, Sec. 3.2, adaLN]
    ε̃ = ε(x, ∅) + s · (ε(x, y) − ε(x, ∅))                                     [CFG, Eq. 6]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from minidit.attention import Attention
from minidit.dit import modulate
from minidit.exercises.grading import F64, ExerciseError, call_student, expect_close, expect_shape, per_example
from minidit.guidance import cfg_predict
from minidit.vit import patchify


# ----------------------------------------------------------------------------------------
# Tutorial 04: the Vision Transformer


def _mha_variants(x: Tensor, attn: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Multi-head attention of `x` [B, L, D] through `attn`'s weights, right and with classic mistakes."""
    B, L, D = x.shape
    H = attn.num_heads
    d = D // H
    q, k, v = attn.qkv(x).split(D, dim=-1)  # 3 x [B, L, D]
    split = lambda u: u.reshape(B, L, H, d).transpose(1, 2)  # noqa: E731  [B, H, L, d]
    mixed = lambda u: u.reshape(B, H, L, d)  # noqa: E731  rows of tokens cut across heads
    merge = lambda o: o.transpose(1, 2).reshape(B, L, D)  # noqa: E731  [B, L, H*d]

    def run(cut=split, scale=d**-0.5, softmax=-1, unmerge=merge, proj=True):
        qh, kh, vh = cut(q), cut(k), cut(v)
        scores = qh @ kh.transpose(-2, -1) * scale  # [B, H, L, L]
        weights = scores.softmax(dim=softmax) if softmax else scores
        out = unmerge(weights @ vh)
        return (attn.proj(out) if proj else out), weights

    return {"1/d": run(scale=1 / d), "1/sqrt(D)": run(scale=D**-0.5), "none": run(scale=1.0),
            "no softmax": run(softmax=0), "softmax over queries": run(softmax=-2), "mixed heads": run(cut=mixed),
            "merge without transpose": run(unmerge=lambda o: o.reshape(B, L, D)), "no proj": run(proj=False)}


def check_attention(fn: Callable[[Tensor, nn.Module], tuple[Tensor, Tensor]]) -> None:
    """Check `fn(x, attn) -> (out [B, L, D], weights [B, H, L, L])`, multi-head self-attention with the
    weights of a `minidit.attention.Attention`: softmax(Q K^T / sqrt(d)) V per head  [Transformer, Eq. 1]."""
    name = getattr(fn, "__name__", "multi_head_attention")
    B, L, D, H = 3, 5, 24, 3  # d = 8: 1/d, 1/sqrt(d) and 1/sqrt(D) all differ
    with torch.random.fork_rng(devices=[]):  # seeded weights, the notebook's random stream untouched
        torch.manual_seed(0)
        attn = Attention(D, H, backend="explicit").to(F64)
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = call_student(name, fn, x.clone(), attn)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ExerciseError(f"{name}: return a pair (out, weights), got {type(got).__name__}")
    out, weights = got
    with torch.no_grad():
        want_out, want_weights = attn(x, return_weights=True)
        v = _mha_variants(x, attn)
    d = D // H
    expect_close(name, "the attention weights [B, H, L, L]", weights, want_weights, hints=(
        ("no softmax: the weights are the raw scores; normalise each row with softmax over the keys",
         v["no softmax"][1]),
        ("softmax over the queries (dim=-2); each row (one query) must sum to one over the keys (dim=-1)",
         v["softmax over queries"][1]),
        (f"wrong scale: you divided by d = {d}; divide the scores by sqrt(d) = sqrt({d})", v["1/d"][1]),
        (f"wrong scale: you divided by sqrt(D) = sqrt({D}), the full width; use the head width d = D/H = {d}",
         v["1/sqrt(D)"][1]),
        ("wrong scale: the scores Q K^T are not divided by sqrt(d)", v["none"][1]),
        ("heads mixed up: reshaping [B, L, D] straight to [B, H, L, d] cuts across tokens; "
         "reshape to [B, L, H, d], then transpose(1, 2)", v["mixed heads"][1])),
        shape_hint=f"one L x L matrix per example and head: [B, H, L, L] = [{B}, {H}, {L}, {L}]")
    expect_close(name, "the output [B, L, D]", out, want_out, hints=(
        ("heads mixed up when merging: [B, H, L, d] must be transposed back to [B, L, H, d] "
         "before the reshape to [B, L, D]", v["merge without transpose"][0]),
        ("the output projection W_o (attn.proj) is missing", v["no proj"][0])),
        shape_hint=f"the output has the tokens' shape [B, L, D] = [{B}, {L}, {D}]")
    print(f"{name}: correct ✓")


def check_patchify(fn: Callable[[Tensor, int], Tensor]) -> None:
    """Check `fn(x [B, C, H, W], P) -> tokens [B, L, P*P*C]`, patches in row-major order, each
    flattened as (row, column, channel), like `minidit.vit.patchify`  [ViT, Eq. 1]."""
    name = getattr(fn, "__name__", "patchify")
    B, C, H, W, P = 2, 3, 8, 12, 4  # a non-square image with colour: every order shows
    h, w = H // P, W // P
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = call_student(name, fn, x.clone(), P)
    grid = x.reshape(B, C, h, P, w, P)  # [B, C, h, P, w, P]
    order = lambda *dims: grid.permute(0, *dims).reshape(B, h * w, P * P * C)  # noqa: E731
    expect_close(name, f"the tokens of a [{B}, {C}, {H}, {W}] image with P = {P}", got, patchify(x, P), hints=(
        ("wrong patch order: the patches run down the columns first; number them row by row "
         "(patch index = row * (W/P) + column): permute to [B, H/P, W/P, ...]", order(4, 2, 3, 5, 1)),
        ("inside each patch the channel comes first (C, P, P); flatten each patch as (row, column, channel)",
         order(2, 4, 1, 3, 5)),
        ("inside each patch rows and columns are swapped; flatten as (row, column, channel)",
         order(2, 4, 5, 3, 1)),
        ("a plain reshape without permute: each token is a strip of pixel rows, not a P x P square; "
         "reshape to [B, C, H/P, P, W/P, P] and permute", x.reshape(B, h * w, P * P * C)),
        ("a reshape without permute of [B, H, W, C]: each token is a strip, not a P x P square",
         x.permute(0, 2, 3, 1).reshape(B, h * w, P * P * C))),
        shape_hint=f"L = (H/P)(W/P) = {h * w} tokens of P*P*C = {P * P * C} numbers each")
    print(f"{name}: correct ✓")


# ----------------------------------------------------------------------------------------
# Tutorial 05: the Diffusion Transformer


def check_modulate(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """Check `fn(x [B, L, D], shift [B, D], scale [B, D]) -> x·(1 + scale) + shift`, per token  [DiT, Sec. 3.2]."""
    name = getattr(fn, "__name__", "modulate")
    g = torch.Generator().manual_seed(0)
    B, L, D = 4, 6, 8  # all different, so a wrong broadcast fails loudly
    x, shift, scale = (torch.randn(shape, generator=g, dtype=F64) for shape in [(B, L, D), (B, D), (B, D)])
    zero = torch.zeros_like(shift)
    advice = "shift and scale are [B, D] and x is [B, L, D]: give them a token axis, shift[:, None] -> [B, 1, D]"
    run = lambda s, c: call_student(name, fn, x.clone(), s.clone(), c.clone(), on_error=advice)  # noqa: E731
    expect_shape(name, "the output", run(shift, scale), x.shape, advice)
    expect_close(name, "the scale term x·(1 + scale) (tried with shift = 0)", run(zero, scale), modulate(x, zero, scale),
            hints=(("you multiplied by scale; adaLN multiplies by (1 + scale), so scale = 0 is plain LN",
                    x * scale[:, None]),
                   ("the scale term lost x: compute x·(1 + scale)", (1 + scale[:, None]).expand_as(x)),
                   ("shift and scale are swapped", x * (1 + zero[:, None]) + scale[:, None])))
    expect_close(name, "the shift term (tried with scale = 0: the output must be x + shift)", run(shift, zero),
            modulate(x, shift, zero),
            hints=(("you multiplied by shift; shift is added", x * shift[:, None]),
                   ("shift and scale are swapped", x * (1 + shift[:, None])),
                   ("with scale = 0 you returned 0·x + shift; multiply by (1 + scale)",
                    shift[:, None].expand_as(x))))
    expect_close(name, "x·(1 + scale) + shift", run(shift, scale), modulate(x, shift, scale),
            hints=(("shift is added before scaling; adaLN is x·(1 + scale) + shift",
                    (x + shift[:, None]) * (1 + scale[:, None])),))
    print(f"{name}: correct ✓")


class _CondProbe(nn.Module):
    """A fixed stand-in for a class-conditional network `model(x, t, y)` that records its labels."""

    def __init__(self, null_label: int):
        super().__init__()
        self.null_label, self.labels = null_label, []

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ExerciseError("the model was called without labels; pass y, and the null label "
                                "torch.full_like(y, null_label) for the unconditional prediction")
        self.labels.append(y.detach().clone())
        label = per_example(y.to(F64) + 1, x)  # every class (and the null label) moves the output differently
        return 0.8 * torch.sin(3 * x + 0.001 * per_example(t.to(F64), x)) + 0.3 * torch.cos(label * x)


def check_cfg(fn: Callable[..., Tensor]) -> None:
    """Check `fn(model, x, t, y, s, null_label) -> ε(x, ∅) + s·(ε(x, y) − ε(x, ∅))`  [CFG, Eq. 6]."""
    name = getattr(fn, "__name__", "cfg_predict")
    g = torch.Generator().manual_seed(0)
    B, K = 6, 10
    x = torch.randn(B, 1, 4, 4, generator=g, dtype=F64)
    t = 1000 * torch.rand(B, generator=g, dtype=F64)
    y = torch.randint(0, K, (B,), generator=g)
    model = _CondProbe(K)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, K))
    for s in (3.0, 0.0, 1.0):  # s = 3 first: there every known mistake differs from every other
        model.labels.clear()
        got = call_student(name, fn, model, x.clone(), t.clone(), y.clone(), s, K)
        seen = torch.cat(model.labels) if model.labels else torch.empty(0, dtype=torch.long)
        if not bool((seen == K).any()):
            raise ExerciseError(f"{name}: the model never saw the null label {K}; the unconditional "
                                f"prediction is model(x, t, full_like(y, null_label))")
        if not bool((seen != K).any()):
            raise ExerciseError(f"{name}: the model never saw the class labels y; the conditional prediction "
                                f"is model(x, t, y)")
        what = f"the guided prediction at s = {s:g}" + {0.0: " (must be the unconditional ε(x, ∅))",
                                                         1.0: " (must be the conditional ε(x, y))"}.get(s, "")
        expect_close(name, what, got, cfg_predict(model, x, t, y, s, K),
                hints=(("the conditional and unconditional terms are swapped: it is ε(∅) + s·(ε(y) − ε(∅))",
                        cond + s * (uncond - cond)),
                       ("you scaled the conditional prediction only; add ε(∅) + s·(ε(y) − ε(∅))", s * cond),
                       ("it is ε(∅) + s·(ε(y) − ε(∅)), not ε(∅) + s·ε(y)", uncond + s * cond),
                       ("you returned the conditional prediction: the scale s is not used", cond),
                       ("you returned the unconditional prediction: the scale s is not used", uncond)),
                shape_hint="return one prediction per input, x's shape (split the doubled batch in two)")
    print(f"{name}: correct ✓")

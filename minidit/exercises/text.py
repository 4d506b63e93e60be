"""Course exercises of tutorial 12 (text to image): the two ways a DiT reads a caption.

Each check runs the student's function and minidit's (`minidit.attention.explicit_attention`) on
seeded float64 inputs with padded captions, and raises an `ExerciseError` that names the mistake:

    masked cross-attention   O = softmax(Q Kᵀ/√d + M) V,  M_ij = 0 on real words, −∞ on padding
                             (image queries Q [B, H, N, d]; word keys and values [B, H, L, d])
    joint attention          [O_c; O_x] = Attn([Q_c; Q_x], [K_c; K_x], [V_c; V_x]; key mask [m; 1])
                             (one attention over the joined text-then-image sequence)  [SD3, Sec. 4]
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minidit.attention import check_key_mask, explicit_attention
from minidit.exercises.grading import F64, ExerciseError, call_student, expect_close

B, H, N, L, d = 3, 2, 5, 4, 8  # 5 image tokens, captions of 4 slots, two heads of width 8


def _inputs(seed: int) -> tuple[Tensor, ...]:
    """Seeded Q, K, V of image tokens [B, H, N, d] and of words [B, H, L, d], and a padding mask [B, L]
    (the captions hold 4, 2 and 1 real words: padding at the end, as the tokenizer writes it)."""
    g = torch.Generator().manual_seed(seed)
    qkv_x = tuple(torch.randn(B, H, N, d, generator=g, dtype=F64) for _ in range(3))
    qkv_c = tuple(torch.randn(B, H, L, d, generator=g, dtype=F64) for _ in range(3))
    mask = torch.arange(L)[None, :] < torch.tensor([4, 2, 1])[:, None]  # [B, L], True on real words
    return qkv_x, qkv_c, mask


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None,
               fill: float = float("-inf"), renormalise: bool = True, zero_after: Tensor | None = None) -> Tensor:
    """softmax(Q Kᵀ · scale + M) V with the mistakes a student makes, for the hints."""
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], fill)
    w = scores.softmax(-1)
    if zero_after is not None:  # weights zeroed after the softmax
        w = w * zero_after[:, None, None, :]
        w = w / w.sum(-1, keepdim=True) if renormalise else w
    return w @ v


def check_masked_cross_attention(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> None:
    """Check `fn(q [B, H, N, d], k [B, H, L, d], v [B, H, L, d], mask [B, L] bool) -> [B, H, N, d]`:
    cross-attention from image tokens to words in which padding (mask False) gets zero weight."""
    name = getattr(fn, "__name__", "masked_cross_attention")
    (q, _, _), (_, k, v), mask = _inputs(0)
    got = call_student(name, fn, q.clone(), k.clone(), v.clone(), mask.clone())
    if isinstance(got, Tensor) and got.shape == q.shape and not bool(torch.isfinite(got).all()):
        raise ExerciseError(f"{name}: the output holds NaN: some query saw no key at all. Is the mask inverted? "
                            "True marks a real word: hide the keys where mask is False (scores.masked_fill(~mask, "
                            "-inf))")
    want, _ = explicit_attention(q, k, v, check_key_mask(mask, B, L))
    expect_close(name, "the output [B, H, N, d]", got, want, hints=(
        ("padding is attended: the mask is not used; set the scores of padded keys (mask False) to -inf "
         "before the softmax", _attention(q, k, v, None)),
        ("padded scores set to 0, not -inf: exp(0) = 1, so padding still gets weight; use -inf",
         _attention(q, k, v, mask, fill=0.0)),
        ("the weights of padding are zeroed after the softmax but the rest no longer sum to one; "
         "mask the scores before the softmax instead", _attention(q, k, v, None, zero_after=mask.to(F64),
                                                                  renormalise=False)),
        (f"wrong scale: the scores Q K^T are divided by sqrt(d) = sqrt({d})", _attention(q, k, v, mask, 1.0)),
        (f"wrong scale: divide by sqrt(d) = sqrt({d}), not d", _attention(q, k, v, mask, 1 / d))),
        shape_hint=f"one output per image token and head: [B, H, N, d] = [{B}, {H}, {N}, {d}]")
    # what sits in a padded slot must not matter
    k2 = torch.where(mask[:, None, :, None], k, 1e3 * torch.ones_like(k))
    v2 = torch.where(mask[:, None, :, None], v, -1e3 * torch.ones_like(v))
    again = call_student(name, fn, q.clone(), k2, v2, mask.clone())
    expect_close(name, "the output after the padded keys and values were changed", again, want, hints=(
        ("changing what the padded slots hold changed the output: padding must get exactly zero weight",
         again.detach().to(F64)),))
    print(f"{name}: correct ✓")


def check_joint_attention(fn: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Check `fn(qkv_x, qkv_c, mask) -> (o_x [B, H, N, d], o_c [B, H, L, d])`: MMDiT's joint attention,
    one attention over the text tokens followed by the image tokens, padding hidden from every query."""
    name = getattr(fn, "__name__", "joint_attention")
    qkv_x, qkv_c, mask = _inputs(1)
    got = call_student(name, fn, tuple(u.clone() for u in qkv_x), tuple(u.clone() for u in qkv_c), mask.clone())
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ExerciseError(f"{name}: return a pair (o_x, o_c), got {type(got).__name__}")
    o_x, o_c = got
    q, k, v = (torch.cat([c, x], dim=2) for c, x in zip(qkv_c, qkv_x))  # [c; x]: [B, H, L + N, d]
    joint = torch.cat([mask, mask.new_ones(B, N)], dim=1)  # image keys always seen
    out, _ = explicit_attention(q, k, v, check_key_mask(joint, B, L + N))
    want_c, want_x = out[:, :, :L], out[:, :, L:]
    (qx, kx, vx), (qc, kc, vc) = qkv_x, qkv_c
    separate_x = _attention(qx, kx, vx, None)  # each stream on its own: no text read at all
    cross_x = _attention(qx, kc, vc, mask)  # image reads text only: cross-attention, not joint
    no_mask = _attention(q, k, v, None)
    expect_close(name, "o_x, the image tokens' output [B, H, N, d]", o_x, want_x, hints=(
        ("the image tokens attend only to image tokens: join the sequences [c; x] along the tokens and "
         "attend once", separate_x),
        ("the image tokens attend only to the words, as in cross-attention (or the joint mask hides the "
         "image keys: it is [m; 1], every image token stays visible); in joint attention they attend to "
         "the whole joined sequence, words and image", cross_x),
        ("padding is attended: extend the text mask with True for every image token and hide the rest",
         no_mask[:, :, L:]),
        ("text and image outputs are swapped, or split at the wrong place: the text comes first, "
         "o_c = out[:, :, :L], o_x = out[:, :, L:]", out[:, :, :N])),
        shape_hint=f"[B, H, N, d] = [{B}, {H}, {N}, {d}]")
    expect_close(name, "o_c, the words' output [B, H, L, d]", o_c, want_c, hints=(
        ("the words attend only to words: in joint attention text tokens read the image too",
         _attention(qc, kc, vc, mask)),
        ("padding is attended: hide the padded words from every query, text and image",
         no_mask[:, :, :L])),
        shape_hint=f"[B, H, L, d] = [{B}, {H}, {L}, {d}]")
    print(f"{name}: correct ✓")

"""A small text encoder written out: a word-level tokenizer and a pre-norm transformer over its tokens.

The encoder side of the transformer, for captions a DiT reads [Transformer, Sec. 3.1]. A caption
becomes L token ids (words of a fixed vocabulary; unknown words map to `<unk>`; short captions are
padded with `<pad>`), each id an embedding, plus a learned embedding of its position; pre-norm blocks
(`minidit.vit.Block`, the ViT's own) mix the tokens, with padding hidden from every query by a key
mask, and a final LayerNorm gives the text tokens c_1..c_L that a DiT reads by cross-attention or
joint attention. Their mean over the real tokens is the pooled text vector:

    e_i = E_tok[w_i] + E_pos[i],   c = LN(Blocks(e; mask)) [B, L, D],   c̄ = Σ_i m_i c_i / Σ_i m_i [B, D]

Classifier-free guidance needs a "no text" input: the null caption, L copies of the `<null>` token
(`Tokenizer.null_ids`), which label dropout puts in place of a caption during training.

References: [Transformer] Vaswani et al. 2017; [CFG] Ho, Salimans 2022.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from minidit.vit import Block

PAD, UNK, NULL = 0, 1, 2
SPECIALS = ("<pad>", "<unk>", "<null>")


def words(text: str) -> list[str]:
    """Lower-case words of a caption; punctuation is dropped ("A thick seven," -> [a, thick, seven])."""
    return re.findall(r"[a-z0-9]+", text.lower())


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary: ids 0, 1, 2 are `<pad>`, `<unk>`, `<null>`.

    Args:
        vocabulary: the words, in id order from 3 (e.g. `Tokenizer.fit(captions).vocabulary`).
        length: L, the number of tokens every caption is padded or cut to.
    """

    def __init__(self, vocabulary: list[str] | tuple[str, ...], length: int = 8):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if len(set(vocabulary)) != len(vocabulary) or set(vocabulary) & set(SPECIALS):
            raise ValueError("the vocabulary must hold distinct words and none of " + ", ".join(SPECIALS))
        self.vocabulary, self.length = tuple(vocabulary), length
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(self.vocabulary)}

    @classmethod
    def fit(cls, captions: list[str], length: int | None = None) -> Tokenizer:
        """The vocabulary of `captions` in sorted order; length: the longest caption (default)."""
        vocab = sorted({w for c in captions for w in words(c)})
        return cls(vocab, length or max(len(words(c)) for c in captions))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.vocabulary)

    def encode(self, captions: list[str] | str) -> tuple[Tensor, Tensor]:
        """Captions -> (ids [B, L] int64, mask [B, L] bool, True on real tokens).

        Unknown words become `<unk>`; captions longer than L are cut (the encoder never sees more);
        an empty caption is the null caption (`null_ids`), so it still has a token to attend to.
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        ids = torch.full((len(captions), self.length), PAD, dtype=torch.long)
        for b, text in enumerate(captions):
            tokens = [self.index.get(w, UNK) for w in words(text)][: self.length]
            if tokens:
                ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            else:  # no words: the null caption
                ids[b] = NULL
        return ids, ids != PAD

    def null_ids(self, batch: int) -> Tensor:
        """The null caption, [batch, L]: `<null>` in every position (what CFG's unconditional branch reads)."""
        return torch.full((batch, self.length), NULL, dtype=torch.long)

    def decode(self, ids: Tensor) -> list[str]:
        """ids [B, L] -> the captions as words (padding dropped; `<unk>`, `<null>` written out)."""
        names = {**{i: w for i, w in enumerate(SPECIALS)}, **{i: w for w, i in self.index.items()}}
        return [" ".join(names[int(i)] for i in row if int(i) != PAD) for row in ids]

    def to_dict(self) -> dict:
        return {"vocabulary": list(self.vocabulary), "length": self.length}


class TextEncoder(nn.Module):
    """ids [B, L] -> text tokens c [B, L, D] and the pooled vector c̄ [B, D] (module docstring).

    Args:
        vocab_size: number of token ids (specials included); length: L; dim: D;
        depth, num_heads, mlp_ratio: the transformer blocks.
    """

    def __init__(self, vocab_size: int, length: int, dim: int, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, backend: str = "sdpa"):
        super().__init__()
        self.vocab_size, self.length = vocab_size, length
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, length, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def check_ids(self, ids: Tensor) -> Tensor:
        """Raise ValueError unless ids is an integer [B, L] within the vocabulary; return its mask."""
        if ids.ndim != 2 or ids.shape[1] != self.length or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor [B, {self.length}], got {ids.dtype} "
                             f"{list(ids.shape)}")
        if ids.numel() and ids.device.type == "cpu" and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        mask = ids != PAD
        if ids.shape[0] and ids.device.type == "cpu" and not bool(mask.any(1).all()):
            raise ValueError("a caption of padding only: use the null caption (Tokenizer.null_ids) for 'no text'")
        return mask

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids [B, L] -> (c [B, L, D], c̄ [B, D], mask [B, L])."""
        mask = self.check_ids(ids)
        h = self.token_embed(ids) + self.pos_embed  # e_i = E_tok[w_i] + E_pos[i]
        for block in self.blocks:
            h = block(h, mask=mask)
        c = self.norm(h)
        m = mask.to(c.dtype)[..., None]  # [B, L, 1]
        pooled = (c * m).sum(1) / m.sum(1)  # the mean over real tokens
        return c, pooled, mask

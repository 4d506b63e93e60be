"""Parameter and GMAC counts of any model, and the DiT paper's Table 4 to check them against.

One multiply-accumulate (MAC) is a multiply and an add; a matrix product [M, K] x [K, N]
costs M K N MACs = 2 M K N floating-point operations. The DiT paper's "Gflops" are in fact
GMACs of one forward pass of one image, counting every Linear and both attention products
(Q K^T and the weighted sum of V), and nothing elementwise [DiT, Table 4]:

    MACs(DiT block) ~ L (12 D^2 + 2 L D) + 6 D^2          (qkv, proj, MLP; attention; adaLN)

We do not count by hand: `torch.utils.flop_counter.FlopCounterMode` records the flops of each
matmul the forward pass dispatches, and MACs = flops / 2. The model is built on the meta
device (shapes without storage), so even DiT-XL/2 costs no memory.

References: [DiT] Peebles, Xie 2023.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from minidit.attention import Attention, CrossAttention
from minidit.captions import caption_tokenizer
from minidit.dit import DIT_CONFIGS, TEXT_CONDITIONINGS, DiT, DiTConfig
from minidit.text import NULL
from minidit.text_blocks import MMDiTBlock
from minidit.unet import UNET_CONFIGS, UNet, UNetConfig
from minidit.vit import VIT_CONFIGS, ViT, ViTConfig

# name: (parameters in millions, Gflops = GMACs), from [DiT, Table 4]
PAPER_TABLE4 = {
    "DiT-S/2": (33, 6.06), "DiT-S/4": (33, 1.41), "DiT-S/8": (33, 0.36),
    "DiT-B/2": (130, 23.01), "DiT-B/4": (130, 5.56), "DiT-B/8": (131, 1.42),
    "DiT-L/2": (458, 80.71), "DiT-L/4": (458, 19.70), "DiT-L/8": (459, 5.01),
    "DiT-XL/2": (675, 118.64), "DiT-XL/4": (675, 29.05), "DiT-XL/8": (676, 7.39),
}  # fmt: skip


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as a fixed position code are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, *inputs, **kwargs) -> int:
    """MACs of one forward pass `model(*inputs, **kwargs)`, from FlopCounterMode's flops / 2.

    Works on any device; pass a model and inputs on the meta device to count without memory.
    minidit's attention layers are switched to their explicit path while counting, because
    the fused CPU kernel of `F.scaled_dot_product_attention` is invisible to the counter.
    """
    layers = [m for m in model.modules() if isinstance(m, (Attention, CrossAttention, MMDiTBlock))]
    backends = [m.backend for m in layers]
    try:
        for m in layers:
            m.backend = "explicit"
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        for m, backend in zip(layers, backends):
            m.backend = backend
    return counter.get_total_flops() // 2


def profile(config: DiTConfig | UNetConfig | ViTConfig, batch_size: int = 1) -> tuple[int, int]:
    """(parameters, MACs of a forward pass of `batch_size` inputs) of a DiT, U-Net or ViT config,
    built on the meta device so that no weight is ever allocated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with torch.device("meta"):
        if isinstance(config, (DiTConfig, UNetConfig)):  # the same (x, t, y) signature
            model = (DiT if isinstance(config, DiTConfig) else UNet)(config).eval()
            x = torch.empty(batch_size, config.in_channels, config.input_size, config.input_size)
            t = torch.zeros(batch_size)
            y = torch.zeros(batch_size, dtype=torch.long) if config.num_classes else None
            if getattr(config, "reads_text", False):  # a caption's token ids [B, L] (the null caption)
                y = torch.full((batch_size, config.text_length), NULL, dtype=torch.long)
            inputs = (x, t, y)
        elif isinstance(config, ViTConfig):
            model = ViT(config).eval()
            inputs = (torch.empty(batch_size, config.in_channels, config.image_size, config.image_size),)
        else:
            raise TypeError(f"config must be a DiTConfig, UNetConfig or ViTConfig, got {type(config).__name__}")
        return count_params(model), count_macs(model, *inputs)


def profile_named(name: str, batch_size: int = 1, **overrides) -> tuple[int, int]:
    """`profile` of a preset of `DIT_CONFIGS`, `UNET_CONFIGS` or `VIT_CONFIGS`, fields overridden by keyword."""
    presets = {**DIT_CONFIGS, **UNET_CONFIGS, **VIT_CONFIGS}
    if name not in presets:
        raise ValueError(f"unknown config {name!r}; valid names: {list(presets)}")
    if overrides.get("conditioning") in TEXT_CONDITIONINGS and "text_vocab" not in overrides:
        # a text variant of a label DiT: it reads the MNIST captions (minidit.captions) instead of labels
        tok = caption_tokenizer()
        overrides = {"num_classes": 0, "text_vocab": tok.vocab_size, "text_length": tok.length, **overrides}
    return profile(replace(presets[name], **overrides), batch_size)


def paper_table() -> str:
    """Markdown table of our counts for the 12 DiT configs beside the paper's Table 4."""
    lines = [
        "| model | params (M) | paper | diff | GMACs | paper Gflops | diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (paper_m, paper_g) in PAPER_TABLE4.items():
        params, macs = profile_named(name)
        m, g = params / 1e6, macs / 1e9
        lines.append(
            f"| {name} | {m:.2f} | {paper_m} | {100 * (m / paper_m - 1):+.2f}% "
            f"| {g:.2f} | {paper_g:.2f} | {100 * (g / paper_g - 1):+.2f}% |"
        )
    return "\n".join(lines)

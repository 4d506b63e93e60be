"""Parameter and GMAC counts: closed forms for single layers, and the DiT paper's Table 4."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from minidit.attention import Attention
from minidit.cli import main
from minidit.dit import DIT_CONFIGS, DiT, DiTConfig
from minidit.flops import PAPER_TABLE4, count_macs, count_params, profile, profile_named


def test_linear_macs_and_params_are_their_closed_forms():
    layer = nn.Linear(7, 5)
    assert count_params(layer) == 7 * 5 + 5
    assert count_macs(layer, torch.zeros(3, 11, 7)) == 3 * 11 * 7 * 5


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_macs_count_both_attention_products(device):
    # qkv and output projections: 4 L D^2; Q K^T and weights @ V: 2 L^2 D (per image)
    B, L, D, H = 2, 9, 16, 4
    with torch.device(device):
        attn, x = Attention(D, H), torch.zeros(B, L, D)
    assert count_macs(attn, x) == B * (4 * L * D * D + 2 * L * L * D)
    assert attn.backend == "sdpa"  # restored after counting


def test_meta_count_equals_real_count():
    cfg = DiTConfig(8, 2, 2, 32, 2, 4, num_classes=3)
    real = DiT(cfg)
    macs = count_macs(real, torch.zeros(2, 2, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert profile(cfg, batch_size=2) == (count_params(real), macs)


@pytest.mark.parametrize("name", list(PAPER_TABLE4))
def test_dit_configs_match_paper_table4(name):
    paper_params_m, paper_gflops = PAPER_TABLE4[name]
    params, macs = profile_named(name)
    assert params / 1e6 == pytest.approx(paper_params_m, rel=0.01)
    assert macs / 1e9 == pytest.approx(paper_gflops, rel=0.01)


@pytest.mark.parametrize(
    "conditioning,paper_gflops",
    [("in-context", 119.4), ("cross-attention", 137.6), ("adaln", 118.6), ("adaln-zero", 118.6)],
)
def test_conditioning_variants_match_paper_figure5(conditioning, paper_gflops):
    # the legend of [DiT, Fig. 5] gives the cost of each XL/2 block design
    _, macs = profile(replace(DIT_CONFIGS["DiT-XL/2"], conditioning=conditioning))
    assert macs / 1e9 == pytest.approx(paper_gflops, rel=0.01)


def test_cli_prints_counts(capsys):
    assert main(["flops", "DiT-S/8"]) == 0
    assert "M parameters" in capsys.readouterr().out
    assert main(["flops", "DiT-M/2"]) == 2
    err = capsys.readouterr().err  # one line on stderr, with the command's prefix
    assert err.startswith("minidit flops: error:") and "valid names" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_prints_the_paper_table(capsys):
    assert main(["flops", "--all"]) == 0
    assert capsys.readouterr().out.count("| DiT-") == 12

"""The Diffusion Transformer: embedders, the four block designs, adaLN-Zero at init, CFG, input checks."""

from __future__ import annotations

import math

import pytest
import torch

from minidit.dit import CONDITIONINGS, DIT_CONFIGS, TEXT_CONDITIONINGS, AdaLNBlock, DiT, DiTConfig, make_dit
from minidit.denoiser import Denoiser
from minidit.embeddings import LabelEmbedder, timestep_frequencies
from minidit.guidance import guided
from minidit.sde import VPSDE
from _backends import assert_fused_equals_explicit


def tiny(**overrides) -> DiT:
    fields = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=4,
                  num_classes=3, learn_sigma=False)
    return DiT(DiTConfig(**{**fields, **overrides}))


def test_timestep_code_matches_its_formula():
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 1000 * 0.37])
    code = timestep_frequencies(t, dim=8)
    for b, tb in enumerate(t.tolist()):
        omega = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
        expected = [math.cos(tb * w) for w in omega] + [math.sin(tb * w) for w in omega]
        torch.testing.assert_close(code[b], torch.tensor(expected), atol=1e-4, rtol=0)


def test_label_dropout_rate_and_forced_drops():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, dim=4, dropout_prob=0.1)
    y = torch.randint(0, 10, (20000,))
    dropped = (emb.drop(y) == 10).float().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)  # 4 standard errors
    force = torch.arange(20000) % 2 == 0
    torch.testing.assert_close(emb.drop(y, force), torch.where(force, 10, y))
    torch.testing.assert_close(emb(y, train=False), emb.table(y))  # no dropout at eval


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    torch.manual_seed(0)
    model = tiny(learn_sigma=True)
    x, c = torch.randn(4, 16, 32), torch.randn(4, 32)
    blocks = [b for b in model.blocks if isinstance(b, AdaLNBlock)]
    assert len(blocks) == 2
    for block in blocks:
        assert torch.equal(block(x, c), x)
    out = model(torch.randn(4, 2, 8, 8), torch.tensor([0.0, 10, 500, 999]), torch.tensor([0, 1, 2, 0]))
    assert out.shape == (4, 4, 8, 8)  # learn_sigma: 2C channels
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_each_conditioning_trains_and_respects_labels(conditioning):
    # target: +1 everywhere for label 0, 0 for label 1, -1 for label 2; x and t are fresh
    # noise at every step, so the label is the only thing the target can be learned from
    # (a text conditioning reads label k as the one-word caption [3 + k, <pad>, <pad>])
    torch.manual_seed(0)
    text = conditioning in TEXT_CONDITIONINGS
    extra = {"num_classes": 0, "text_vocab": 6, "text_length": 3} if text else {}
    model = tiny(conditioning=conditioning, class_dropout_prob=0.0, **extra)
    as_input = (lambda k: torch.stack([k + 3, 0 * k, 0 * k], dim=1)) if text else (lambda k: k)  # noqa: E731
    labels = torch.arange(24) % 3
    y = as_input(labels)
    target = (1.0 - labels.float())[:, None, None, None].expand(24, 2, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        x, t = torch.randn(24, 2, 8, 8), torch.randint(0, 1000, (24,)).float()
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])
    model.eval()
    x, t = torch.randn(24, 2, 8, 8), torch.randint(0, 1000, (24,)).float()
    with torch.no_grad():
        out = [model(x, t, as_input(torch.full((24,), k))).mean().item() for k in range(3)]
    assert out[0] - out[1] > 0.5 and out[1] - out[2] > 0.5  # the targets step by 1


def test_fused_and_explicit_attention_give_the_same_dit():
    torch.manual_seed(0)
    model = tiny(conditioning="cross-attention").double()
    x, t, y = torch.randn(3, 2, 8, 8).double(), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])
    assert_fused_equals_explicit(model, x, t, y)


def _perturb(model):
    """Move every weight away from its (partly zero) initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_cfg_combines_conditional_and_unconditional_predictions():
    torch.manual_seed(0)
    model = _perturb(tiny(learn_sigma=True))
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor(250.0), torch.tensor([0, 2, 1])
    cond = model(x, t, y)
    uncond = model(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.bool))
    assert (cond - uncond).abs().max() > 1e-3
    # guidance through the one CFG function, on the denoiser that keeps the eps channels
    den = Denoiser(model, "eps", VPSDE(), time_scale=1000.0, learned_sigma=True)
    with torch.no_grad():
        torch.testing.assert_close(guided(den, y).network_output(x, t / 1000), cond[:, :2])
        out = guided(den, y, 4.0, null_label=3).network_output(x, t / 1000)
        torch.testing.assert_close(out, uncond[:, :2] + 4.0 * (cond[:, :2] - uncond[:, :2]))
        null = torch.full((3,), 3)  # the null label asks for unconditional samples
        torch.testing.assert_close(guided(den, null, 4.0, null_label=3).network_output(x, t / 1000), uncond[:, :2])
    torch.testing.assert_close(model(x, t, null), uncond)  # the null label as a label
    torch.testing.assert_close(model(x, t), uncond)  # no label: the null label


def test_unconditional_model_and_scalar_t():
    torch.manual_seed(0)
    model = _perturb(tiny(num_classes=0))
    assert model.y_embedder is None
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(5.0)), model(x, torch.tensor([5.0, 5.0])))


def test_bad_inputs_raise_before_computing():
    model = tiny()
    x, t, y = torch.zeros(2, 2, 8, 8), torch.zeros(2), torch.tensor([0, 1])
    cases = [
        ((torch.zeros(2, 3, 8, 8), t, y), "shape"),  # channels
        ((torch.zeros(2, 2, 6, 6), t, y), "shape"),  # spatial size
        ((x, torch.zeros(3), y), "t must"),
        ((x, t, torch.tensor([0, 4])), r"\[0, 3\) or be the null label 3"),
        ((x, t, torch.tensor([-1, 0])), "labels"),
        ((x, t, torch.tensor([0.0, 1.0])), "integer"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    with pytest.raises(ValueError, match="unconditional"):
        tiny(num_classes=0)(x, t, y)
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(30, 4, 4, 64, 2, 4)
    with pytest.raises(ValueError, match="conditioning"):
        DiTConfig(32, 4, 4, 64, 2, 4, conditioning="film")
    with pytest.raises(ValueError, match="DiT-XL/2"):
        make_dit("DiT-XXL/2")


def test_named_configs():
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    for size, (width, depth, heads) in sizes.items():
        for patch in (2, 4, 8):
            c = DIT_CONFIGS[f"DiT-{size}/{patch}"]
            assert (c.hidden_size, c.depth, c.num_heads, c.patch_size) == (width, depth, heads, patch)
            assert (c.input_size, c.in_channels, c.num_classes, c.out_channels) == (32, 4, 1000, 8)
    for name, shape in [("dit-mnist-cpu", (1, 28)), ("dit-mnist-gpu", (1, 28)), ("dit-cifar10-gpu", (3, 32))]:
        assert (DIT_CONFIGS[name].in_channels, DIT_CONFIGS[name].input_size) == shape
    model = make_dit("dit-mnist-cpu", depth=1, conditioning="adaln")
    assert model.config.conditioning == "adaln" and len(model.blocks) == 1

"""The U-Net: shapes of sizes that halve (and a clear refusal of those that do not), zero init,
time and label conditioning, MAC counts against hand counts, and training through minidit's own
objective and training command."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minidit.cli import config_from_preset, main
from minidit.dit import DIT_CONFIGS
from minidit.flops import count_macs, count_params, profile, profile_named
from minidit.run.build import MODEL_BUILDERS, load_checkpoint, make_model
from minidit.run.budget import Budget
from minidit.run.objectives import FlowObjective
from minidit.unet import UNET_CONFIGS, AttentionBlock, ResBlock, UNet, UNetConfig, make_unet
from _backends import assert_fused_equals_explicit

TINY = UNetConfig(8, 2, model_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_heads=2, groups=4,
                  num_classes=3)  # 2 x 8 x 8 -> 8 x 8 x 8 -> 16 x 4 x 4 (attention), 3 classes


def tiny(**overrides) -> UNet:
    return UNet(replace(TINY, **overrides))


def _perturb(model: nn.Module) -> nn.Module:
    """Move every weight away from its (partly zero) initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hand_count(cfg: UNetConfig) -> int:
    """MACs of one forward pass of one image, layer by layer: conv = H·W·C_in·C_out·k², a Linear
    its weight's size, attention 4 L C² + 2 L² C; norms, SiLU, sums and resizing cost none."""
    E, w, R = cfg.emb_dim, cfg.widths, cfg.input_size

    def res(c_in, c_out, r):  # two 3 x 3 convs, the 1 x 1 skip if the width changes, the AdaGN Linear
        return r * r * (c_in * c_out * 9 + c_out * c_out * 9 + (c_in != c_out) * c_in * c_out) + E * 2 * c_out

    def attn(ch, r):  # q, k, v and output projections; Q K^T and the weighted sum of V
        return 4 * r * r * ch * ch + 2 * (r * r) ** 2 * ch

    macs = cfg.frequency_size * E + E * E + R * R * cfg.in_channels * w[0] * 9  # t embedder, input conv
    ch, r, skips = w[0], R, [w[0]]
    for i in range(len(w)):
        for _ in range(cfg.num_res_blocks):
            macs += res(ch, w[i], r) + (i in cfg.attention_levels) * attn(w[i], r)
            ch = w[i]
            skips.append(ch)
        if i < len(w) - 1:
            r //= 2
            macs += r * r * ch * ch * 9  # stride-2 conv
            skips.append(ch)
    macs += 2 * res(ch, ch, r) + attn(ch, r)  # the middle
    for i in reversed(range(len(w))):
        for _ in range(cfg.num_res_blocks + 1):
            macs += res(ch + skips.pop(), w[i], r) + (i in cfg.attention_levels) * attn(w[i], r)
            ch = w[i]
        if i > 0:
            r *= 2
            macs += r * r * ch * ch * 9  # the conv after nearest-neighbour doubling
    return macs + R * R * ch * cfg.out_channels * 9  # output conv


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("side,mult", [(28, (1, 2, 2)), (32, (1, 2, 2, 2)), (7, (1,))])
def test_output_shape_for_sizes_that_halve(side, mult):
    # 28 -> 14 -> 7 ends on an odd side; 32 -> 16 -> 8 -> 4; 7 with one level is never halved
    torch.manual_seed(0)
    cfg = dict(input_size=side, in_channels=1, channel_mult=mult, attention_levels=(len(mult) - 1,))
    x = torch.randn(2, 1, side, side)
    assert tiny(**cfg)(x, torch.tensor([3.0, 700.0]), torch.tensor([0, 3])).shape == (2, 1, side, side)
    assert tiny(**cfg, learn_sigma=True)(x, torch.zeros(2)).shape == (2, 2, side, side)  # C' = 2C


@pytest.mark.parametrize("side,levels", [(28, 4), (30, 3), (27, 2)])
def test_a_size_that_does_not_halve_is_refused_by_name(side, levels):
    with pytest.raises(ValueError, match=rf"input_size={side} cannot be halved {levels - 1} times"):
        UNetConfig(side, 1, model_channels=8, channel_mult=(1,) * levels, attention_levels=(), groups=4)


def test_bad_configs_and_inputs_raise():
    for bad in (dict(groups=3), dict(num_heads=3), dict(attention_levels=(2,)), dict(channel_mult=()),
                dict(attention_backend="flash")):
        with pytest.raises(ValueError):
            replace(TINY, **bad)
    model = tiny()
    x, t = torch.zeros(2, 2, 8, 8), torch.zeros(2)
    cases = [((torch.zeros(2, 2, 6, 6), t, None), "shape"), ((x, torch.zeros(3), None), "t must"),
             ((x, t, torch.tensor([0, 4])), r"\[0, 3\) or be the null label 3"),
             ((x, t, torch.tensor([0.0, 1.0])), "integer")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)


# ----------------------------------------------------------------------------- initialisation and conditioning


def test_output_is_zero_and_every_block_the_identity_at_init():
    torch.manual_seed(0)
    model = tiny(learn_sigma=True)
    out = model(torch.randn(4, 2, 8, 8), torch.tensor([0.0, 10, 500, 999]), torch.tensor([0, 1, 2, 3]))
    assert out.shape == (4, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))
    h, c = torch.randn(2, 8, 8, 8), torch.randn(2, TINY.emb_dim)
    res = next(m for m in model.modules() if isinstance(m, ResBlock) and isinstance(m.skip, nn.Identity))
    assert torch.equal(res(h, c), h)
    attn = next(m for m in model.modules() if isinstance(m, AttentionBlock))
    h = torch.randn(2, 16, 4, 4)
    assert torch.equal(attn(h), h)


def test_the_timestep_reaches_the_output_through_the_residual_branches():
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 1])
    t_a, t_b = torch.tensor([10.0, 10.0]), torch.tensor([10.0, 900.0])
    # with only the output conv perturbed, t is still unseen: every branch that reads it starts at zero
    model = tiny().eval()
    with torch.no_grad():
        nn.init.normal_(model.conv_out.weight, std=0.1)
        torch.testing.assert_close(model(x, t_a, y), model(x, t_b, y))
    model = _perturb(tiny())
    with torch.no_grad():
        a, b = model(x, t_a, y), model(x, t_b, y)
    torch.testing.assert_close(a[0], b[0])  # sample 0 saw the same t
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_labels_change_the_output_and_the_null_label_means_no_label():
    torch.manual_seed(0)
    model = _perturb(tiny())
    assert model.y_embedder.table.num_embeddings == 4 and model.y_embedder.dropout_prob == TINY.class_dropout_prob
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor(250.0), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond, other = model(x, t, y), model(x, t, torch.tensor([1, 2, 0]))
        null = model(x, t, torch.full((3,), 3))
        dropped = model(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.bool))
        none = model(x, t)
    assert (cond - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (cond - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    torch.testing.assert_close(dropped, null)
    torch.testing.assert_close(none, null)


def test_unconditional_model_takes_no_label():
    model = _perturb(tiny(num_classes=0))
    assert model.y_embedder is None
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(model(x, torch.tensor(5.0)), model(x, torch.tensor([5.0, 5.0])))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.zeros(2), torch.tensor([0, 1]))


def test_fused_and_explicit_attention_give_the_same_unet():
    torch.manual_seed(0)
    model = _perturb(tiny()).double()
    x, t, y = torch.randn(3, 2, 8, 8).double(), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])
    assert_fused_equals_explicit(model, x, t, y)


# ----------------------------------------------------------------------------- MACs


def test_res_block_macs_and_params_are_the_hand_count():
    B, C_in, C_out, E, H, W = 2, 16, 24, 32, 14, 12
    block = ResBlock(C_in, C_out, E, groups=8)
    conv1, conv2, skip = H * W * C_in * C_out * 9, H * W * C_out * C_out * 9, H * W * C_in * C_out
    macs = count_macs(block, torch.randn(B, C_in, H, W), torch.randn(B, E))
    assert macs == B * (conv1 + conv2 + skip + E * 2 * C_out)  # + the AdaGN Linear
    weights = C_in * C_out * 9 + C_out * C_out * 9 + C_in * C_out + E * 2 * C_out
    assert count_params(block) == weights + 3 * C_out + 2 * C_out + 2 * C_in  # + biases, AdaGN bias, GN affine


def test_attention_block_macs_are_the_hand_count():
    B, C, H, W = 2, 16, 7, 7
    L = H * W
    assert count_macs(AttentionBlock(C, 4, 8), torch.randn(B, C, H, W)) == B * (4 * L * C * C + 2 * L * L * C)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_named_configs_macs_are_the_hand_count(name):
    assert profile_named(name)[1] == hand_count(UNET_CONFIGS[name])


def test_meta_count_equals_real_count():
    real = tiny()
    macs = count_macs(real, torch.zeros(2, 2, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert profile(TINY, batch_size=2) == (count_params(real), macs)


def test_unet_mnist_cpu_matches_dit_mnist_cpu_in_gmacs():
    unet, dit = profile_named("unet-mnist-cpu")[1], profile_named("dit-mnist-cpu")[1]
    assert unet == pytest.approx(dit, rel=0.1)


def test_flops_command_reports_a_unet(capsys):
    assert main(["flops", "unet-mnist-cpu"]) == 0
    assert "unet-mnist-cpu" in capsys.readouterr().out


# ----------------------------------------------------------------------------- training


def test_trains_on_a_toy_batch_with_the_flow_objective():
    # three classes, one fixed image each: the label tells the network which x0 to aim for
    torch.manual_seed(0)
    model, objective = tiny(class_dropout_prob=0.0), FlowObjective(null_label=3)
    y = torch.arange(24) % 3
    x0 = (torch.rand(3, 2, 8, 8) * 2 - 1)[y]

    def held_out_loss() -> float:  # the same t and noise every time
        with torch.no_grad():
            return objective.loss(model, x0, y, torch.Generator().manual_seed(1))[0].mean().item()

    before, generator = held_out_loss(), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = objective.loss(model, x0, y, generator)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert held_out_loss() < 0.5 * before


def test_train_command_builds_and_trains_a_unet_by_name(tmp_path):
    config = config_from_preset("mnist-flow-cpu", ["model=unet-mnist-cpu"])
    assert "unet-mnist-cpu" in MODEL_BUILDERS
    model = make_model(config)
    assert isinstance(model, UNet) and model.config == UNET_CONFIGS["unet-mnist-cpu"]
    config = config_from_preset("mnist-flow-cpu", ["model=unet-mnist-s", 'model_overrides={"channel_mult": [1, 2]}'])
    assert make_model(config).config.channel_mult == (1, 2)  # JSON lists become tuples
    with pytest.raises(ValueError, match="cannot be halved 3 times"):
        config_from_preset("mnist-flow-cpu", ["model=unet-mnist-s", 'model_overrides={"channel_mult": [1, 2, 2, 2]}'])
    # end to end on 8 x 8 synthetic images: train, checkpoint, rebuild, sample
    rc = main(["train", "--preset", "mnist-flow-cpu", "--out", str(tmp_path), "--steps", "3", "--device", "cpu",
               "--grid-n", "10", "--eval-n", "0", "--no-progress", "model=unet-mnist-s", "dataset=synthetic",
               "dataset_size=32", "batch_size=16", "log_every=1", "sample_every=0", "checkpoint_every=0"])
    assert rc == 0
    model, ema, objective, config = load_checkpoint(tmp_path / "latest.pt")
    assert isinstance(ema, UNet) and ema.config.input_size == 8
    assert objective.sample(ema, (4, 1, 8, 8), torch.arange(4), torch.Generator().manual_seed(0)).shape == (4, 1, 8, 8)


def test_the_main_job_trains_a_unet_on_its_latents(mnist_root, tmp_path):
    # mnist-cpu diffuses the shipped autoencoder's 4 x 7 x 7 latents: the latent U-Net is sized for them
    rc = main(["train", "--preset", "mnist-cpu", "--out", str(tmp_path), "--steps", "2", "--eval-n", "0",
               "--grid-n", "10", "--device", "cpu", "--no-progress", f"data_root={mnist_root}", "dataset_size=64",
               "batch_size=16", "sample_every=0", "checkpoint_every=0", "model=unet-mnist-latent",
               "objective.inner.sample_steps=1"])
    assert rc == 0
    _, ema, objective, config = load_checkpoint(tmp_path / "latest.pt")
    assert isinstance(ema, UNet) and (ema.config.in_channels, ema.config.input_size) == (4, 7)
    assert objective.sample(ema, (2, 1, 28, 28), torch.tensor([3, 7])).shape == (2, 1, 28, 28)  # decoded digits


def test_make_unet_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unet-mnist-cpu"):
        make_unet("unet-nope")


# ----------------------------------------------------------------------------- benchmarks/unet_vs_dit.py


@pytest.fixture(scope="module")
def bench():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "unet_vs_dit.py"
    spec = importlib.util.spec_from_file_location("unet_vs_dit_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_pairs_are_matched_in_gmacs(bench):
    for dit_overrides, unet in bench.PAIRS.values():
        dit = profile(replace(DIT_CONFIGS["dit-mnist-cpu"], **dit_overrides))[1]
        assert profile_named(unet)[1] == pytest.approx(dit, rel=0.1)


def test_same_time_runs_average_over_the_same_fraction_of_the_run(bench):
    # a same-steps run of 1500 steps averages over 1 / (1 - d) = 500 steps, a third of it; a same-time
    # run seen halfway through its minutes after 300 steps will make K = 600 and should average over 200
    d = bench.time_run_ema(1500, 0.998)
    d_k = Budget(bench.TIME_RUN_STEPS, 5.0, ema_decay=d).ema(300, 150.0)
    assert 1 / (1 - d_k) == pytest.approx(200)


def test_benchmark_plan_and_result_files(bench, tmp_path):
    args = bench.parse_args(["--tiny", "--results-dir", str(tmp_path)])
    runs = bench.plan(args)
    assert [(r["backbone"], r["mode"]) for r in runs] == [("DiT", "same steps"), ("U-Net", "same steps"),
                                                          ("DiT", "same time"), ("U-Net", "same time")]
    assert len({r["run_dir"] for r in runs}) == 4 and "minutes=None" in runs[0]["overrides"]
    fields = ("group", "size", "backbone", "model", "mode", "budget", "run_dir")
    rows = {r["key"]: {**{k: r[k] for k in fields}, "params": 1000, "gmacs": 0.01, "step": 20, "train_minutes": 0.1,
                       "loss": 0.3, "images_per_s": 100.0, "images": 640, "train_gmacs": 19.2, "fd": 100.0 + i,
                       "fd_floor": 10.0, "accuracy": 0.5 - 0.1 * i, "n": 50} for i, r in enumerate(runs)}
    bench.write_results({"rows": rows, "machine": "test", "command": "python benchmarks/unet_vs_dit.py"}, tmp_path)
    md = (tmp_path / "unet_vs_dit.md").read_text()
    assert md.count("lower FD: **DiT**") == 2 and md.count("higher accuracy: **DiT**") == 2
    assert (tmp_path / "unet_vs_dit.png").stat().st_size > 0 and (tmp_path / "unet_vs_dit.json").is_file()

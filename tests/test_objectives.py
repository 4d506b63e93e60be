"""Objectives: each adapter agrees with the module it wraps, round-trips its config, and samples."""

from __future__ import annotations

import pytest
import torch

from minidit import flow, sde
from minidit.ddim import sample_ddim
from minidit.denoiser import Denoiser
from minidit.grids import ddpm_grid
from minidit.run.objectives import DDPMObjective, DiffusionObjective, FlowObjective, SDEObjective, objective_from_config
from minidit.toy_models import TinyMLP

ALL = [DDPMObjective(T=50, sample_steps=4), SDEObjective(sample_steps=4), FlowObjective(sample_steps=4)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyMLP(1, 8, num_classes=10, hidden=32)


@pytest.fixture
def x0():
    return torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.kind)
def test_config_round_trip_and_protocol(objective):
    assert isinstance(objective, DiffusionObjective)
    config = objective.config()
    assert config["kind"] == objective.kind
    rebuilt = objective_from_config(config)
    assert type(rebuilt) is type(objective) and rebuilt.config() == config


def test_bad_configs_name_the_choices():
    with pytest.raises(ValueError, match="kind must be one of"):
        objective_from_config({"kind": "gan"})
    with pytest.raises(ValueError, match="lr"):
        objective_from_config({"kind": "ddpm", "lr": 1.0})
    with pytest.raises(ValueError, match="sampler"):
        DDPMObjective(sampler="plms")
    with pytest.raises(ValueError, match="sampler"):
        SDEObjective(sampler="nope")
    with pytest.raises(ValueError, match="t_sampling"):
        FlowObjective(t_sampling="beta")


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.kind)
def test_loss_is_per_example_with_t_in_unit_interval(objective, model, x0):
    y = torch.arange(32) % 10
    loss, t = objective.loss(model, x0, y, torch.Generator().manual_seed(0))
    assert loss.shape == t.shape == (32,)
    assert torch.isfinite(loss).all() and (loss >= 0).all()
    assert ((t >= 0) & (t <= 1)).all()
    loss.mean().backward()  # the loss reaches the network's weights
    assert model.x_in.weight.grad is not None


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_adapter_is_ddpm_training_losses(model, x0, prediction, weighting):
    objective = DDPMObjective(T=50, prediction=prediction, weighting=weighting)
    loss, t = objective.loss(model, x0, None, torch.Generator().manual_seed(3))
    ref = objective.diffusion.training_losses(model, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, ref["loss"])
    torch.testing.assert_close(t, (ref["t"].float() + 1) / 50)  # step t sits at time (t + 1)/T


@pytest.mark.parametrize("weighting", ["variance", "likelihood"])
def test_sde_adapter_is_dsm_loss_per_example(model, x0, weighting):
    """The per-example losses average to minidit.sde.dsm_loss for the same draws."""
    objective = SDEObjective(weighting=weighting)
    loss, _ = objective.loss(model, x0, None, torch.Generator().manual_seed(4))
    ref = sde.dsm_loss(lambda x, t: model(x, 1000 * t), objective.process, x0, prediction="eps",
                       weighting=weighting, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loss.mean(), ref)


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_adapter_is_flow_loss_per_example(model, x0, t_sampling):
    objective = FlowObjective(t_sampling=t_sampling)
    loss, _ = objective.loss(model, x0, None, torch.Generator().manual_seed(5))
    ref = flow.flow_loss(lambda x, t: model(x, 1000 * t), x0, t_sampling=t_sampling,
                         generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss.mean(), ref)


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.kind)
def test_sample_is_seeded_and_guidance_changes_it(objective, model):
    y = torch.arange(4)
    first, again = (objective.sample(model, (4, 1, 8, 8), y, torch.Generator().manual_seed(0)) for _ in "ab")
    assert first.shape == (4, 1, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    guided = objective_from_config({**objective.config(), "cfg_scale": 3.0, "null_label": 10})
    assert not torch.allclose(guided.sample(model, (4, 1, 8, 8), y, torch.Generator().manual_seed(0)), first)


@pytest.mark.parametrize("objective", ALL, ids=lambda o: o.kind)
def test_guidance_interval_of_the_objective(objective, model):
    # an interval holding every step's σ/α is guidance everywhere; one holding none is the
    # conditional model; the objective's own interval is the default and is saved in its config
    y, shape = torch.arange(4), (4, 1, 8, 8)
    guided = objective_from_config({**objective.config(), "cfg_scale": 3.0, "null_label": 10})

    def draw(o, **kw):
        return o.make_sampler(model, **kw)(shape, y, torch.Generator().manual_seed(0)).x

    everywhere, cond = draw(guided, cfg_interval=None), draw(guided, cfg_scale=1.0)
    torch.testing.assert_close(draw(guided, cfg_interval=(0.0, float("inf"))), everywhere)
    torch.testing.assert_close(draw(guided, cfg_interval=(1e9, 2e9)), cond)
    within = objective_from_config({**guided.config(), "cfg_interval": [0.5, 2.0]})
    assert objective_from_config(within.config()).cfg_interval == [0.5, 2.0]
    bound = within.make_sampler(model)
    assert bound.cfg_interval == (0.5, 2.0)
    middle = bound(shape, y, torch.Generator().manual_seed(0)).x
    assert not torch.allclose(middle, everywhere) and not torch.allclose(middle, cond)
    torch.testing.assert_close(draw(within, cfg_interval=None), everywhere)
    with pytest.raises(ValueError, match="interval"):
        guided.make_sampler(model, cfg_interval=(3.0, 1.0))


def test_ddpm_sample_is_ddim(model):
    objective = DDPMObjective(T=50, sample_steps=5, eta=0.0)
    ours = objective.sample(model, (3, 1, 8, 8), None, torch.Generator().manual_seed(2))
    den = Denoiser(model, "eps", objective.diffusion.schedule.process, time_scale=50, time_shift=-1.0, clip_x0=True)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))  # N(0, I), DDPM's x_T
    torch.testing.assert_close(ours, sample_ddim(den, x_T, ddpm_grid(50, 5)))


def test_old_configs_still_build():
    # written before the samplers shared one signature: "ode_heun" is Heun, p_uncond = 0 is dropped
    assert objective_from_config({"kind": "sde", "sampler": "ode_heun"}).sampler == "heun"
    assert objective_from_config({"kind": "ddpm", "p_uncond": 0.0}).config() == DDPMObjective().config()
    with pytest.raises(ValueError, match="p_uncond"):
        objective_from_config({"kind": "ddpm", "p_uncond": 0.1})

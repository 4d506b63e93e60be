"""Few-step generation: consistency models, MeanFlow, progressive distillation, and the DiT's second time.

Gaussian data x0 ~ N(mu, s² I) on the straight path x_t = (1 − t) x0 + t ε has every answer in
closed form: x_t ~ N(m_t, v_t² I) with m_t = (1 − t) mu, v_t² = (1 − t)² s² + t², the PF-ODE moves a
point as x_r = m_r + (v_r / v_t)(x_t − m_t) (the monotone map between the two Gaussians), its
velocity is v(x, t) = −mu + (t − (1 − t) s²)/v_t² (x − m_t), the consistency function is the map
to t_min, and the average velocity over [r, t] is (x − x_r)/(t − r).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minidit.cli import main
from minidit.consistency import (ConsistencyFunction, boundary_coefficients, boundary_time, consistency_denoiser,
                                 consistency_loss, curriculum_steps, discretisation, pair_probabilities,
                                 pseudo_huber, sample_consistency, sample_pairs, teacher_step)
from minidit.denoiser import Denoiser, convert
from minidit.dit import DiT, DiTConfig
from minidit.edm import EDMProcess
from minidit.flow import FlowProcess
from minidit.meanflow import adaptive_weight, meanflow_target, pair_time, sample_meanflow, sample_t_r
from minidit.run.build import load_checkpoint
from minidit.run.config import PRESETS
from minidit.run.fewstep import (ConsistencyObjective, MeanFlowObjective, ProgressiveObjective, bind_labels,
                                 takes_drop_ids)
from minidit.run.objectives import FlowObjective

from test_data import fake_cifar  # noqa: F401  (a fixture: CIFAR-10-format batches)

F64 = torch.float64
MU, S = 0.7, 0.4  # the data: N(MU, S² I)
FLOW = FlowProcess()


# ----------------------------------------------------------------------------- the closed forms


def m(t):
    return (1 - t) * MU


def v(t):
    return torch.sqrt((1 - t) ** 2 * S**2 + t**2)


def col(t, x):  # [B] -> [B, 1] against x [B, D]; a number stays a number
    return t[:, None] if isinstance(t, torch.Tensor) and t.ndim else t


def flow_map(x, t, r):
    """Where the PF-ODE takes x from time t to time r."""
    t, r = torch.as_tensor(t, dtype=x.dtype), torch.as_tensor(r, dtype=x.dtype)
    return col(m(r), x) + col(v(r) / v(t), x) * (x - col(m(t), x))


def exact_velocity(x, t):
    t = torch.as_tensor(t, dtype=x.dtype)
    return -MU + col((t - (1 - t) * S**2) / v(t) ** 2, x) * (x - col(m(t), x))


def exact_average_velocity(x, r, t):
    return (x - flow_map(x, t, r)) / col(t - r, x)


class ExactVelocity(nn.Module):
    """The exact PF-ODE velocity as a network of τ = 1000 t; with pairs (t, r) [B, 2], the exact average."""

    def forward(self, x, tau, y=None):
        if tau.ndim == 2:
            t, r = tau[:, 0] / 1000, tau[:, 1] / 1000
            same = (t == r)[:, None]
            return torch.where(same, exact_velocity(x, t), exact_average_velocity(x, torch.where(same[:, 0], 0.0, r), t))
        return exact_velocity(x, tau / 1000)


def tiny_dit(second_time=False, seed=0, perturb=True, **overrides) -> DiT:
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                  learn_sigma=False, second_time=second_time)
    model = DiT(DiTConfig(**{**config, **overrides}))
    if perturb:  # away from the zero initialisation, so that every weight matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- consistency models


@pytest.mark.parametrize("parameterisation", ["flow", "edm"])
@pytest.mark.parametrize("process", [FLOW, EDMProcess()], ids=["flow", "edm-process"])
def test_consistency_function_is_the_identity_at_the_boundary(parameterisation, process):
    network = tiny_dit()  # any network: the boundary condition holds by construction
    t_min = boundary_time(process, 0.002)
    f = ConsistencyFunction(network, process, t_min, parameterisation)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 10])
    c_skip, c_out, _ = boundary_coefficients(process, torch.full((4,), t_min), t_min, parameterisation)
    assert torch.equal(c_skip, torch.ones(4)) and torch.equal(c_out.abs(), torch.zeros(4))
    assert torch.equal(f(x, torch.full((4,), t_min), y), x)
    den = consistency_denoiser(network, process, t_min, parameterisation)  # one time for the batch, as samplers call it
    assert torch.equal(den(x, t_min).x0, x)
    assert not torch.allclose(f(x, torch.full((4,), 0.5 * process.t_max), y), x)  # elsewhere the network speaks


def test_boundary_coefficients_are_the_flow_and_edm_scalings():
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    x, vel = torch.randn(7, 3, dtype=F64), torch.randn(7, 3, dtype=F64)
    # "flow" with the boundary at 0 is the flow's own x̂0 = x − t v of a velocity network
    c_skip, c_out, c_in = boundary_coefficients(FLOW, t, 0.0, "flow")
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * vel, convert(vel, "velocity", "x0", x, t, FLOW))
    # "edm" with the boundary at 0 is EDM's preconditioning [EDM, Table 1]
    sigma, sd = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=F64), 0.5
    c_skip, c_out, c_in = boundary_coefficients(EDMProcess(), sigma, 0.0, "edm", sd)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())


def exact_consistency_network(t_min):
    """F such that the "flow" consistency function is the exact map to t_min: F = (x − f*)/(t − t_min)."""
    return lambda x, tau, y=None: (x - flow_map(x, tau / 1000, t_min)) / col(tau / 1000 - t_min, x)


@pytest.mark.parametrize("solver,order", [("euler", 2), ("heun", 3)])
def test_cd_target_of_the_exact_model_is_its_output(solver, order):
    # with the exact consistency function f* and the exact teacher, the CD target f*(x̂_{t_n}, t_n) is
    # f*(x_{t_{n+1}}, t_{n+1}) up to the ODE step's local error, O(h²) for Euler and O(h³) for Heun
    t_min = boundary_time(FLOW, 0.002)
    f = ConsistencyFunction(exact_consistency_network(t_min), FLOW, t_min)
    teacher = Denoiser(ExactVelocity(), "velocity", FLOW, time_scale=1000.0)
    x = flow_map(torch.randn(256, 3, dtype=F64) * S + MU, 0.0, 0.6)  # a batch of x_t at t = 0.6
    errors = []
    for h in (0.04, 0.02):
        t, t_n = torch.full((256,), 0.6, dtype=F64), torch.full((256,), 0.6 - h, dtype=F64)
        target = f(teacher_step(teacher, x, t, t_n, solver), t_n)
        errors.append((target - f(x, t)).abs().max().item())
    assert errors[1] < 1e-3
    assert errors[0] / errors[1] > 2 ** order * 0.75  # the order of the step's local error
    # and the CD loss of the exact model vanishes with it
    x0 = torch.randn(256, 3, dtype=F64) * S + MU
    loss = consistency_loss(f, FLOW, x0, torch.full((256,), 0.58, dtype=F64), torch.full((256,), 0.6, dtype=F64),
                            teacher=lambda x, t, t_n: teacher_step(teacher, x, t, t_n, solver), c=1e-3)
    assert loss.max() < 1e-3


def test_ct_pair_is_in_expectation_the_exact_euler_step():
    # CT's earlier point x0(1 − t_n) + t_n z, with (x0, z) drawn given x_{t_{n+1}}, averages to one Euler
    # step of the exact PF-ODE [CM, Thm. 2]: the conditional velocity z − x0 has mean v(x, t)
    gen, n, t, t_n = torch.Generator().manual_seed(0), 200_000, 0.6, 0.55
    x = torch.tensor([1.3], dtype=F64)
    post_mean = MU + (1 - t) * S**2 / v(torch.tensor(t)) ** 2 * (x - m(t))  # E[x0 | x_t = x]
    post_std = S * t / v(torch.tensor(t))
    x0 = post_mean + post_std * torch.randn(n, 1, generator=gen, dtype=F64)
    z = (x - (1 - t) * x0) / t  # the noise that, with x0, gives x_t = x
    x_n = FLOW.perturb(x0, torch.full((n,), t_n, dtype=F64), z)
    euler = x + (t_n - t) * exact_velocity(x[None], torch.tensor(t, dtype=F64))[0]
    se = ((t - t_n) * post_std / t / math.sqrt(n)).item()  # x_n − x = (t_n − t)(z − x0), z − x0 = (x − x0)/t
    assert abs(x_n.mean().item() - euler.item()) < 5 * se


def test_consistency_sampling_with_the_exact_function_reproduces_the_data():
    t_min = boundary_time(FLOW, 0.002)
    den = consistency_denoiser(exact_consistency_network(t_min), FLOW, t_min)
    gen = torch.Generator().manual_seed(1)
    for steps, grid in [(1, [1.0, 0.0]), (2, [1.0, 0.5, 0.0]), (4, [1.0, 0.75, 0.5, 0.25, 0.0])]:
        den.nfe = 0
        x1 = torch.randn(40_000, 2, generator=gen, dtype=F64)
        x = sample_consistency(den, x1, torch.tensor(grid, dtype=F64), generator=gen)
        assert den.nfe == steps
        mean, std = m(torch.tensor(t_min)), v(torch.tensor(t_min))  # the data at t_min: N(≈MU, ≈S²)
        assert (x.mean(0) - mean).abs().max() < 5 * std / math.sqrt(40_000)
        assert (x.std(0) - std).abs().max() < 5 * std / math.sqrt(2 * 40_000)
    torch.testing.assert_close(sample_consistency(den, x1, torch.tensor([1.0, 0.0], dtype=F64)), flow_map(x1, 1.0, t_min))


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    x = torch.zeros(2, 1, 28, 28)
    c = 0.00054 * 28  # sqrt(784) = 28
    y = torch.zeros_like(x)
    y[0, 0, 0, 0], y[1, 0, 0, 0] = 1e-4, 10.0
    d = pseudo_huber(x, y)
    torch.testing.assert_close(d[0], torch.tensor(1e-8 / (2 * c)), rtol=1e-2, atol=0)
    torch.testing.assert_close(d[1], torch.tensor(10.0 - c), rtol=1e-4, atol=0)
    torch.testing.assert_close(pseudo_huber(x, y, c=1.0), torch.sqrt(torch.tensor([1e-8, 100.0]) + 1) - 1)


def test_discretisation_curriculum_and_pair_sampling():
    t, sigmas = discretisation(FLOW, 11)
    assert float(sigmas[0]) == 0.002 and abs(float(sigmas[-1]) - 80.0) < 1e-9 and bool((t[1:] > t[:-1]).all())
    assert float(t[0]) == boundary_time(FLOW, 0.002)  # exactly the t_min of the consistency function
    torch.testing.assert_close(t, sigmas / (1 + sigmas))  # the flow's σ = t/(1 − t)
    # N(k): s0 + 1 points at the start, doubling through log2(s1/s0) + 1 stages, s1 + 1 at the end [iCT]
    assert [curriculum_steps(p) for p in (0.0, 0.124, 0.125, 0.5, 0.99, 1.0)] == [11, 11, 21, 161, 1281, 1281]
    assert [curriculum_steps(p, 10, 160) for p in (0.0, 0.2, 0.4, 0.99)] == [11, 21, 41, 161]
    # the pairs' probabilities are a lognormal's mass between neighbouring noise levels [iCT]
    _, sigmas = discretisation(FLOW, 21)
    probs = pair_probabilities(sigmas, -1.1, 2.0)
    gen = torch.Generator().manual_seed(0)
    log_s = -1.1 + 2.0 * torch.randn(400_000, generator=gen, dtype=F64)
    inside = log_s[(log_s > math.log(0.002)) & (log_s < math.log(80.0))]
    freq = torch.histc(torch.bucketize(inside, sigmas.log()).double() - 1, bins=20, min=0, max=19) / len(inside)
    torch.testing.assert_close(freq, probs, atol=4e-3, rtol=0)
    drawn = sample_pairs(sigmas, 100_000, generator=gen)
    torch.testing.assert_close(torch.bincount(drawn, minlength=20).double() / 100_000, probs, atol=5e-3, rtol=0)


# ----------------------------------------------------------------------------- MeanFlow


def test_meanflow_target_of_the_exact_field_is_the_true_average_velocity():
    # the MeanFlow identity holds for the true fields: v − (t − r)(v ∂_z u + ∂_t u) = u
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=gen, dtype=F64)
    t = 0.2 + 0.8 * torch.rand(64, generator=gen, dtype=F64)
    r = t * torch.rand(64, generator=gen, dtype=F64) * 0.9
    u, u_tgt = meanflow_target(exact_average_velocity, z, r, t, exact_velocity(z, t))
    torch.testing.assert_close(u, exact_average_velocity(z, r, t))
    torch.testing.assert_close(u_tgt, u, atol=1e-10, rtol=1e-10)


def test_jvp_target_equals_finite_differences():
    gen = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(3, 16, generator=gen, dtype=F64), torch.randn(16, 3, generator=gen, dtype=F64)
    a, b = torch.randn(16, generator=gen, dtype=F64), torch.randn(16, generator=gen, dtype=F64)
    u_fn = lambda z, r, t: torch.tanh(z @ W1 + t[:, None] * a + r[:, None] * b) @ W2  # noqa: E731
    z, vel = torch.randn(8, 3, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)
    t, r = torch.full((8,), 0.7, dtype=F64), torch.full((8,), 0.3, dtype=F64)
    _, u_tgt = meanflow_target(u_fn, z, r, t, vel)
    h = 1e-5  # d/dt u(z_t, r, t) along dz/dt = v, r fixed: a central difference
    du_dt = (u_fn(z + h * vel, r, t + h) - u_fn(z - h * vel, r, t - h)) / (2 * h)
    torch.testing.assert_close(u_tgt, vel - 0.4 * du_dt, atol=1e-8, rtol=1e-8)


def test_jvp_through_the_dit_equals_finite_differences():
    model = tiny_dit(second_time=True).double().eval()
    y = torch.tensor([1, 2])
    u_fn = lambda z, r, t: model(z, 1000 * pair_time(t, r), y)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    z, vel = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64), torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    t, r = torch.tensor([0.7, 0.5], dtype=F64), torch.tensor([0.2, 0.5], dtype=F64)
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no forward-mode derivative
        _, u_tgt = meanflow_target(u_fn, z, r, t, vel)
    h = 3e-5  # the sinusoidal code runs in float32 whatever the weights: a coarse check that the JVP
    du_dt = (u_fn(z + h * vel, r, t + h) - u_fn(z - h * vel, r, t - h)) / (2 * h)  # flows through the DiT
    expected = vel - (t - r)[:, None, None, None] * du_dt
    torch.testing.assert_close(u_tgt, expected.detach(), atol=1e-2 * float(expected.detach().abs().max()), rtol=1e-2)


def test_one_step_with_the_exact_average_velocity_reproduces_the_data():
    den = Denoiser(ExactVelocity(), "velocity", FLOW, time_scale=1000.0)
    x1 = torch.randn(50_000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for grid in ([1.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.8, 0.5, 0.2, 0.0]):
        den.nfe = 0
        x0 = sample_meanflow(den, x1, torch.tensor(grid, dtype=F64))
        assert den.nfe == len(grid) - 1
        torch.testing.assert_close(x0, MU + S * x1)  # z_0 = z_1 − u(z_1, 0, 1) is the exact transport
    assert (x0.mean(0) - MU).abs().max() < 5 * S / math.sqrt(50_000)
    assert (x0.var(0) - S**2).abs().max() < 5 * S**2 * math.sqrt(2 / 50_000)


def test_t_r_sampling_and_adaptive_weight():
    gen = torch.Generator().manual_seed(0)
    t, r = sample_t_r(100_000, r_neq_t=0.25, generator=gen)
    assert bool((r <= t).all()) and bool(((t > 0) & (t < 1)).all())
    assert abs((r != t).float().mean().item() - 0.25) < 0.01
    err2 = torch.tensor([0.0, 1.0, 100.0])
    torch.testing.assert_close(adaptive_weight(err2, p=1.0, c=1e-3) * err2, err2 / (err2 + 1e-3))
    torch.testing.assert_close(adaptive_weight(err2, p=0.0), torch.ones(3))


# ----------------------------------------------------------------------------- the DiT's second time


def test_dit_second_time_off_changes_nothing_and_on_starts_as_the_one_time_model():
    plain, two = tiny_dit(perturb=False).eval(), tiny_dit(second_time=True, perturb=False).eval()
    assert plain.dt_embedder is None
    extra = set(two.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("dt_embedder.") for k in extra)  # old checkpoints keep their keys
    for name, p in plain.state_dict().items():  # the same seed: the same weights as without it
        assert torch.equal(p, two.state_dict()[name]), name
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 10])
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        for p in plain.final_layer.parameters():
            p.add_(0.1)
        for p in two.final_layer.parameters():
            p.add_(0.1)
        out = plain(x, t, y)
        assert torch.equal(two(x, t, y), out)
        assert torch.equal(two(x, pair_time(t, t / 2), y), out)  # Δ_emb = 0 at init: r does not matter yet
    with pytest.raises(ValueError, match="second_time"):
        plain(x, pair_time(t, t), y)


def test_dit_second_time_reads_r():
    model = tiny_dit(second_time=True).eval()
    x, y, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 10]), torch.tensor([900.0, 500.0, 300.0])
    with torch.no_grad():
        single, same = model(x, t, y), model(x, pair_time(t, t), y)
        a, b = model(x, pair_time(t, 0 * t), y), model(x, pair_time(t, t / 2), y)
    torch.testing.assert_close(single, same)  # one time t is the pair (t, t)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample sees r
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        model(x, torch.zeros(3, 3), y)


# ----------------------------------------------------------------------------- the objectives


def teacher_pair():
    teacher = tiny_dit(seed=1).eval()
    return teacher, FlowObjective(null_label=10, cfg_scale=1.5)


@pytest.mark.parametrize("objective,two_times", [
    (lambda: ConsistencyObjective(mode="ct", null_label=10), False),
    (lambda: ConsistencyObjective(mode="ct", parameterisation="edm", N=5, null_label=10), False),
    (lambda: ConsistencyObjective(mode="cd", teacher="t.pt", N=18, solver="heun", null_label=10), False),
    (lambda: ConsistencyObjective(mode="cd", teacher="t.pt", solver="euler", null_label=10), False),
    (lambda: MeanFlowObjective(null_label=10, omega=1.5, kappa=0.2, r_neq_t=0.5), True),
    (lambda: MeanFlowObjective(mode="distill", teacher="t.pt", null_label=10), True),
    (lambda: ProgressiveObjective(teacher="t.pt", teacher_steps=4, sample_steps=2, null_label=10), False),
], ids=["ct", "ct-edm", "cd-heun", "cd-euler", "meanflow", "meanflow-distill", "progressive"])
def test_each_objective_runs_and_backpropagates(objective, two_times):
    objective = objective()
    objective.set_teacher(*teacher_pair())
    if hasattr(objective, "set_progress"):
        objective.set_progress(0.3)
    model = tiny_dit(second_time=two_times, seed=2).train()
    x0, y = torch.randn(6, 1, 8, 8).clamp(-1, 1), torch.tensor([0, 1, 2, 3, 4, 5])
    loss, t = objective.loss(model, x0, y, torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and t.shape == (6,) and bool(torch.isfinite(loss).all()) and bool((loss >= 0).all())
    assert bool(((t >= 0) & (t <= 1)).all())
    loss.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through the whole network
    if two_times:
        assert model.dt_embedder.mlp[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher_run()[0].parameters())  # the teacher stays frozen


@pytest.mark.parametrize("objective,two_times", [
    (lambda: ConsistencyObjective(null_label=10), False),
    (lambda: MeanFlowObjective(null_label=10), True),
    (lambda: ProgressiveObjective(teacher="t.pt", null_label=10), False),
], ids=["consistency", "meanflow", "progressive"])
def test_students_sample_with_1_2_and_4_steps(objective, two_times):
    objective = objective()
    model = tiny_dit(second_time=two_times).eval()
    for steps in (1, 2, 4):
        drawn = objective.make_sampler(model, steps=steps)((5, 1, 8, 8), torch.arange(5),
                                                          torch.Generator().manual_seed(0))
        assert drawn.x.shape == (5, 1, 8, 8) and drawn.nfe == steps and bool(torch.isfinite(drawn.x).all())
    assert objective.config()["kind"] == objective.kind


def test_consistency_grid_starts_at_sigma_max_and_meanflow_refuses_a_guidance_interval():
    cm = ConsistencyObjective(null_label=10)
    grid = cm.grid("uniform", 2, cm.process)
    torch.testing.assert_close(grid, torch.tensor([80 / 81, 40 / 81, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="cfg_interval"):
        MeanFlowObjective(null_label=10).make_sampler(tiny_dit(second_time=True), cfg_scale=2.0,
                                                      cfg_interval=(0.1, 5.0))
    with pytest.raises(ValueError, match="teacher"):
        ConsistencyObjective(mode="cd")
    with pytest.raises(ValueError, match="load the teacher"):
        ConsistencyObjective(mode="cd", teacher="t.pt", null_label=10).teacher_run()


def test_labels_bound_for_a_pair_of_evaluations_are_the_same_labels():
    # a DiT in training drops labels at random; the objectives tell it which to drop instead
    model = tiny_dit(class_dropout_prob=0.9).train()
    assert takes_drop_ids(model) and not takes_drop_ids(lambda x, t, y: x)
    x, t, y = torch.randn(6, 1, 8, 8), torch.full((6,), 500.0), torch.tensor([0, 1, 2, 3, 4, 5])
    dropped = torch.tensor([True, False, False, True, False, False])
    net = bind_labels(model, torch.where(dropped, 10, y), dropped)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t))
        torch.testing.assert_close(net(x, t), model.eval()(x, t, torch.where(dropped, 10, y)))


def test_a_student_starts_from_its_teacher():
    teacher, flow = teacher_pair()
    student = tiny_dit(second_time=True, seed=5, perturb=False)
    objective = MeanFlowObjective(teacher="t.pt", init_from_teacher=True, null_label=10)
    objective.set_teacher(teacher, flow)
    objective.init_model(student)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x, pair_time(t, t / 3), y), teacher(x, t, y))
    wrong = ProgressiveObjective(teacher="t.pt", null_label=10)
    wrong.set_teacher(teacher, flow)
    with pytest.raises(ValueError, match="does not fit"):
        wrong.init_model(tiny_dit(hidden_size=64))


def test_curriculum_follows_the_progress_the_engine_reports():
    objective = ConsistencyObjective(s0=10, s1=40, null_label=10)
    model = tiny_dit()
    seen = []
    for fraction in (0.0, 0.5, 0.99):
        objective.set_progress(fraction)
        seen.append(curriculum_steps(objective.progress, objective.s0, objective.s1))
        objective.loss(model, torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert seen == [11, 21, 41]
    assert dataclasses.asdict(objective)["s1"] == 40


# ----------------------------------------------------------------------------- end to end


TINY = ["dataset=synthetic", "dataset_size=64", "batch_size=8", "log_every=1", "sample_every=0", "checkpoint_every=0",
        "model_overrides.patch_size=4", "model_overrides.hidden_size=32", "model_overrides.depth=1",
        "model_overrides.num_heads=2"]


@pytest.mark.slow
def test_students_train_from_a_teacher_checkpoint_and_sample_with_1_2_4_steps(tmp_path, capsys, mnist_root):
    # the MNIST presets on latents: a tiny teacher of the main job's recipe, then each student from it
    tiny = ["dataset_size=64", "batch_size=8", "log_every=1", "sample_every=0", "checkpoint_every=0",
            f"data_root={mnist_root}", "model_overrides.hidden_size=32", "model_overrides.depth=1",
            "model_overrides.num_heads=2"]

    def train(preset, out, *extra):
        rc = main(["train", "--preset", preset, "--out", str(out), "--steps", "3", "--device", "cpu", "--eval-n", "0",
                   "--grid-n", "10", "--no-progress", *tiny, *extra])
        assert rc == 0, capsys.readouterr().err
        return out / "latest.pt"

    teacher = train("mnist-cpu", tmp_path / "teacher")
    students = {preset: train(preset, tmp_path / preset, f"objective.inner.teacher={teacher}")
                for preset in ("mnist-cd-cpu", "mnist-meanflow-cpu", "mnist-meanflow-distill-cpu", "mnist-pd4-cpu")}
    students["mnist-ct-cpu"] = train("mnist-ct-cpu", tmp_path / "ct")
    _, mf_model, mf_objective, _ = load_checkpoint(students["mnist-meanflow-cpu"])
    assert mf_objective.inner_objective.kind == "meanflow" and mf_model.dt_embedder is not None
    for name, ckpt in students.items():
        for steps in (1, 2, 4):
            assert main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / f"{name}-{steps}.npz"), "--n", "4",
                         "--steps", str(steps), "--device", "cpu", "--no-progress"]) == 0
            assert f"NFE {steps}," in capsys.readouterr().out, (name, steps)


def test_cifar10_student_presets_train_and_sample_on_the_cpu(tmp_path, capsys, fake_cifar):
    # the GPU presets, shrunk, on CIFAR-10-format files: a teacher of cifar10-gpu's recipe, then every
    # student preset from it (each progressive round from the round before), each drawing in one step
    batches, _ = fake_cifar
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (_, _, blob) in batches.items():
        (folder / name).write_bytes(blob)
    tiny = ["batch_size=4", "log_every=1", "sample_every=0", "checkpoint_every=0", f"data_root={tmp_path / 'data'}",
            "model_overrides.hidden_size=32", "model_overrides.depth=1", "model_overrides.num_heads=2",
            "model_overrides.patch_size=8"]

    def train(preset, *extra):
        out = tmp_path / preset
        rc = main(["train", "--preset", preset, "--out", str(out), "--steps", "2", "--device", "cpu", "--eval-n", "0",
                   "--grid-n", "4", "--no-progress", *tiny, *extra])
        assert rc == 0, capsys.readouterr().err
        return out / "latest.pt"

    teacher = train("cifar10-gpu")
    students = [p for p in PRESETS if p.startswith("cifar10-") and p.endswith("-gpu") and
                PRESETS[p].objective.get("kind") in ("consistency", "meanflow", "progressive")]
    assert {"cifar10-cd-gpu", "cifar10-ct-gpu", "cifar10-meanflow-gpu", "cifar10-pd1-gpu"} <= set(students)
    previous = teacher
    for preset in students:
        kind = PRESETS[preset].objective
        if kind.get("mode") == "ct":
            ckpt = train(preset)
        elif kind["kind"] == "progressive":  # the chain of rounds: each taught by the one before
            ckpt = previous = train(preset, f"objective.teacher={previous}")
        else:
            ckpt = train(preset, f"objective.teacher={teacher}")
        assert main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / f"{preset}.npz"), "--n", "2",
                     "--steps", "1", "--device", "cpu", "--no-progress"]) == 0
        assert "NFE 1," in capsys.readouterr().out, preset

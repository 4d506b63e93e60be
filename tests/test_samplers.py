"""Every sampler driven by the exact score of a 2-D Gaussian mixture, against exact samples.

Distances are sliced Wasserstein-1 (128 fixed directions). The noise level of the
estimate at this sample size is measured in the same module: the distance between the
reference set and three more exact sets. A sampler passes when its distance is within
MARGIN of that floor (1.5 x the largest floor + 0.01).
"""

from __future__ import annotations

import math

import pytest
import torch

from minidit.denoiser import Denoiser
from minidit.dpm_solver import dpm_solver_3m_step, sample_dpm_solver_2m, sample_dpm_solver_3m
from minidit.edm import EDMProcess
from minidit.flow import FlowProcess
from minidit.grids import (Trajectory, ddpm_grid, karras_grid, karras_sigmas, log_snr_grid, uniform_grid)
from minidit.guidance import Inpainting, guided
from minidit.ode import rk45_solve, sample_euler, sample_heun, sample_rk45
from minidit.samplers import SAMPLERS, langevin_step, sample_pc
from minidit.schedules import make_schedule
from minidit.sde import SubVPSDE, VESDE, VPSDE
from minidit.toy import GaussianMixture, mixture_denoiser

N = 4000
MIX = GaussianMixture(torch.tensor([0.3, 0.5, 0.2]), torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -1.5]]),
                      torch.tensor([0.5, 0.3, 0.4]))
MIX64 = MIX.to(dtype=torch.float64)

# modest budgets at which each sampler has converged on this mixture (NFE in comments)
CONFIGS = {
    "ddpm": dict(steps=300),  # 300
    "ddim": dict(steps=50),  # 50
    "euler_maruyama": dict(steps=300),  # 300
    "reverse_diffusion": dict(steps=300),  # 300
    "pc": dict(steps=150),  # 300
    "langevin": dict(steps=100, n_corrector_steps=10),  # 1000
    "euler": dict(steps=100),  # 100
    "heun": dict(steps=30),  # 60
    "rk45": dict(rtol=1e-4, atol=1e-4),  # ~110
    "edm": dict(steps=18),  # 35
    "dpm_solver++": dict(steps=20),  # 20
    "dpm_solver++3m": dict(steps=20),  # 20
}
NFE = {"pc": 300, "langevin": 1000, "heun": 60, "edm": 35}


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128) -> float:
    d = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    d = d / d.norm(dim=0)  # [D, n_proj] unit directions
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean().item()


@pytest.fixture(scope="module")
def reference():
    ref = MIX.sample(N, torch.Generator().manual_seed(1))
    floor = max(sliced_w1(ref, MIX.sample(N, torch.Generator().manual_seed(10 + i))) for i in range(3))
    return ref, 1.5 * floor + 0.01


def setup(name: str, den: Denoiser, steps: int | None = None, t_start: float | None = None):
    """The denoiser and grid each sampler uses by default: EDM's on σ(t) = t and the Karras
    grid, DPM-Solver++'s uniform in log-SNR, everyone else's uniform in t."""
    if name == "edm":
        edm = den.on(EDMProcess())
        return edm, karras_grid(edm.process, steps, span=den.process)
    if name.startswith("dpm_solver++"):
        return den, log_snr_grid(den.process, steps, t_start)
    return den, uniform_grid(den.process, steps or 30, t_start)


def run(name, process, kind="eps", seed=100, den=None, x_init=None, callback=None, **kwargs):
    """(samples, NFE) of sampler `name` with the exact denoiser of the mixture on `process`."""
    options = dict(CONFIGS[name], **kwargs)
    den, grid = setup(name, den or mixture_denoiser(MIX, process, kind), options.pop("steps", None),
                      options.pop("t_start", None))
    g = torch.Generator().manual_seed(seed)
    x = den.process.prior_noise((N, 2), float(grid[0]), g) if x_init is None else x_init
    out = SAMPLERS["heun" if name == "edm" else name](den, x, grid, generator=g, callback=callback, **options)
    return out, den.nfe


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_sampler_draws_the_mixture_vp(name, reference):
    ref, margin = reference
    x, nfe = run(name, VPSDE())
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert sliced_w1(x, ref) < margin
    assert nfe == NFE.get(name, CONFIGS[name].get("steps", nfe))


@pytest.mark.slow
@pytest.mark.parametrize("process", [SubVPSDE(), VESDE(), FlowProcess()], ids=["subvp", "ve", "flow"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "langevin"])
def test_every_sampler_draws_the_mixture_other_processes(name, process, reference):
    ref, margin = reference
    kwargs = {}
    if isinstance(process, FlowProcess) and name in ("euler_maruyama", "reverse_diffusion", "pc", "ddpm"):
        kwargs["t_start"] = 0.99  # the flow's SDE form is singular at t = 1
    if isinstance(process, VESDE) and name == "euler":
        kwargs["steps"] = 300  # first order on a geometric sigma: slower
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    assert sliced_w1(run(name, process, kind, **kwargs)[0], ref) < margin


GRIDS = {"uniform": lambda p, s: uniform_grid(p, s), "ddpm": lambda p, s: ddpm_grid(1000, s),
         "karras": lambda p, s: karras_grid(p, s), "log_snr": lambda p, s: log_snr_grid(p, s)}
SOLVERS = {"euler": 100, "heun": 30, "ddim": 50, "dpm_solver++": 20, "dpm_solver++3m": 20, "rk45": 20}  # steps


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_grid_works_with_every_ode_solver(solver, grid, reference):
    # the grid is built apart and any solver walks it: Euler and Heun on Karras' sigmas, DPM-Solver++
    # on DDPM's steps, ...; the last step onto sigma = 0 (ddpm, karras) is Euler's or first order
    ref, margin = reference
    den = mixture_denoiser(MIX, VPSDE(), "eps")
    times = GRIDS[grid](den.process, SOLVERS[solver])
    g = torch.Generator().manual_seed(7)
    x = SAMPLERS[solver](den, den.process.prior_noise((N, 2), float(times[0]), g), times, generator=g)
    assert sliced_w1(x, ref) < margin, (solver, grid)
    if solver == "heun":  # 2 evaluations a step, one fewer when the grid ends at sigma = 0
        assert den.nfe == 2 * SOLVERS[solver] - (grid in ("ddpm", "karras"))


def test_langevin_corrector_keeps_p_t_invariant(reference):
    # exact samples of p_t stay exact (up to the floor) under 20 corrector steps at level t
    sde, t = VPSDE(), torch.tensor(0.5, dtype=torch.float64)
    p_t = MIX.diffused(sde.alpha(t).item(), sde.sigma(t).item())
    x = p_t.sample(N, torch.Generator().manual_seed(2))
    den, gen = mixture_denoiser(MIX, sde), torch.Generator().manual_seed(3)
    for _ in range(20):
        x, _ = langevin_step(den, x, t, t - 1 / 500, 0.16, gen)
    assert sliced_w1(x, p_t.sample(N, torch.Generator().manual_seed(4))) < reference[1]


def test_stochastic_sampler_error_shrinks_with_nfe(reference):
    ref, margin = reference
    errors = [sliced_w1(run("euler_maruyama", VPSDE(), steps=s)[0], ref) for s in (5, 10, 300)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 3 * margin


def _ode_reference(den, x1, t_start, t_end):
    return sample_rk45(den, x1, torch.tensor([t_start, t_end], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_deterministic_sampler_errors_shrink_with_nfe():
    # pathwise error against the converged solution from the same start, float64
    sde = VPSDE()
    den = mixture_denoiser(MIX64, sde, "eps")
    x1 = sde.prior_noise((300, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(den, x1, 1.0, sde.t_eps)
    for name in ("euler", "heun", "ddim", "dpm_solver++"):
        grid = log_snr_grid if name == "dpm_solver++" else uniform_grid
        errors = [(SAMPLERS[name](den, x1, grid(sde, s)) - exact).norm(dim=1).mean().item() for s in (5, 10, 20, 40)]
        assert all(a > b for a, b in zip(errors, errors[1:])), (name, errors)
    # EDM ends at sigma = 0 through its own schedule: converge to its own fine solution
    edm = den.on(EDMProcess())
    start = 80.0 * torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fine = sample_heun(edm, start, karras_grid(edm.process, 400, span=sde))
    errors = [(sample_heun(edm, start, karras_grid(edm.process, s, span=sde)) - fine).norm(dim=1).mean().item()
              for s in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("process", [VPSDE(), FlowProcess()], ids=["vp", "flow"])
def test_euler_heun_and_dpm_solver_convergence_orders(process):
    # halving the step divides the error by ~2 (Euler) and ~4 (Heun, DPM-Solver++(2M))
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    den = mixture_denoiser(MIX64, process, kind)
    x1 = process.prior_noise((200, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(den, x1, 1.0, 0.05)
    for method, order in (("euler", 1), ("heun", 2)):
        errors = [(SAMPLERS[method](den, x1, uniform_grid(process, s, t_end=0.05)) - exact).norm(dim=1).mean().item()
                  for s in (40, 80, 160)]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(abs(math.log2(r) - order) < 0.4 for r in ratios), (method, ratios)
    # DPM-Solver++(2M) and (3M) are second and third order in their log-SNR steps (from t = 0.95:
    # the flow's λ(1) is −inf)
    exact = _ode_reference(den, x1, 0.95, 0.05)
    for solver, order in ((sample_dpm_solver_2m, 2), (sample_dpm_solver_3m, 3)):
        errors = [(solver(den, x1, log_snr_grid(process, s, 0.95, 0.05), lower_order_final=False) - exact)
                  .norm(dim=1).mean().item() for s in (40, 80, 160)]
        assert all(abs(math.log2(a / b) - order) < 0.4 for a, b in zip(errors, errors[1:])), (order, errors)


def test_the_3m_step_is_exact_when_the_data_prediction_is_quadratic_in_log_snr():
    # x̂0(ℓ) = a + b ℓ + c ℓ² (ℓ = log(alpha/sigma)): the exponential integrator of DPM-Solver++ has the
    # closed form x_t = (sigma_t/sigma_s) x_s + alpha_t ∫₀ʰ e^{−(h−u)} x̂0(ℓ_s + u) du, here by quadrature
    process, a, b, c = VPSDE(), 0.3, -0.8, 0.25
    ell = lambda t: 0.5 * float(process.log_snr(t))  # noqa: E731
    x0_of = lambda l: torch.full((5, 2), a + b * l + c * l * l, dtype=torch.float64)  # noqa: E731
    den = Denoiser(lambda x, t: x0_of(ell(t[0])), "x0", process)
    t2, t1, t, t_next = (torch.tensor(v, dtype=torch.float64) for v in (0.8, 0.7, 0.55, 0.4))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, _ = dpm_solver_3m_step(den, x, t, t_next, [(x0_of(ell(t2)), ell(t2)), (x0_of(ell(t1)), ell(t1))])
    h, n = ell(t_next) - ell(t), 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) * h / n  # midpoint rule, error O((h/n)²)
    integral = (torch.exp(-(h - u)) * (a + b * (ell(t) + u) + c * (ell(t) + u) ** 2)).sum() * h / n
    exact = process.sigma(t_next) / process.sigma(t) * x + process.alpha(t_next) * integral
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)


def test_rk45_error_control():
    sde = VPSDE()
    den = mixture_denoiser(MIX64, sde, "eps")
    x1 = sde.prior_noise((200, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(den, x1, 1.0, 0.05)
    span = torch.tensor([1.0, 0.05], dtype=torch.float64)
    results = {}
    for tol in (1e-3, 1e-5, 1e-7):
        for per in (True, False):
            den.nfe = 0
            x = sample_rk45(den, x1, span, rtol=tol, atol=tol, per_sample_steps=per)
            results[tol, per] = ((x - exact).norm(dim=1).median().item(), den.nfe)
    for per in (True, False):
        (e3, n3), (e5, n5), (e7, n7) = (results[tol, per] for tol in (1e-3, 1e-5, 1e-7))
        assert e3 > 10 * e5 > 100 * e7 and e7 < 1e-5  # error follows the tolerance
        assert n3 < n5 < n7 < 5 * n3  # 5th order: NFE grows like tol^(-1/5)
    # per-sample control: each sample's path is the one it would take alone
    alone = sample_rk45(den, x1[3:4], span)
    batch = sample_rk45(den, x1, span)
    torch.testing.assert_close(batch[3:4], alone)


def test_rk45_on_a_linear_ode_both_directions():
    # dy/dt = −y t: y(t) = y0 exp(−(t² − t0²)/2); one sample per rate
    y0 = torch.tensor([[1.0], [2.0], [-3.0]], dtype=torch.float64)
    for t0, t1 in ((0.0, 2.0), (2.0, 0.5)):
        y, _ = rk45_solve(lambda y, t: -y * t[:, None], y0, t0, t1, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(y, y0 * math.exp(-(t1**2 - t0**2) / 2), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("process", [VPSDE(), VESDE(), FlowProcess()], ids=["vp", "ve", "flow"])
def test_probability_flow_round_trip(process):
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    den = mixture_denoiser(MIX64, process, kind)
    x1 = process.prior_noise((200, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0, _ = rk45_solve(den.velocity, x1, 1.0, process.t_eps, rtol=1e-7, atol=1e-7)
    back, _ = rk45_solve(den.velocity, x0, process.t_eps, 1.0, rtol=1e-7, atol=1e-7)
    assert (back - x1).norm(dim=1).mean() < 1e-3 * process.prior_std()


def test_inpainting_keeps_the_known_pixels_and_samples_the_conditional():
    # known x[0] = −2 picks the first component, so x[1] | x[0] is close to N(0, 0.5²)
    x0_known, mask = torch.zeros(N, 2), torch.tensor([1.0, 0.0])
    x0_known[:, 0] = -2.0
    weights = MIX.weights * torch.exp(-0.5 * (-2.0 - MIX.means[:, 0]) ** 2 / MIX.var[:, 0]) / MIX.var[:, 0].sqrt()
    conditional = GaussianMixture(weights, MIX.means[:, 1:], MIX.var[:, 1:].sqrt())
    exact = conditional.sample(N, torch.Generator().manual_seed(3))
    floor = sliced_w1(exact, conditional.sample(N, torch.Generator().manual_seed(4)))
    for name in ("pc", "euler_maruyama", "ddpm"):
        x, _ = run(name, VPSDE(), callback=Inpainting(x0_known, mask, VPSDE(), torch.Generator().manual_seed(9)))
        assert bool((x[:, 0] == -2.0).all())
        assert sliced_w1(x[:, 1:], exact) < 3 * floor + 0.03  # the replacement trick is approximate
    with pytest.raises(ValueError, match="mask"):
        Inpainting(x0_known, torch.ones(3), VPSDE())


def _labelled_model(calls):
    # label k in {0, 1, 2}: the k-th component alone; label 3 (null): the whole mixture
    sde = VPSDE()
    parts = [GaussianMixture(torch.ones(1), MIX.means[k:k + 1], MIX.var[k, 0].sqrt()) for k in range(3)]
    exact = [mixture_denoiser(m, sde, "eps").network for m in parts + [MIX]]

    def fn(x, t, y):
        calls.append(x.shape[0])
        outs = torch.stack([e(x, t) for e in exact])  # [4, B, 2]
        return outs[y, torch.arange(x.shape[0])]  # [B, 2]

    return fn


def test_classifier_free_guidance_in_samplers(reference):
    sde, calls = VPSDE(), []
    den = Denoiser(_labelled_model(calls), "eps", sde)
    y = torch.full((N,), 1)
    # cfg_scale = 1: the conditional model; one call of batch B per evaluation
    x, nfe = run("dpm_solver++", sde, den=guided(den, y), seed=0)
    assert calls == [N] * 20 and nfe == 20
    component = MIX.means[1] + MIX.var[1].sqrt() * torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
    assert sliced_w1(x, component) < reference[1]
    # cfg_scale = 0: the null label's (unconditional) model, one call of batch 2B
    calls.clear()
    x, nfe = run("edm", sde, den=guided(den, y, cfg_scale=0.0, null_label=3), seed=0)
    assert calls == [2 * N] * 35 and nfe == 35
    assert sliced_w1(x, reference[0]) < reference[1]
    # cfg_scale = 3 is u + 3 (c − u) evaluated by hand
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    grid = uniform_grid(sde, 5)
    out = sample_heun(guided(den, y[:64], cfg_scale=3.0, null_label=3), x1, grid)
    fn = _labelled_model([])
    by_hand = Denoiser(lambda x, t: fn(x, t, torch.full((64,), 3)) + 3.0 * (
        fn(x, t, y[:64]) - fn(x, t, torch.full((64,), 3))), "eps", sde)
    torch.testing.assert_close(out, sample_heun(by_hand, x1, grid))


@pytest.mark.parametrize("name", ["pc", "heun", "edm", "dpm_solver++", "ddim"])
def test_a_discrete_ddpm_model_drives_every_sampler(name, reference):
    # an exact "DDPM checkpoint" (eps of its own linear ᾱ table at fractional steps τ = T·t − 1),
    # sampled on its table's process and, for EDM, from the VE SDE's view as well
    T = 1000
    table = make_schedule("linear", T).process

    def exact_ddpm(x, tau):
        return mixture_denoiser(MIX, table, "eps").network(x, ((tau.double() + 1) / T).float())

    for view in [None] + ([VESDE()] if name == "edm" else []):
        den = Denoiser(exact_ddpm, "eps", table, time_scale=T, time_shift=-1.0)
        x, _ = run(name, table, den=den if view is None else den.on(view), seed=5)
        assert sliced_w1(x, reference[0]) < reference[1]


def test_edm_churn_and_schedule(reference):
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert sigmas[0] == 80.0 and abs(sigmas[-2] - 0.002) < 1e-12 and sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    x, _ = run("edm", VPSDE(), steps=40, S_churn=20.0, S_tmin=0.05, S_tmax=50.0)
    assert sliced_w1(x, reference[0]) < reference[1]
    # noise levels outside what the process spans (VP: sigma/alpha <= 152, VE: >= sigma_min) are refused
    with pytest.raises(ValueError, match="leave the range"):
        karras_grid(EDMProcess(), 18, sigma_max=200.0, span=VPSDE())
    with pytest.raises(ValueError, match="leave the range"):
        karras_grid(EDMProcess(), 18, sigma_min=1e-3, span=VESDE())


def test_trajectories_and_nfe_go_through_the_callback():
    traj = Trajectory()
    x, nfe = run("euler", VPSDE(), steps=10, callback=traj)
    assert len(traj.xs) == 10 and traj.times[0] == pytest.approx(0.9 + 0.1 * VPSDE().t_eps) and traj.nfe == nfe == 10
    torch.testing.assert_close(traj.xs[-1], x)


def test_bad_inputs_raise_clear_errors():
    sde, den = VPSDE(), mixture_denoiser(MIX, VPSDE())
    x = torch.zeros(4, 2)
    for steps in (0, -3, 2.5):
        for builder in (uniform_grid, log_snr_grid, karras_grid):
            with pytest.raises(ValueError, match="steps"):
                builder(sde, steps)
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(den, x, torch.tensor([0.1, 0.5, 1.0]))
    for tol in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="rtol"):
            sample_rk45(den, x, uniform_grid(sde, 2), rtol=tol)
        with pytest.raises(ValueError, match="atol"):
            sample_rk45(den, x, uniform_grid(sde, 2), atol=tol)
    with pytest.raises(ValueError, match="predictor"):
        sample_pc(den, x, uniform_grid(sde, 2), predictor="ancestral")
    # a score of the wrong shape is caught at the first evaluation
    with pytest.raises(ValueError, match=r"shape \(4, 1\).*step 0"):
        SAMPLERS["euler_maruyama"](Denoiser(lambda x, t: x[:, :1], "score", sde), x, uniform_grid(sde, 10))

    for name in ("euler_maruyama", "euler", "dpm_solver++"):  # one evaluation per step
        calls = []

        def nan_late(x, t):  # a NaN from the fourth call on: step 3
            calls.append(1)
            return -x * (torch.nan if len(calls) >= 4 else 1.0)

        grid = (log_snr_grid if name.startswith("dpm_solver++") else uniform_grid)(sde, 10)
        with pytest.raises(ValueError, match=r"NaN or inf at step 3 "):
            SAMPLERS[name](Denoiser(nan_late, "score", sde), x, grid)

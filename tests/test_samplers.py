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

from minidit.denoisers import Denoiser, mixture_denoiser
from minidit.dpm_solver import dpm_solver_pp
from minidit.edm import edm_sample, edm_sigmas
from minidit.flow import FlowProcess, flow_sample
from minidit.model_fn import ddpm_denoiser
from minidit.ode import pf_ode_solve, rk45_solve
from minidit.samplers import SAMPLERS, langevin_step, sample
from minidit.sde import SubVPSDE, VESDE, VPSDE
from minidit.toy import GaussianMixture


N = 4000
MIX = GaussianMixture(torch.tensor([0.3, 0.5, 0.2]), torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -1.5]]),
                      torch.tensor([0.5, 0.3, 0.4]))
MIX64 = MIX.to(dtype=torch.float64)

# modest budgets at which each sampler has converged on this mixture (NFE in comments)
CONFIGS = {
    "euler_maruyama": dict(steps=300),  # 300
    "reverse_diffusion": dict(steps=300),  # 300
    "pc": dict(steps=150),  # 300
    "langevin": dict(steps=100, n_corrector_steps=10),  # 1000
    "ode_euler": dict(steps=100),  # 100
    "ode_heun": dict(steps=30),  # 60
    "ode_rk45": dict(rtol=1e-4, atol=1e-4),  # ~110
    "edm": dict(steps=18),  # 35
    "dpm_solver++": dict(steps=20),  # 20
}


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 128) -> float:
    d = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    d = d / d.norm(dim=0)  # [D, n_proj] unit directions
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean().item()


@pytest.fixture(scope="module")
def reference():
    ref = MIX.sample(N, torch.Generator().manual_seed(1))
    floor = max(sliced_w1(ref, MIX.sample(N, torch.Generator().manual_seed(10 + i))) for i in range(3))
    return ref, 1.5 * floor + 0.01


def run(name, process, kind="eps", seed=100, **kwargs):
    den = mixture_denoiser(MIX, process, kind)
    options = dict(CONFIGS[name], **kwargs)
    return sample(name, den, process, (N, 2), generator=torch.Generator().manual_seed(seed), progress=False,
                  **options)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_sampler_draws_the_mixture_vp(name, reference):
    ref, margin = reference
    out = run(name, VPSDE())
    assert out.x.shape == (N, 2) and out.x.dtype == torch.float32
    assert sliced_w1(out.x, ref) < margin
    nfe = {"pc": 300, "langevin": 1000, "ode_heun": 60, "edm": 35, "dpm_solver++": 20}
    assert out.nfe == nfe.get(name, CONFIGS[name].get("steps", out.nfe))


@pytest.mark.slow
@pytest.mark.parametrize("process", [SubVPSDE(), VESDE(), FlowProcess()], ids=["subvp", "ve", "flow"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "langevin"])
def test_every_sampler_draws_the_mixture_other_processes(name, process, reference):
    ref, margin = reference
    kwargs = {}
    if isinstance(process, FlowProcess) and name in ("euler_maruyama", "reverse_diffusion", "pc"):
        kwargs["t_start"] = 0.99  # the flow's SDE form is singular at t = 1
    if isinstance(process, VESDE) and name == "ode_euler":
        kwargs["steps"] = 300  # first order on a geometric sigma: slower
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    assert sliced_w1(run(name, process, kind, **kwargs).x, ref) < margin


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_flow_samplers_draw_the_mixture(method, reference):
    ref, margin = reference
    den = mixture_denoiser(MIX, FlowProcess(), "velocity")
    out = flow_sample(den, (N, 2), steps=50, method=method, generator=torch.Generator().manual_seed(3),
                      progress=False)
    assert sliced_w1(out.x, ref) < margin and out.nfe == (50 if method == "euler" else 100)


def test_langevin_corrector_keeps_p_t_invariant(reference):
    # exact samples of p_t stay exact (up to the floor) under 20 corrector steps at level t
    sde, t = VPSDE(), 0.5
    p_t = MIX.diffused(sde.alpha(t).item(), sde.sigma(t).item())
    x = p_t.sample(N, torch.Generator().manual_seed(2))
    den, gen, tt = mixture_denoiser(MIX, sde), torch.Generator().manual_seed(3), torch.full((N,), t)
    for _ in range(20):
        x, _ = langevin_step(den, sde, x, tt, 1 / 500, 0.16, gen)
    assert sliced_w1(x, p_t.sample(N, torch.Generator().manual_seed(4))) < reference[1]


def test_stochastic_sampler_error_shrinks_with_nfe(reference):
    ref, margin = reference
    errors = [sliced_w1(run("euler_maruyama", VPSDE(), steps=s).x, ref) for s in (5, 10, 300)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 3 * margin


def _ode_reference(process, x1, t_end, den):
    return pf_ode_solve(den, process, x1, t_start=1.0, t_end=t_end, method="rk45", rtol=1e-9, atol=1e-9,
                        progress=False).x


def test_deterministic_sampler_errors_shrink_with_nfe():
    # pathwise error against the converged solution from the same start, float64
    sde = VPSDE()
    den = mixture_denoiser(MIX64, sde, "eps")
    x1 = sde.prior_sample((300, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(sde, x1, sde.t_eps, den)
    for name in ("ode_euler", "ode_heun", "dpm_solver++"):
        errors = [(sample(name, den, sde, steps=s, x_init=x1, dtype=torch.float64, progress=False).x - exact)
                  .norm(dim=1).mean().item() for s in (5, 10, 20, 40)]
        assert all(a > b for a, b in zip(errors, errors[1:])), (name, errors)
    # EDM ends at sigma = 0 through its own schedule: converge to its own fine solution
    start = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fine = edm_sample(den, sde, x_init=start, steps=400, dtype=torch.float64, progress=False).x
    errors = [(edm_sample(den, sde, x_init=start, steps=s, dtype=torch.float64, progress=False).x - fine)
              .norm(dim=1).mean().item() for s in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("process", [VPSDE(), FlowProcess()], ids=["vp", "flow"])
def test_euler_heun_and_dpm_solver_convergence_orders(process):
    # halving the step divides the error by ~2 (Euler) and ~4 (Heun, DPM-Solver++(2M))
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    den = mixture_denoiser(MIX64, process, kind)
    x1 = process.prior_sample((200, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(process, x1, 0.05, den)
    for method, order in (("euler", 1), ("heun", 2)):
        errors = [(pf_ode_solve(den, process, x1, t_start=1.0, t_end=0.05, method=method, steps=s,
                                progress=False).x - exact).norm(dim=1).mean().item() for s in (40, 80, 160)]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(abs(math.log2(r) - order) < 0.4 for r in ratios), (method, ratios)
    # DPM-Solver++(2M) is second order in its log-SNR steps (from t = 0.95: the flow's λ(1) is −inf)
    exact = pf_ode_solve(den, process, x1, t_start=0.95, t_end=0.05, method="rk45", rtol=1e-9, atol=1e-9,
                         progress=False).x
    errors = [(dpm_solver_pp(den, process, x_init=x1, steps=s, t_start=0.95, t_end=0.05, dtype=torch.float64,
                             progress=False).x - exact).norm(dim=1).mean().item() for s in (40, 80, 160)]
    assert all(abs(math.log2(a / b) - 2) < 0.4 for a, b in zip(errors, errors[1:])), errors


def test_rk45_error_control():
    sde = VPSDE()
    den = mixture_denoiser(MIX64, sde, "eps")
    x1 = sde.prior_sample((200, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _ode_reference(sde, x1, 0.05, den)
    results = {}
    for tol in (1e-3, 1e-5, 1e-7):
        for per in (True, False):
            out = pf_ode_solve(den, sde, x1, t_start=1.0, t_end=0.05, method="rk45", rtol=tol, atol=tol,
                               per_sample_steps=per, progress=False)
            results[tol, per] = ((out.x - exact).norm(dim=1).median().item(), out.nfe)
    for per in (True, False):
        (e3, n3), (e5, n5), (e7, n7) = (results[tol, per] for tol in (1e-3, 1e-5, 1e-7))
        assert e3 > 10 * e5 > 100 * e7 and e7 < 1e-5  # error follows the tolerance
        assert n3 < n5 < n7 < 5 * n3  # 5th order: NFE grows like tol^(-1/5)
    # per-sample control: each sample's path is the one it would take alone
    alone = pf_ode_solve(den, sde, x1[3:4], t_start=1.0, t_end=0.05, method="rk45", rtol=1e-5, atol=1e-5,
                         progress=False).x
    batch = pf_ode_solve(den, sde, x1, t_start=1.0, t_end=0.05, method="rk45", rtol=1e-5, atol=1e-5,
                         progress=False).x
    torch.testing.assert_close(batch[3:4], alone)


def test_rk45_on_a_linear_ode_both_directions():
    # dy/dt = −y t: y(t) = y0 exp(−(t² − t0²)/2); one sample per rate
    y0 = torch.tensor([[1.0], [2.0], [-3.0]], dtype=torch.float64)
    for t0, t1 in ((0.0, 2.0), (2.0, 0.5)):
        y, _ = rk45_solve(lambda y, t: -y * t[:, None], y0, t0, t1, rtol=1e-8, atol=1e-10, progress=False)
        torch.testing.assert_close(y, y0 * math.exp(-(t1**2 - t0**2) / 2), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("process", [VPSDE(), VESDE(), FlowProcess()], ids=["vp", "ve", "flow"])
def test_probability_flow_round_trip(process):
    kind = "velocity" if isinstance(process, FlowProcess) else "eps"
    den = mixture_denoiser(MIX64, process, kind)
    x1 = process.prior_sample((200, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(method="rk45", rtol=1e-7, atol=1e-7, progress=False)
    x0 = pf_ode_solve(den, process, x1, t_start=1.0, t_end=process.t_eps, **kw).x
    back = pf_ode_solve(den, process, x0, t_start=process.t_eps, t_end=1.0, **kw).x
    assert (back - x1).norm(dim=1).mean() < 1e-3 * process.prior_std()


def test_inpainting_keeps_the_known_pixels_and_samples_the_conditional():
    # known x[0] = −2 picks the first component, so x[1] | x[0] is close to N(0, 0.5²)
    x0_known, mask = torch.zeros(N, 2), torch.tensor([1.0, 0.0])
    x0_known[:, 0] = -2.0
    weights = MIX.weights * torch.exp(-0.5 * (-2.0 - MIX.means[:, 0]) ** 2 / MIX.var[:, 0]) / MIX.var[:, 0].sqrt()
    conditional = GaussianMixture(weights, MIX.means[:, 1:], MIX.var[:, 1:].sqrt())
    exact = conditional.sample(N, torch.Generator().manual_seed(3))
    floor = sliced_w1(exact, conditional.sample(N, torch.Generator().manual_seed(4)))
    for name in ("pc", "euler_maruyama"):
        out = run(name, VPSDE(), x0_known=x0_known, mask=mask)
        assert bool((out.x[:, 0] == -2.0).all())
        assert sliced_w1(out.x[:, 1:], exact) < 3 * floor + 0.03  # the replacement trick is approximate
    with pytest.raises(ValueError, match="x0_known and mask"):
        run("pc", VPSDE(), x0_known=x0_known)


def _labelled_model(calls):
    # label k in {0, 1, 2}: the k-th component alone; label 3 (null): the whole mixture
    sde = VPSDE()
    parts = [GaussianMixture(torch.ones(1), MIX.means[k:k + 1], MIX.var[k, 0].sqrt()) for k in range(3)]
    exact = [mixture_denoiser(m, sde, "eps").fn for m in parts + [MIX]]

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
    out = sample("dpm_solver++", den, sde, (N, 2), steps=20, y=y, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert calls == [N] * 20 and out.nfe == 20
    component = MIX.means[1] + MIX.var[1].sqrt() * torch.randn(N, 2, generator=torch.Generator().manual_seed(1))
    assert sliced_w1(out.x, component) < reference[1]
    # cfg_scale = 0: the null label's (unconditional) model, one call of batch 2B
    calls.clear()
    out = sample("edm", den, sde, (N, 2), steps=18, y=y, cfg_scale=0.0, null_label=3,
                 generator=torch.Generator().manual_seed(0), progress=False)
    assert calls == [2 * N] * 35 and out.nfe == 35
    assert sliced_w1(out.x, reference[0]) < reference[1]
    # cfg_scale = 3 is u + 3 (c − u) evaluated by hand
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    guided = sample("ode_heun", den, sde, steps=5, x_init=x1, y=y[:64], cfg_scale=3.0, null_label=3,
                    progress=False).x
    fn = _labelled_model([])
    by_hand = Denoiser(lambda x, t: fn(x, t, torch.full((64,), 3)) + 3.0 * (
        fn(x, t, y[:64]) - fn(x, t, torch.full((64,), 3))), "eps", sde)
    torch.testing.assert_close(guided, sample("ode_heun", by_hand, sde, steps=5, x_init=x1, progress=False).x)


@pytest.mark.parametrize("name", ["pc", "ode_heun", "edm", "dpm_solver++"])
def test_a_discrete_ddpm_model_drives_every_sampler(name, reference):
    # an exact "DDPM checkpoint" (eps of its own linear ᾱ table at fractional steps), sampled through
    # the VP SDE and, for EDM, the VE SDE
    T = 1000
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    table = alpha_bar.log() - torch.log1p(-alpha_bar)
    vp = VPSDE()

    class ExactDDPM(torch.nn.Module):
        def forward(self, x, index):
            lo = index.double().floor().long().clamp(max=T - 2)
            log_snr = table[lo] + (index.double() - lo) * (table[lo + 1] - table[lo])  # linear in the step
            return mixture_denoiser(MIX, vp, "eps").fn(x, vp.t_from_log_snr(log_snr).float())

    model = ExactDDPM()
    for process in [VPSDE()] + ([VESDE()] if name == "edm" else []):
        den = ddpm_denoiser(model, alpha_bar, process)
        out = sample(name, den, process, (N, 2), generator=torch.Generator().manual_seed(5), progress=False,
                     **CONFIGS[name])
        assert sliced_w1(out.x, reference[0]) < reference[1]


def test_edm_churn_and_schedule(reference):
    sigmas = edm_sigmas(18, 0.002, 80.0, 7.0)
    assert sigmas[0] == 80.0 and abs(sigmas[-2] - 0.002) < 1e-12 and sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    out = run("edm", VPSDE(), steps=40, S_churn=20.0, S_tmin=0.05, S_tmax=50.0)
    assert sliced_w1(out.x, reference[0]) < reference[1]
    # noise levels outside what the process spans (VP: sigma/alpha <= 152, VE: >= sigma_min) are refused
    with pytest.raises(ValueError, match="leave the range"):
        run("edm", VPSDE(), sigma_max=200.0)
    with pytest.raises(ValueError, match="leave the range"):
        run("edm", VESDE(), sigma_min=1e-3)


def test_trajectories_are_recorded():
    out = run("ode_euler", VPSDE(), steps=10, return_trajectory=True)
    assert len(out.trajectory) == 11 and len(out.times) == 11 and out.times[0] == 1.0
    torch.testing.assert_close(out.trajectory[-1], out.x)


def test_bad_inputs_raise_clear_errors():
    sde, den = VPSDE(), mixture_denoiser(MIX, VPSDE())
    with pytest.raises(ValueError, match="valid names: euler_maruyama"):
        sample("ddim", den, sde, (4, 2))
    for name in SAMPLERS:
        if name == "ode_rk45":
            continue
        for steps in (0, -3, 2.5):
            with pytest.raises(ValueError, match="steps"):
                sample(name, den, sde, (4, 2), steps=steps, progress=False)
    for tol in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="rtol"):
            sample("ode_rk45", den, sde, (4, 2), rtol=tol, progress=False)
        with pytest.raises(ValueError, match="atol"):
            sample("ode_rk45", den, sde, (4, 2), atol=tol, progress=False)
    with pytest.raises(ValueError, match="predictor"):
        sample("pc", den, sde, (4, 2), predictor="ancestral")
    # a score of the wrong shape is caught at the first evaluation
    with pytest.raises(ValueError, match=r"shape \(4, 1\).*step 0"):
        sample("euler_maruyama", lambda x, t: x[:, :1], sde, (4, 2), steps=10, progress=False)

    for name in ("euler_maruyama", "ode_euler", "dpm_solver++"):  # one evaluation per step
        calls = []

        def nan_late(x, t):  # a NaN from the fourth call on: step 3
            calls.append(1)
            return -x * (torch.nan if len(calls) >= 4 else 1.0)

        with pytest.raises(ValueError, match=r"NaN or inf at step 3 "):
            sample(name, nan_late, sde, (4, 2), steps=10, progress=False)

"""The checks of tutorial 03 (score matching, Euler-Maruyama): they accept the reference
solutions and name the wrong shape, term or weight of mistaken ones."""

from __future__ import annotations

import torch

from minidit import exercises as ex

from exercise_helpers import fails as _fails


def _bcast(v, x):
    return v.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


def dsm_loss(score_model, sde, x0, t, eps, weighting="variance", mistake=None):
    sigma = _bcast(sde.sigma(t), x0)
    lam = sigma**2 if weighting == "variance" else _bcast(sde.diffusion(t), x0) ** 2
    xt = _bcast(sde.alpha(t), x0) * x0 + sigma * eps
    if mistake == "model_sees_x0":
        xt = x0
    s = score_model(xt, t)
    target = {"sign": eps / sigma, "no_sigma": -eps}.get(mistake, -eps / sigma)
    lam = {"no_weight": torch.ones_like(lam), "std_weight": lam.sqrt()}.get(mistake, lam)
    err = lam * (s - target) ** 2
    return err.flatten(1).sum(1) if mistake == "sum" else err.flatten(1).mean(1)


def em_step(score_fn, sde, x, t, dt, z, mistake=None):
    g = _bcast(sde.diffusion(t), x)
    s = score_fn(x, t)
    score_coef = {"pf_ode": 0.5 * g**2, "g_not_g2": g, "sign": -(g**2)}.get(mistake, g**2)
    drift = (0 if mistake == "no_f" else sde.drift(x, t)) - score_coef * s
    x_mean = x + drift * dt if mistake == "forward" else x - drift * dt
    noise = g * dt * z if mistake == "dt_noise" else g * dt**0.5 * z
    return x_mean + noise


def test_checks_accept_the_reference_solutions(capsys):
    ex.check_dsm_loss(dsm_loss)
    ex.check_euler_maruyama_step(em_step)
    assert capsys.readouterr().out.count("correct ✓") == 2


def test_check_dsm_loss_names_the_term_weight_and_shape():
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="sign"), "−ε/σ(t)", "sign")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="no_sigma"), "not −ε")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="no_weight"), "left out the weight")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="std_weight"), "square root")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="sum"), "average them")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a, mistake="model_sees_x0"), "you passed x_0")
    # the "likelihood" weighting ignored: right for "variance", named when λ must be g²
    _fails(ex.check_dsm_loss, lambda m, sde, x0, t, eps, w: dsm_loss(m, sde, x0, t, eps), "weighting='likelihood'",
           "you used σ²")
    _fails(ex.check_dsm_loss, lambda *a: dsm_loss(*a).mean(), "shape ()", "one loss per example")
    # coefficients shaped for [B, D] points only: the image batch breaks broadcasting
    msg = _fails(ex.check_dsm_loss, lambda m, sde, x0, t, eps, w: dsm_loss(m, sde, x0.flatten(1), t,
                                                                            eps.flatten(1), w).reshape(-1, 1),
                 "shape")
    assert "(12, 1)" in msg
    _fails(ex.check_dsm_loss, lambda *a: (_ for _ in ()).throw(NotImplementedError()), "not implemented")


def test_check_dsm_loss_names_the_wrong_timesteps():
    def wrong_at_small_t(score_model, sde, x0, t, eps, weighting):
        out = dsm_loss(score_model, sde, x0, t, eps, weighting)
        return torch.where(t < 0.05, 2 * out, out)

    msg = _fails(ex.check_dsm_loss, wrong_at_small_t, "at t = 0.01")
    assert "right at t = " in msg


def test_check_euler_maruyama_step_names_the_term():
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="pf_ode"), "probability-flow", "drift part")
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="forward"), "stepped forward")
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="sign"), "mind the sign")
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="g_not_g2"), "g(t)²")
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="no_f"), "forward drift f(x, t)")
    _fails(ex.check_euler_maruyama_step, lambda *a: em_step(*a, mistake="dt_noise"), "noise term", "√Δt")
    _fails(ex.check_euler_maruyama_step, lambda s, sde, x, t, dt, z: em_step(s, sde, x, t - dt, dt, z),
           "current time t")
    _fails(ex.check_euler_maruyama_step, lambda s, sde, x, t, dt, z: em_step(s, sde, x, t, dt, z)[:, :1],
           "shape", "x of shape [12, 2]")

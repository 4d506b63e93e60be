"""Tutorial 13's checks: they accept the reference solutions and name the classic mistakes of the
consistency function's boundary coefficients and of MeanFlow's JVP target."""

from __future__ import annotations

import pytest
import torch

from minidit import exercises as ex
from minidit.consistency import ConsistencyFunction, boundary_time
from minidit.flow import FlowProcess

from exercise_helpers import fails as _fails


# ----------------------------------------------------------------------------------------
# The reference solutions of the notebook, with switches for the classic mistakes


def consistency_boundary(sigma, sigma_min, sigma_data, shift=True, square=True, scale=True, swap=False,
                         shifted_root=False, nudge=False):
    d = sigma - sigma_min if shift else sigma
    if nudge:  # right to 1e-17, but not exactly 0 at the boundary
        d = d + 1e-17
    c_skip = sigma_data**2 / ((d**2 if square else d) + sigma_data**2)
    c_out = (sigma_data if scale else 1.0) * d / torch.sqrt(sigma_data**2 + (d**2 if shifted_root else sigma**2))
    return (c_out, c_skip) if swap else (c_skip, c_out)


def meanflow_target(u_fn, z, r, t, v, tangent_z=True, tangent_r=0.0, sign=-1.0, detach=True, what="target"):
    u, du_dt = torch.func.jvp(u_fn, (z, r, t), (v if tangent_z else torch.zeros_like(z),
                                                 torch.full_like(r, tangent_r), torch.ones_like(t)))
    target = {"target": v + sign * (t - r)[:, None] * du_dt, "du": du_dt, "v": v}[what]
    return u, target.detach() if detach else target


def test_checks_accept_the_reference_solutions(capsys):
    ex.check_consistency_boundary(consistency_boundary)
    ex.check_meanflow_target(meanflow_target)
    assert capsys.readouterr().out.count("correct ✓") == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"shift": False}, ["c_skip(σ_min) is not 1", "σ − σ_min"]),
    ({"square": False}, ["squared"]),
    ({"swap": True}, ["swapped"]),
    ({"scale": False}, ["factor σ_d"]),
    ({"shifted_root": True}, ["square root", "sqrt(σ_d² + σ²)"]),
    ({"nudge": True}, ["not exactly (1, 0)"]),
])
def test_check_consistency_boundary_names_the_mistake(kwargs, words):
    _fails(ex.check_consistency_boundary, lambda s, m, d: consistency_boundary(s, m, d, **kwargs), *words)


@pytest.mark.parametrize("kwargs, words", [
    ({"tangent_z": False}, ["tangent of z is zero", "(v, 0, 1)"]),
    ({"tangent_r": 1.0}, ["tangent of r is 1"]),
    ({"sign": 1.0}, ["the sign"]),
    ({"what": "du"}, ["d/dt u itself"]),
    ({"what": "v"}, ["flow matching", "r = t"]),
    ({"detach": False}, ["detach"]),
])
def test_check_meanflow_target_names_the_mistake(kwargs, words):
    _fails(ex.check_meanflow_target, lambda *a: meanflow_target(*a, **kwargs), *words)


def test_check_meanflow_target_refuses_a_detached_network_output():
    def frozen(u_fn, z, r, t, v):
        u, target = meanflow_target(u_fn, z, r, t, v)
        return u.detach(), target

    _fails(ex.check_meanflow_target, frozen, "no gradient")


def test_the_stub_is_reported_as_not_implemented():
    def stub(*args):
        raise NotImplementedError()

    _fails(ex.check_consistency_boundary, stub, "not implemented yet")
    _fails(ex.check_meanflow_target, stub, "not implemented yet")


def test_the_reference_coefficients_make_the_library_function_the_identity_at_the_boundary():
    # the notebook's coefficients are the library's: at σ_min the network's output never reaches f
    process = FlowProcess()
    t_min = boundary_time(process, 0.002)
    f = ConsistencyFunction(lambda x, tau: torch.full_like(x, 1e6), process, t_min, "edm")
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(f(x, torch.full((3,), t_min, dtype=torch.float64)), x)
    c_skip, c_out = consistency_boundary(torch.tensor([0.002], dtype=torch.float64), 0.002, 0.5)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0

"""Checks of tutorial 07 (flow matching): they accept the reference solutions and name the
classic mistakes (reversed time, the wrong target or its sign, a wrong shape, a wrong step)."""

from __future__ import annotations

import pytest
import torch

from minidit import exercises as ex
from minidit.denoiser import Denoiser
from minidit.exercises import continuous
from minidit.flow import FlowProcess
from minidit.grids import uniform_grid
from minidit.ode import sample_euler


def _bcast(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


# ----------------------------------------------------------------------------------------
# Reference solutions (as in the tutorial) with switches for the classic mistakes


def flow_matching_loss(model, x0, t, eps, reverse_time=False, target="velocity", reduce="example",
                       time_input="t"):
    tb = _bcast(t, x0)
    xt = tb * x0 + (1 - tb) * eps if reverse_time else (1 - tb) * x0 + tb * eps
    want = {"velocity": eps - x0, "minus": x0 - eps, "eps": eps, "x0": x0}[target]
    err = (model(xt, 1 - t if time_input == "1-t" else t) - want).pow(2)
    return {"example": err.flatten(1).mean(1), "sum": err.flatten(1).sum(1), "all": err.mean()}[reduce]


def euler_flow_step(model, x, t, t_next, sign=1.0, at="t", scale=True):
    s = {"t": t, "t_next": t_next, "1-t": 1 - t}[at]
    v = model(x, torch.full((x.shape[0],), s, dtype=x.dtype))
    return x + sign * ((t_next - t) if scale else -1.0) * v


# ----------------------------------------------------------------------------------------
# check_flow_loss


def test_flow_loss_accepts_the_reference(capsys):
    ex.check_flow_loss(flow_matching_loss)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, words", [
    ({"reverse_time": True}, "time runs backwards"),
    ({"target": "minus"}, "wrong sign"),
    ({"target": "eps"}, "regressed the noise"),
    ({"target": "x0"}, "regressed x_0"),
    ({"reduce": "sum"}, "summed"),
    ({"reduce": "all"}, "shape [B]"),
    ({"time_input": "1-t"}, "passed 1 − t"),
])
def test_flow_loss_names_the_mistake(kwargs, words):
    with pytest.raises(ex.ExerciseError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ex.check_flow_loss(lambda *args: flow_matching_loss(*args, **kwargs))


def test_flow_loss_names_unhelpful_inputs():
    with pytest.raises(ex.ExerciseError, match="you passed x_0"):
        ex.check_flow_loss(lambda model, x0, t, eps: (model(x0, t) - (eps - x0)).pow(2).flatten(1).mean(1))
    with pytest.raises(ex.ExerciseError, match="never called the model"):
        ex.check_flow_loss(lambda model, x0, t, eps: (eps - x0).pow(2).flatten(1).mean(1))
    with pytest.raises(ex.ExerciseError, match="not implemented"):
        ex.check_flow_loss(lambda *args: (_ for _ in ()).throw(NotImplementedError()))


def test_flow_loss_names_an_unbroadcast_time():
    def no_reshape(model, x0, t, eps):  # t [B] against x0 [B, 1, 4, 4]: a broadcasting error
        return (model((1 - t) * x0 + t * eps, t) - (eps - x0)).pow(2).flatten(1).mean(1)

    with pytest.raises(ex.ExerciseError, match=r"reshape it to \[B, 1, ..., 1\]"):
        ex.check_flow_loss(no_reshape)


# ----------------------------------------------------------------------------------------
# check_euler_flow_step


def test_euler_step_accepts_the_reference(capsys):
    ex.check_euler_flow_step(euler_flow_step)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, words", [
    ({"sign": -1.0}, "wrong way"),
    ({"at": "t_next"}, "evaluate the velocity where you are"),
    ({"at": "1-t"}, "at 1 − t"),
    ({"scale": False}, "step size"),
])
def test_euler_step_names_the_mistake(kwargs, words):
    with pytest.raises(ex.ExerciseError, match=words):
        ex.check_euler_flow_step(lambda *args: euler_flow_step(*args, **kwargs))


def test_euler_step_names_shape_and_time_argument():
    with pytest.raises(ex.ExerciseError, match="shape"):
        ex.check_euler_flow_step(lambda model, x, t, t_next: euler_flow_step(model, x, t, t_next).flatten(1))
    with pytest.raises(ex.ExerciseError, match=r"t a tensor of shape \[B\]"):
        ex.check_euler_flow_step(lambda model, x, t, t_next: x + (t_next - t) * model(x, t))


def test_the_probe_is_what_the_library_integrates():
    """The reference step, repeated, is minidit.ode.sample_euler on the flow's uniform grid."""
    model = continuous._VelocityProbe()
    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, ts = x1, torch.linspace(1, 0, 6, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = euler_flow_step(model, x, t, t_next)
    den = Denoiser(model, "velocity", FlowProcess())
    torch.testing.assert_close(x, sample_euler(den, x1, uniform_grid(den.process, 5, t_end=0.0)))
    assert den.nfe == 5

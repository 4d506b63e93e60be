"""EMA: the warm-up formula, the recursion, constants stay constant, state round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minidit.ema import EMA


def test_decay_warmup_formula():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    for n in range(2000):
        assert ema.current_decay() == pytest.approx(min(0.999, (1 + n) / (10 + n)))
        ema.num_updates += 1
    assert EMA(nn.Linear(2, 2), decay=0.9, warmup=False).current_decay() == 0.9


def test_ema_of_constant_is_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.99)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    for _ in range(50):
        ema.update(model)
    for k, v in ema.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_matches_the_recursion():
    """θ_ema after n updates equals the recursion d_n θ_ema + (1 − d_n) θ_n in float64."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMA(model, decay=0.95)
    expected = model.weight.item()
    for n in range(40):
        with torch.no_grad():
            model.weight.fill_(float(torch.randn(())))
        d = min(0.95, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.item()
        ema.update(model)
    assert ema.model.weight.item() == pytest.approx(expected, rel=1e-12)
    assert ema.num_updates == 40


def test_buffers_are_copied_and_model_is_frozen():
    model = nn.BatchNorm1d(3)
    ema = EMA(model)
    model.running_mean.fill_(2.0)
    ema.update(model)
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    other = EMA(nn.Linear(3, 3), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 3 and other.decay == 0.9 and other.warmup
    assert torch.equal(other.model.weight, ema.model.weight)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)

"""Classifier-free guidance (one batched call, the s = 0 and s = 1 limits, any prediction
type, inside both samplers), label dropout, and inpainting by replacement."""

from __future__ import annotations

import math

import pytest
import torch
from _exact_models import ExactGaussian, ExactMixture
from torch import nn

from minidit.ddim import sample_ddim
from minidit.ddpm import sample_ddpm
from minidit.denoiser import Denoiser, convert
from minidit.grids import ddpm_grid
from minidit.guidance import Inpainting, cfg_predict, drop_labels, guided
from minidit.schedules import make_schedule

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
STDS = torch.tensor([0.3, 0.2, 0.4])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
NULL = 3  # the mixture's null label


def denoiser(model, schedule, kind="eps"):
    return Denoiser(model, kind, schedule.process, time_scale=schedule.T, time_shift=-1.0)


class CountingNet(nn.Module):
    """A small random conditional network that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3)
        self.emb = nn.Embedding(4, 3)
        self.batches: list[int] = []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        h = self.lin(x) + t.float().unsqueeze(1) / 100
        return h if y is None else h * self.emb(y)


def test_cfg_limits_and_one_batched_call():
    net = CountingNet()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 3, generator=g), torch.randint(0, 100, (5,), generator=g)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, NULL))
        net.batches.clear()
        for scale, expected in ((1.0, cond), (0.0, uncond), (3.0, uncond + 3.0 * (cond - uncond))):
            torch.testing.assert_close(cfg_predict(net, x, t, y, scale, NULL), expected)
        assert net.batches == [10, 10, 10]  # one call per prediction, on the doubled batch
        net.batches.clear()
        den = guided(Denoiser(net, "eps", make_schedule("linear", 100).process, time_scale=100, time_shift=-1.0), y)
        torch.testing.assert_close(den.network_output(x, (t + 1) / 100), cond)  # s = 1: the plain model
        assert net.batches == [5]


def test_guidance_interval_guides_only_inside_and_halves_the_cost_outside():
    # [Kynkäänniemi et al. 2024]: guide where σ = sigma/alpha lies in (lo, hi], else the conditional model
    net = CountingNet()
    table = make_schedule("linear", 100).process
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 0, 1])
    base = Denoiser(net, "eps", table, time_scale=100, time_shift=-1.0)
    full = guided(base, y, 3.0, NULL)
    cond = guided(base, y)
    ts = torch.arange(1, 101, dtype=torch.float64) / 100  # the table's steps
    noise = table.sigma(ts) / table.alpha(ts)
    lo, hi = float(noise[29]), float(noise[69])  # steps 31..70 are inside (lo, hi]
    part = guided(base, y, 3.0, NULL, interval=(lo, hi))
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            net.batches.clear()
            got = part.network_output(x, t)
            inside = lo < float(noise[i]) <= hi
            torch.testing.assert_close(got, (full if inside else cond).network_output(x, t))
            assert net.batches[0] == (10 if inside else 5)  # one call: doubled only inside
        # one time per sample: guided where inside, conditional elsewhere (one doubled call)
        t = ts[torch.tensor([10, 40, 50, 90])]
        xs, part4 = x[:4], guided(base, y[:4], 3.0, NULL, interval=(lo, hi))
        want = torch.where(torch.tensor([False, True, True, False])[:, None],
                           guided(base, y[:4], 3.0, NULL).network_output(xs, t), guided(base, y[:4]).network_output(xs, t))
        torch.testing.assert_close(part4.network_output(xs, t), want)
    # on a sampler: NFE counts each step once; the doubled batches are exactly the steps inside
    net.batches.clear()
    den = guided(base, y, 3.0, NULL, interval=(lo, hi))
    grid = ddpm_grid(100, 10)
    sample_ddim(den, torch.randn(5, 3), grid)
    inside = [lo < float(table.sigma(t) / table.alpha(t)) <= hi for t in grid[:-1]]
    assert den.nfe == 10 and net.batches == [10 if k else 5 for k in inside] and 0 < sum(inside) < 10
    for bad in ((2.0, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="interval"):
            guided(base, y, 3.0, NULL, interval=bad)
    with pytest.raises(ValueError, match="labels bound"):
        den.network_output(x, 0.5, y)


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_cfg_is_the_same_for_every_prediction_type(kind):
    # the ε/x0/v maps are affine at fixed x_t, so guiding x0 or v and converting equals guiding ε
    s = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    eps_guided = cfg_predict(ExactMixture(MEANS, STDS, WEIGHTS, s.alpha_bar, "eps"), x, t, y, 2.5, NULL)
    guided = cfg_predict(ExactMixture(MEANS, STDS, WEIGHTS, s.alpha_bar, kind), x, t, y, 2.5, NULL)
    as_eps = convert(guided, kind, "eps", x, s.time(t), s.process)
    torch.testing.assert_close(as_eps, eps_guided, rtol=1e-8, atol=1e-8)


def test_samplers_make_one_model_call_per_step_with_guidance():
    s = make_schedule("linear", 50)
    net = CountingNet()
    y = torch.tensor([0, 1, 2, 1])
    den = guided(denoiser(net, s), y, cfg_scale=4.0, null_label=NULL)
    sample_ddpm(den, torch.randn(4, 3), ddpm_grid(50))
    assert net.batches == [8] * 50 and den.nfe == 50
    net.batches.clear()
    sample_ddim(guided(denoiser(net, s), y, cfg_scale=4.0, null_label=NULL), torch.randn(4, 3), ddpm_grid(50, 10))
    assert net.batches == [8] * 10
    with pytest.raises(ValueError, match="null_label"):
        guided(denoiser(net, s), y, cfg_scale=4.0)


def test_guided_samples_with_the_exact_conditional_model():
    s = make_schedule("cosine", 1000)
    model = ExactMixture(MEANS, STDS, WEIGHTS, s.alpha_bar)
    N = 2000
    y = torch.full((N,), 1)

    def run(scale, seed):
        x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return sample_ddim(guided(denoiser(model, s), y, scale, NULL), x_T, ddpm_grid(1000, 50))

    # s = 1: the conditional model, i.e. component 1 alone; its mean within 4 standard errors
    x = run(1.0, 3)
    assert bool((torch.cdist(x, MEANS.double()).argmin(1) == 1).all())
    assert ((x.mean(0) - MEANS[1]).abs() < 4 * STDS[1] / N**0.5).all()
    # s = 0: the unconditional model, i.e. the mixture with its weights
    x = run(0.0, 4)
    freq = torch.bincount(torch.cdist(x, MEANS.double()).argmin(1), minlength=3).double() / N
    assert ((freq - WEIGHTS.double()).abs() < 4 * (WEIGHTS * (1 - WEIGHTS) / N).sqrt()).all()


def test_label_dropout_is_one_function():
    y, g = torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(5)
    assert torch.equal(drop_labels(y, 0.0, 2, g), y)
    dropped = drop_labels(y, 0.25, 2, g)
    rate = (dropped == 2).double().mean()  # Binomial(4000, 0.25) fraction
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000) and set(dropped.tolist()) == {0, 2}
    force = torch.tensor([True, False] * 2000)
    assert torch.equal(drop_labels(y, 0.9, 7, force=force), torch.where(force, 7, 0))


def test_inpainting_keeps_the_known_pixels():
    s = make_schedule("cosine", 200)
    mu, cov = torch.tensor([0.5, -1.0]), torch.tensor([[0.5, 0.3], [0.3, 0.4]])
    den = denoiser(ExactGaussian(mu, cov, s.alpha_bar), s)
    g = torch.Generator().manual_seed(5)
    known = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_T = torch.randn(64, 2, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0])  # coordinate 0 known, coordinate 1 generated
    x = sample_ddim(den, x_T, ddpm_grid(200, 20), callback=Inpainting(known, mask, s.process, g))
    torch.testing.assert_close(x[:, 0], known[:, 0])
    x = sample_ddpm(den, x_T, ddpm_grid(200), generator=g, callback=Inpainting(known, mask, s.process, g))
    torch.testing.assert_close(x[:, 0], known[:, 0])
    # nothing known: plain (deterministic) DDIM; everything known: the known image
    plain = sample_ddim(den, x_T, ddpm_grid(200, 20))

    def inpaint(mask):
        return sample_ddim(den, x_T, ddpm_grid(200, 20), callback=Inpainting(known, mask, s.process))

    torch.testing.assert_close(inpaint(torch.zeros(2)), plain)
    torch.testing.assert_close(inpaint(torch.ones(2)), known)
    with pytest.raises(ValueError, match="mask"):
        Inpainting(known, torch.ones(3), s.process)

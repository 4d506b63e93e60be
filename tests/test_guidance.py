"""Classifier-free guidance (one batched call, the s = 0 and s = 1 limits, any prediction
type, inside both samplers) and inpainting by replacement."""

from __future__ import annotations

import pytest
import torch
from _exact_models import ExactGaussian, ExactMixture
from torch import nn

from minidit.ddim import ddim_sample
from minidit.ddpm import GaussianDiffusion
from minidit.guidance import Inpainting, cfg_predict, guided_output
from minidit.parameterization import convert
from minidit.schedules import make_schedule

MEANS = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
STDS = torch.tensor([0.3, 0.2, 0.4])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
NULL = 3  # the mixture's null label


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
        torch.testing.assert_close(guided_output(net, x, t, y), cond)  # s = 1: the plain model
        assert net.batches == [5]


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
    alpha, sigma = s.sqrt_alpha_bar[t].unsqueeze(1), s.sqrt_one_minus_alpha_bar[t].unsqueeze(1)
    as_eps = convert(guided, kind, "eps", x, alpha, sigma)
    torch.testing.assert_close(as_eps, eps_guided, rtol=1e-8, atol=1e-8)


def test_samplers_make_one_model_call_per_step_with_guidance():
    s = make_schedule("linear", 50)
    d, net = GaussianDiffusion(s), CountingNet()
    y = torch.tensor([0, 1, 2, 1])
    d.sample(net, (4, 3), y=y, cfg_scale=4.0, null_label=NULL, progress=False)
    assert net.batches == [8] * 50
    net.batches.clear()
    ddim_sample(d, net, (4, 3), steps=10, y=y, cfg_scale=4.0, null_label=NULL, progress=False)
    assert net.batches == [8] * 10
    with pytest.raises(ValueError, match="null_label"):
        ddim_sample(d, net, (4, 3), steps=10, y=y, cfg_scale=4.0, progress=False)


def test_guided_samples_with_the_exact_conditional_model():
    s = make_schedule("cosine", 1000)
    d = GaussianDiffusion(s)
    model = ExactMixture(MEANS, STDS, WEIGHTS, s.alpha_bar)
    N = 2000
    y = torch.full((N,), 1)
    # s = 1: the conditional model, i.e. component 1 alone; its mean within 4 standard errors
    x = ddim_sample(d, model, (N, 2), steps=50, y=y, cfg_scale=1.0, null_label=NULL,
                    generator=torch.Generator().manual_seed(3), progress=False)
    assert bool((torch.cdist(x, MEANS.double()).argmin(1) == 1).all())
    assert ((x.mean(0) - MEANS[1]).abs() < 4 * STDS[1] / N**0.5).all()
    # s = 0: the unconditional model, i.e. the mixture with its weights
    x = ddim_sample(d, model, (N, 2), steps=50, y=y, cfg_scale=0.0, null_label=NULL,
                    generator=torch.Generator().manual_seed(4), progress=False)
    freq = torch.bincount(torch.cdist(x, MEANS.double()).argmin(1), minlength=3).double() / N
    assert ((freq - WEIGHTS.double()).abs() < 4 * (WEIGHTS * (1 - WEIGHTS) / N).sqrt()).all()


def test_inpainting_keeps_the_known_pixels():
    s = make_schedule("cosine", 200)
    d = GaussianDiffusion(s)
    mu, cov = torch.tensor([0.5, -1.0]), torch.tensor([[0.5, 0.3], [0.3, 0.4]])
    model = ExactGaussian(mu, cov, s.alpha_bar)
    g = torch.Generator().manual_seed(5)
    known = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x_T = torch.randn(64, 2, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0])  # coordinate 0 known, coordinate 1 generated
    x = ddim_sample(d, model, (64, 2), steps=20, x_T=x_T, inpainting=Inpainting(known, mask), generator=g,
                    progress=False)
    torch.testing.assert_close(x[:, 0], known[:, 0])
    x = d.sample(model, (64, 2), x_T=x_T, inpainting=Inpainting(known, mask), generator=g, progress=False)
    torch.testing.assert_close(x[:, 0], known[:, 0])
    # nothing known: plain (deterministic) DDIM; everything known: the known image
    plain = ddim_sample(d, model, (64, 2), steps=20, x_T=x_T, progress=False)

    def inpaint(mask):
        hook = Inpainting(known, mask)
        return ddim_sample(d, model, (64, 2), steps=20, x_T=x_T, inpainting=hook, progress=False)

    torch.testing.assert_close(inpaint(torch.zeros(2)), plain)
    torch.testing.assert_close(inpaint(torch.ones(2)), known)
    with pytest.raises(ValueError, match="mask"):
        Inpainting(known, torch.ones(3))

"""Tests for minidit.metrics: Frechet-distance maths, feature statistics, accuracy, evaluation."""

from __future__ import annotations

import builtins
import os

import numpy as np
import pytest
import torch

from minidit import metrics
from minidit.classifier import load_feature_net
from minidit.metrics import classifier_accuracy, evaluate_samples, feature_stats, frechet_distance


def random_spd(D: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """A random symmetric PSD matrix W W^T / r with W of shape [D, r]."""
    r = rank or 2 * D
    W = torch.randn(D, r, generator=g, dtype=torch.float64)
    return W @ W.T / r


def numpy_reference_fd(mu1, s1, mu2, s2) -> float:
    """FD through the eigenvalues of the non-symmetric product s1 s2 (numpy, independent path)."""
    lam = np.linalg.eigvals(s1 @ s2)  # real and >= 0 up to round-off: s1 s2 is similar to a PSD matrix
    tr_sqrt = np.sqrt(np.clip(lam.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --------------------------------------------------------------------------- Frechet distance maths


def test_fd_of_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    mu, S = torch.randn(64, generator=g, dtype=torch.float64), random_spd(64, g)
    assert abs(frechet_distance(mu, S, mu, S)) < 1e-6
    S_singular = random_spd(64, g, rank=10)  # rank-deficient, like features of few images
    assert abs(frechet_distance(mu, S_singular, mu, S_singular)) < 1e-6


def test_fd_diagonal_closed_form():
    # commuting covariances: FD = |dmu|² + sum (sqrt(a) - sqrt(b))², zeros allowed
    g = torch.Generator().manual_seed(1)
    a = torch.rand(32, generator=g, dtype=torch.float64) * 3
    b = torch.rand(32, generator=g, dtype=torch.float64) * 3
    a[:4] = 0.0
    mu1, mu2 = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-10)


def test_fd_scaled_covariance_closed_form():
    # sigma2 = c² sigma1 (full matrices): (sigma1 sigma2)^{1/2} = c sigma1, so FD = |dmu|² + (1 - c)² Tr sigma1
    g = torch.Generator().manual_seed(2)
    S, c = random_spd(20, g), 1.7
    mu1, mu2 = torch.zeros(20, dtype=torch.float64), torch.full((20,), 0.5, dtype=torch.float64)
    expected = 20 * 0.25 + (1 - c) ** 2 * S.trace().item()
    assert frechet_distance(mu1, S, mu2, c**2 * S) == pytest.approx(expected, rel=1e-9)


def test_fd_matches_independent_numpy_reference():
    g = torch.Generator().manual_seed(3)
    for D in (2, 16, 128):
        mu1, mu2 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
        s1, s2 = random_spd(D, g), random_spd(D, g)
        ref = numpy_reference_fd(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
        # numpy arrays in: same answer
        assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(ref, rel=1e-8)


def test_fd_is_symmetric_and_rotation_invariant():
    g = torch.Generator().manual_seed(4)
    D = 24
    mu1, mu2 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    s1, s2 = random_spd(D, g), random_spd(D, g, rank=5)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-9)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))  # orthogonal
    assert frechet_distance(Q @ mu1, Q @ s1 @ Q.T, Q @ mu2, Q @ s2 @ Q.T) == pytest.approx(fd, rel=1e-9)


def test_fd_bad_shapes_and_values():
    mu, S = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(mu, S, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(mu, S, mu, torch.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, S, mu, torch.full((3, 3), float("nan")))


# --------------------------------------------------------------------------- features and accuracy


class LinearFeatures(torch.nn.Module):
    """phi(x) = W flatten(x): a net whose features we can compute by hand; logits = features."""

    def __init__(self, D: int = 10):
        super().__init__()
        self.W = torch.nn.Linear(28 * 28, D, bias=False)

    def features(self, x):
        return self.W(x.flatten(1))

    def forward(self, x):
        return self.features(x)


def test_feature_stats_match_mean_and_covariance_for_any_batch_size():
    torch.manual_seed(5)
    net, x = LinearFeatures(), torch.rand(37, 1, 28, 28) * 2 - 1
    f = net.features(x).double()
    for bs in (1, 8, 100):
        mu, sigma = feature_stats(x, net, batch_size=bs, progress=False)
        torch.testing.assert_close(mu, f.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sigma, torch.cov(f.T), rtol=1e-5, atol=1e-6)


def test_fd_of_two_large_samples_of_one_gaussian_is_small():
    # FD of empirical stats of two samples from one distribution shrinks like D²/n
    torch.manual_seed(6)
    net = LinearFeatures(D=4)
    x1, x2 = torch.rand(4000, 1, 28, 28) * 2 - 1, torch.rand(4000, 1, 28, 28) * 2 - 1
    fd_same = frechet_distance(*feature_stats(x1, net, progress=False), *feature_stats(x2, net, progress=False))
    fd_shift = frechet_distance(*feature_stats(x1, net, progress=False), *feature_stats(x2 * 0.5, net, progress=False))
    assert fd_same < 0.05 * fd_shift


def test_classifier_accuracy_counts_matches():
    torch.manual_seed(7)
    net, x = LinearFeatures(), torch.rand(50, 1, 28, 28) * 2 - 1
    pred = net(x).argmax(1)
    assert classifier_accuracy(x, pred, net, batch_size=7, progress=False) == 1.0
    wrong = (pred + 1) % 10
    labels = torch.where(torch.arange(50) < 20, pred, wrong)
    assert classifier_accuracy(x, labels, net, progress=False) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(4, 28, 28), r"\[N, 1, 28, 28\]"),
        (torch.zeros(4, 3, 28, 28), r"\[N, 1, 28, 28\]"),
        (torch.full((4, 1, 28, 28), 255.0), r"\[-1, 1\]"),
        (torch.full((4, 1, 28, 28), float("nan")), "NaN"),
        (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        feature_stats(images, LinearFeatures())
    with pytest.raises(ValueError, match=match):
        evaluate_samples(images, n=2)


def test_small_overshoot_is_clipped_not_rejected():
    torch.manual_seed(8)
    net, x = LinearFeatures(), torch.rand(10, 1, 28, 28) * 2 - 1
    mu_over, _ = feature_stats(x * 1.2, net, progress=False)  # sampler overshoot up to 1.2 is tolerated
    mu_clip, _ = feature_stats((x * 1.2).clamp(-1, 1), net, progress=False)
    torch.testing.assert_close(mu_over, mu_clip)


def test_bad_labels_batch_size_and_n_raise():
    net, x = LinearFeatures(), torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        classifier_accuracy(x, torch.zeros(3, dtype=torch.long), net)
    with pytest.raises(ValueError, match="0..9"):
        classifier_accuracy(x, torch.full((4,), 10), net)
    with pytest.raises(ValueError, match="batch_size"):
        feature_stats(x, net, batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1], net)
    with pytest.raises(ValueError, match=r"n must be an int in \[2, 4\]"):
        evaluate_samples(x, n=5)
    with pytest.raises(ValueError, match="10000 MNIST test images"):  # more than the reference holds
        evaluate_samples(torch.zeros(10_001, 1, 28, 28), n=10_001)
    with pytest.raises(ValueError, match="dataset must be one of"):
        evaluate_samples(x, dataset="cifar10")


def test_inception_fid_missing_package_error_is_clear(monkeypatch):
    real_import = builtins.__import__

    def no_fidelity(name, *args, **kwargs):
        if name == "torch_fidelity" or name.startswith("torch_fidelity."):
            raise ModuleNotFoundError("No module named 'torch_fidelity'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    with pytest.raises(ImportError, match=r"pip install 'minidit\[fid\]'"):
        metrics.inception_fid(torch.zeros(2, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        metrics.inception_fid(torch.zeros(2, 1, 32, 32))


# --------------------------------------------------------------------------- the shipped net on real MNIST

needs_mnist = pytest.mark.skipif(
    not os.environ.get("MINIDIT_DATA"), reason="real MNIST needed: set MINIDIT_DATA to the dataset root"
)


@needs_mnist
@pytest.mark.slow
def test_floor_is_far_below_noise_and_real_samples_sit_at_the_floor():
    from minidit.data import load_mnist

    n = 1000
    g = torch.Generator().manual_seed(9)
    noise = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    res_noise = evaluate_samples(noise, n=n, progress=False)
    assert res_noise["n"] == n and res_noise["accuracy"] is None
    assert res_noise["fd"] > 20 * res_noise["fd_floor"]

    # real train images the reference has not seen score like the floor and are classified right
    images, labels = load_mnist(split="train")
    idx = torch.randperm(images.shape[0], generator=g)[:n]
    res_real = evaluate_samples(images[idx], labels[idx], n=n, progress=False)
    assert res_real["fd_floor"] == res_noise["fd_floor"]  # cached reference, same n
    assert res_real["fd"] < 3 * res_real["fd_floor"]
    assert res_real["accuracy"] > 0.98


@needs_mnist
def test_accuracy_against_permuted_labels_is_chance():
    from minidit.data import load_mnist

    images, labels = load_mnist(split="test")
    images, labels = images[:2000], labels[:2000]
    g = torch.Generator().manual_seed(10)
    shuffled = labels[torch.randperm(2000, generator=g)]
    # P(shuffled label == true label) = sum_c p_c² ~ 0.1; binomial sd at n=2000 is ~0.007
    chance = ((torch.bincount(labels, minlength=10).double() / 2000) ** 2).sum().item()
    acc = metrics.classifier_accuracy(images, shuffled, load_feature_net("mnist"), progress=False)
    assert abs(acc - chance) < 0.035
    with pytest.raises(ValueError, match="n must be an int"):
        evaluate_samples(images, n=2001)


def test_quality_line_has_the_tutorials_form():
    from minidit.metrics import quality_line
    line = quality_line({"fd": 6.4213, "fd_floor": 6.0871, "accuracy": 0.9812, "n": 1000})
    assert line == "quality: accuracy 0.981, FD 6.42 (floor 6.09), n 1000"
    assert quality_line({"fd": 1.0, "fd_floor": 2.0, "accuracy": None, "n": 10}, "DiT").startswith(
        "DiT quality: accuracy -, FD 1.00")
    with pytest.raises(ValueError, match="evaluate_samples"):
        quality_line({"fd": 1.0})


def test_nearest_neighbours_finds_copies_and_measures_rms_distance():
    from minidit.metrics import nearest_neighbours
    gen = torch.Generator().manual_seed(0)
    refs = torch.rand(50, 1, 4, 4, generator=gen) * 2 - 1
    # copies of references 7 and 3, and one image offset by a constant 0.1 from reference 11
    queries = torch.stack([refs[7], refs[3], refs[11] + 0.1])
    d, j = nearest_neighbours(queries, refs, batch_size=2)
    assert j.tolist()[:2] == [7, 3]
    torch.testing.assert_close(d[:2], torch.zeros(2), atol=1e-5, rtol=0)
    # brute force agrees for the third
    brute = ((queries[2] - refs).flatten(1).pow(2).mean(1)).sqrt()
    assert j[2] == brute.argmin() and abs(d[2] - brute.min()) < 1e-5
    with pytest.raises(ValueError, match="one image shape"):
        nearest_neighbours(queries, torch.zeros(3, 1, 5, 5))

"""Sample quality: the Frechet distance in a classifier's features, and classifier accuracy.

Fit a Gaussian N(mu, Sigma) to the features phi(x) of each image set and measure the
Frechet (2-Wasserstein) distance between the two Gaussians [Dowson-Landau 1982; FID, Eq. 6]:

    FD = |mu_1 - mu_2|² + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})

We compute the trace of the matrix square root in its symmetric form: with A = Sigma_1^{1/2},
Sigma_1 Sigma_2 = A (A Sigma_2) has the eigenvalues of (A Sigma_2) A = A Sigma_2 A, which is
symmetric positive semi-definite, so

    Tr (Sigma_1 Sigma_2)^{1/2} = sum_i sqrt(lambda_i(A Sigma_2 A))

needs only two symmetric eigen-decompositions (float64, `torch.linalg.eigh`), no scipy.

With phi the penultimate layer of our small MNIST classifier (`minidit.classifier`) this is
the "MNIST-classifier FD" -- NOT the FID of the literature, which uses Inception-v3 features
and is not comparable. Its value depends on the sample count n (the estimate is biased
upward for small n), so `evaluate_samples` reports beside it the real-vs-real floor at the
same n: MNIST train images against the same MNIST test reference. A model is as good as real
data when its FD reaches that floor. For CIFAR-10, `inception_fid` calls torch-fidelity.

References: [FID] Heusel et al. 2017; Dowson, Landau 1982, "The Frechet distance between
multivariate normal distributions".
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from minidit.classifier import load_feature_net
from minidit.data import load_mnist
from minidit.memorisation import nearest_neighbours  # noqa: F401  (the memorisation check, re-exported)

# How far outside [-1, 1] a pixel may stray (sampler overshoot) before we call it a bug,
# e.g. images still in [0, 255]. Values inside the slack are clipped to [-1, 1].
PIXEL_SLACK = 0.5
NUM_CLASSES = 10
REFERENCE_SEED = 0  # fixes which real images form the reference and the floor subsets


# --------------------------------------------------------------------------- Frechet distance


def _clamp_round_off(lam: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues that eigh cannot tell from 0 (|lam| <= D · eps · max|lam|).

    A PSD matrix of rank r < D (features of few images, dead ReLUs) has D - r zero
    eigenvalues that eigh returns as +-1e-16-sized noise; sqrt would turn that noise into
    1e-8-sized errors, so we clamp it, negative ones included, to exactly 0.
    """
    tol = lam.shape[-1] * torch.finfo(lam.dtype).eps * lam.abs().max()
    return torch.where(lam > tol, lam, torch.zeros_like(lam))


def _sqrtm_psd(S: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix through eigh."""
    lam, U = torch.linalg.eigh(S)
    return (U * _clamp_round_off(lam).sqrt()) @ U.T  # U diag(sqrt(lam)) U^T


def _as_float64(name: str, x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach()
    x = x.to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape [D] (torch tensors or numpy arrays).
        sigma1, sigma2: symmetric PSD covariances, shape [D, D].

    Returns:
        |mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) as a python float >= 0.
    """
    mu1, mu2 = _as_float64("mu1", mu1), _as_float64("mu2", mu2)
    sigma1, sigma2 = _as_float64("sigma1", sigma1), _as_float64("sigma2", sigma2)
    D = mu1.shape[0] if mu1.ndim == 1 else -1
    if D < 1 or mu2.shape != (D,):
        raise ValueError(f"mu1 and mu2 must be vectors of one length D, got {list(mu1.shape)}, {list(mu2.shape)}")
    if sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(
            f"sigma1 and sigma2 must have shape [D, D] = [{D}, {D}], got {list(sigma1.shape)}, {list(sigma2.shape)}"
        )
    # 1. sqrt(sigma1) via eigh; symmetrise first so rounding cannot make eigh see a non-symmetric input
    A = _sqrtm_psd(0.5 * (sigma1 + sigma1.T))
    # 2. Tr (sigma1 sigma2)^{1/2} = sum sqrt(eig(A sigma2 A)), round-off eigenvalues clamped to 0
    M = A @ sigma2 @ A
    lam = _clamp_round_off(torch.linalg.eigvalsh(0.5 * (M + M.T)))
    tr_covmean = lam.sqrt().sum()
    # 3. assemble FD [FID, Eq. 6]; clamp the round-off below zero of identical statistics
    fd = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(fd.item(), 0.0)


# --------------------------------------------------------------------------- features and accuracy


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate [N, 1, 28, 28] float images in [-1, 1] (with slack); return them clipped."""
    if not torch.is_tensor(images):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"{name} must have shape [N, 1, 28, 28], got {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1 - PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
        raise ValueError(
            f"{name} must lie in [-1, 1] (the minidit.data convention), got values in [{lo:.3g}, {hi:.3g}]; "
            "map [0, 255] pixels with x / 127.5 - 1"
        )
    return images.clamp(-1, 1)


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if not torch.is_tensor(labels) or labels.is_floating_point() or labels.ndim != 1:
        raise ValueError("labels must be a 1-D integer tensor of class indices")
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but there are {n} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be class indices in 0..{NUM_CLASSES - 1}")
    return labels


def _batches(images: torch.Tensor, batch_size: int, progress: bool, desc: str):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    starts = range(0, images.shape[0], batch_size)
    return tqdm(starts, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def feature_stats(
    images: torch.Tensor, net: nn.Module, batch_size: int = 500, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the features phi(x) = net.features(x).

    Args:
        images: [N, 1, 28, 28] in [-1, 1], N >= 2; moved batch by batch to the net's device.
        net: a `FeatureNet` (anything with a `.features` method returning [B, D]), in eval mode.
        batch_size: images per forward pass.
        progress: show a tqdm bar.

    Returns:
        mu [D] and the unbiased covariance sigma [D, D], float64 on the CPU.
    """
    images = _check_images(images)
    if images.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 images for a covariance, got {images.shape[0]}")
    device = next(net.parameters()).device
    feats = []
    for i in _batches(images, batch_size, progress, "features"):
        feats.append(net.features(images[i : i + batch_size].to(device)).to("cpu", torch.float64))
    f = torch.cat(feats)  # [N, D]
    mu = f.mean(0)  # [D]
    fc = f - mu  # [N, D]
    sigma = fc.T @ fc / (f.shape[0] - 1)  # [D, D]
    return mu, sigma


@torch.no_grad()
def classifier_accuracy(
    images: torch.Tensor, labels: torch.Tensor, net: nn.Module, batch_size: int = 500, progress: bool = True
) -> float:
    """Fraction of images that `net` classifies as their label.

    For class-conditional samples, `labels` are the requested classes: the result is how
    often the model drew the digit it was asked for.

    Args:
        images: [N, 1, 28, 28] in [-1, 1].
        labels: [N] integer classes in 0..9.
        net: a classifier returning logits [B, 10], in eval mode.
    """
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    device = next(net.parameters()).device
    correct = 0
    for i in _batches(images, batch_size, progress, "classify"):
        pred = net(images[i : i + batch_size].to(device)).argmax(1).cpu()  # [B]
        correct += (pred == labels[i : i + batch_size].cpu()).sum().item()
    return correct / images.shape[0]


# --------------------------------------------------------------------------- evaluating a model's samples

EVAL_DATASETS = ("mnist",)  # datasets with shipped feature-net weights


def _resolve_root(root) -> str | None:
    root = root if root is not None else os.environ.get("MINIDIT_DATA")
    return None if root is None else str(root)


@functools.lru_cache(maxsize=4)
def _shipped_net(dataset: str, device: str) -> nn.Module:
    return load_feature_net(dataset, device=device)


@functools.lru_cache(maxsize=16)
def _real_subset_stats(dataset: str, split: str, n: int, root: str | None, device: str):
    """Feature statistics of n real images of `split`, a fixed random subset (seed REFERENCE_SEED)."""
    images, _ = load_mnist(split=split, root=root)
    if n > images.shape[0]:
        raise ValueError(f"n={n} is larger than the MNIST {split} split ({images.shape[0]} images)")
    g = torch.Generator().manual_seed(REFERENCE_SEED)
    idx = torch.randperm(images.shape[0], generator=g)[:n]  # [n]
    return feature_stats(images[idx], _shipped_net(dataset, device), progress=False)


def reference_stats(dataset: str, n: int, root: str | None = None, device: str | torch.device = "cpu"):
    """The real images' feature statistics that `evaluate_samples` compares with (n test images, and
    n train images for the floor), computed once and cached; call it first to fail before sampling
    when the data is missing."""
    if dataset not in EVAL_DATASETS:
        raise ValueError(f"dataset must be one of {EVAL_DATASETS}, got {dataset!r}")
    root, device = _resolve_root(root), str(torch.device(device))
    return (_real_subset_stats(dataset, "test", n, root, device), _real_subset_stats(dataset, "train", n, root, device))


def evaluate_samples(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    dataset: str = "mnist",
    n: int | None = None,
    root: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Score generated digits with the MNIST-classifier FD and classifier accuracy.

    The first n samples are compared with n MNIST test images (a fixed random subset). The
    floor is the same distance for n MNIST training images against that same test subset:
    real data scores the floor, not zero, because FD estimated from n images is biased up.
    Real-image statistics are cached in memory, so repeated calls cost only the samples.

    Args:
        images: generated samples, [N, 1, 28, 28] in [-1, 1].
        labels: the classes the samples were conditioned on, [N]; None for unconditional.
        dataset: "mnist" (the only dataset whose feature net ships).
        n: how many samples to score, 2 <= n <= min(N, 10000); None takes min(N, 10000).
        root: MNIST root folder; None reads the ``MINIDIT_DATA`` environment variable.
        device: where the feature network runs.
        progress: show tqdm bars while features are computed.

    Returns:
        {"fd": MNIST-classifier FD of the samples, "fd_floor": real-vs-real FD at the same n,
            "accuracy": classifier accuracy against `labels` (None without labels), "n": n}.
    """
    if dataset not in EVAL_DATASETS:
        raise ValueError(f"dataset must be one of {EVAL_DATASETS}, got {dataset!r}")
    images = _check_images(images)
    n_max = min(images.shape[0], 10_000)  # 10 000 = the MNIST test set, our reference
    if n is None:
        n = n_max
    if not isinstance(n, int) or not 2 <= n <= n_max:
        raise ValueError(
            f"n must be an int in [2, {n_max}] (at most the {images.shape[0]} samples given and the "
            f"10000 MNIST test images), got {n!r}"
        )
    if labels is not None:
        labels = _check_labels(labels, images.shape[0])[:n]
    net = _shipped_net(dataset, str(torch.device(device)))
    # 1. reference: n test images; floor: n train images against that same reference
    (mu_test, sigma_test), (mu_train, sigma_train) = reference_stats(dataset, n, root, device)
    # 2. the samples
    mu, sigma = feature_stats(images[:n], net, progress=progress)
    return {
        "fd": frechet_distance(mu, sigma, mu_test, sigma_test),
        "fd_floor": frechet_distance(mu_train, sigma_train, mu_test, sigma_test),
        "accuracy": None if labels is None else classifier_accuracy(images[:n], labels, net, progress=progress),
        "n": n,
    }


def quality_line(scores: dict, name: str = "") -> str:
    """The one line every tutorial prints under an MNIST sample grid:

        "quality: accuracy A, FD F (floor R), n N"      (accuracy "-" without labels)

    Args:
        scores: a dict from `evaluate_samples`.
        name: an optional prefix naming the model, e.g. "DiT" -> "DiT quality: ...".
    """
    missing = {"fd", "fd_floor", "accuracy", "n"} - set(scores)
    if missing:
        raise ValueError(f"scores must come from evaluate_samples; missing {sorted(missing)}")
    acc = "-" if scores["accuracy"] is None else f"{scores['accuracy']:.3f}"
    prefix = f"{name} " if name else ""
    return f"{prefix}quality: accuracy {acc}, FD {scores['fd']:.2f} (floor {scores['fd_floor']:.2f}), n {scores['n']}"


def report_quality(images: torch.Tensor, labels: torch.Tensor | None = None, n: int | None = None,
                   name: str = "", root: str | None = None, device: str | torch.device = "cpu") -> dict:
    """Score samples with `evaluate_samples` and print their `quality_line`; returns the scores.

    Args:
        images: generated samples [N, 1, 28, 28] in [-1, 1]; labels: their classes [N] or None.
        n: how many to score (default all, at most 10 000); name: prefix of the printed line.
    """
    scores = evaluate_samples(images, labels, n=n, root=root, device=device, progress=False)
    print(quality_line(scores, name))
    return scores


# --------------------------------------------------------------------------- Inception FID (CIFAR-10)


def inception_fid(
    images: torch.Tensor,
    reference: str | torch.Tensor = "cifar10-train",
    batch_size: int = 200,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """The FID of the literature (Inception-v3 features [FID]) through torch-fidelity.

    An optional extra: ``pip install "minidit[fid]"`` installs torch-fidelity, which downloads
    the Inception weights (and, for a registered reference such as "cifar10-train", the
    dataset) on first use and caches them under $TORCH_HOME.

    Args:
        images: generated RGB images, [N, 3, H, W] in [-1, 1].
        reference: a torch-fidelity registered input ("cifar10-train", "cifar10-val") or real
            images [M, 3, H, W] in [-1, 1].
        batch_size: images per Inception forward pass.
        device: None uses CUDA when available.
        progress: let torch-fidelity print its progress.

    Raises:
        ImportError: torch-fidelity is not installed.
    """

    def to_uint8(x: torch.Tensor, name: str) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape [N, 3, H, W] in [-1, 1]")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        return ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [N, 3, H, W]

    images = to_uint8(images, "images")
    if not isinstance(reference, str):
        reference = to_uint8(reference, "reference")
    try:
        import torch_fidelity
    except ImportError as err:
        raise ImportError(
            "inception_fid needs the optional package torch-fidelity: pip install 'minidit[fid]' "
            "(or pip install torch-fidelity). For MNIST use evaluate_samples, which needs nothing extra."
        ) from err

    class _Uint8Images(torch.utils.data.Dataset):  # torch-fidelity reads uint8 [3, H, W] items
        def __init__(self, x: torch.Tensor):
            self.x = x

        def __len__(self) -> int:
            return self.x.shape[0]

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.x[i]

    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    ref = reference if isinstance(reference, str) else _Uint8Images(reference)
    out = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(images), input2=ref, fid=True, cuda=use_cuda, batch_size=batch_size, verbose=progress
    )
    return float(out["frechet_inception_distance"])

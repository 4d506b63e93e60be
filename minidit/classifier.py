"""The small MNIST classifier whose penultimate layer is our feature space for sample quality.

A Frechet distance needs a feature map phi(x) in which "looks like a real digit" is a
short distance. Inception-v3 plays that role for natural images [FID]; for 28x28 digits
a small convolutional network trained to classify them does the same job, trains in a few
minutes on a laptop CPU, and its logits also tell us which class a sample resembles:

    h = ReLU(W_f · flatten(conv_stack(x)) + b_f)       the 128-D feature phi(x)
    logits = W_c · h + b_c                             10 class scores

The shipped weights (``minidit/weights/mnist_feature_net.safetensors``, written by
``benchmarks/train_feature_net.py``) are part of the metric's definition: a number
measured with other weights is a different metric. Inputs are images in [-1, 1] of
shape [B, 1, 28, 28], the convention of `minidit.data.load_mnist`.

References: [FID] Heusel et al. 2017, "GANs trained by a two time-scale update rule
converge to a local Nash equilibrium" (the Frechet distance in a classifier's features).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

# Datasets the network is built for. Only MNIST weights ship today; Fashion-MNIST weights
# come from the same training script (``--dataset fashion_mnist``) and load with `path=`.
DATASETS = ("mnist", "fashion_mnist")
SHIPPED = {"mnist": "mnist_feature_net"}
# Conv widths: 16-32-64 rather than 32-64-128 trains 4x faster (1.9 vs 7.5 M multiply-adds per
# image) and still classifies MNIST test digits above 99.3%, which is all the metric needs.
CHANNELS = (16, 32, 64)
FEATURE_DIM = 128
NUM_CLASSES = 10


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool: halves H and W."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FeatureNet(nn.Module):
    """Conv 16-32-64 classifier for 1x28x28 images with a 128-D penultimate feature layer.

    Spatial sizes through the stack: 28 -> 14 -> 7 -> 3 (floor of 7/2).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2, c3 = CHANNELS
        self.convs = nn.Sequential(_conv_block(1, c1), _conv_block(c1, c2), _conv_block(c2, c3))
        self.fc = nn.Linear(c3 * 3 * 3, feature_dim)
        self.dropout = nn.Dropout(0.3)  # active only in training; features are taken in eval mode
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"images must have shape [B, 1, 28, 28], got {list(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map phi(x).

        Args:
            x: images in [-1, 1], shape [B, 1, 28, 28].

        Returns:
            Features after the penultimate ReLU, shape [B, 128].
        """
        self._check(x)
        z = self.convs(x)  # [B, 64, 3, 3]
        z = z.flatten(1)  # [B, 576]
        return torch.relu(self.fc(z))  # [B, 128]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape [B, 10], for images x of shape [B, 1, 28, 28] in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


# --------------------------------------------------------------------------- weights I/O


def save_feature_net(net: FeatureNet, path: str | Path) -> None:
    """Write the network's state dict (float32, CPU) to a safetensors file."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    # BatchNorm's integer step counter is not needed at inference; keep the file float-only.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path), metadata={"format": "pt", "model": "minidit.classifier.FeatureNet"})


def _weights_file(name: str) -> Path:
    return Path(str(resources.files("minidit") / "weights" / name))


def load_feature_net(
    dataset: str = "mnist",
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> FeatureNet:
    """Load a trained `FeatureNet` in eval mode with frozen parameters.

    Args:
        dataset: "mnist" (weights ship with the package) or "fashion_mnist" (pass `path`).
        path: a safetensors file written by `save_feature_net`; None loads the shipped
            weights for `dataset`.
        device: where to put the network.

    Raises:
        ValueError: unknown dataset, or no shipped weights for it and no `path` given.
        FileNotFoundError: `path` does not exist.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if path is None:
        if dataset not in SHIPPED:
            raise ValueError(
                f"no feature-net weights ship for dataset={dataset!r} (shipped: {sorted(SHIPPED)}); "
                f"train them with `python benchmarks/train_feature_net.py --dataset {dataset}` "
                "and pass path=..."
            )
        path = _weights_file(SHIPPED[dataset] + ".safetensors")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature-net weights not found: {path}")
    state = load_file(str(path))
    net = FeatureNet()
    # The file omits BatchNorm's step counters (see `save_feature_net`); nothing else may differ.
    missing = [k for k in set(net.state_dict()) - set(state) if not k.endswith("num_batches_tracked")]
    unexpected = sorted(set(state) - set(net.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{path} does not hold FeatureNet weights: missing {sorted(missing)}, "
                         f"unexpected {unexpected}")
    net.load_state_dict(state, strict=False)
    net.eval().requires_grad_(False)
    return net.to(device)


def feature_net_info(dataset: str = "mnist") -> dict:
    """The training record (test accuracy, epochs, seed, command, ...) of the shipped weights."""
    if dataset not in SHIPPED:
        raise ValueError(f"dataset must be one of {sorted(SHIPPED)} (shipped weights), got {dataset!r}")
    return json.loads(_weights_file(SHIPPED[dataset] + ".json").read_text())

"""Tests for minidit.classifier: the feature network, its weights file, the shipped MNIST weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minidit import classifier
from minidit.classifier import FEATURE_DIM, FeatureNet, feature_net_info, load_feature_net, save_feature_net


def test_shapes_and_features_feed_the_head():
    torch.manual_seed(0)
    net = FeatureNet().eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    h = net.features(x)
    assert h.shape == (5, FEATURE_DIM) and (h >= 0).all()  # post-ReLU features
    torch.testing.assert_close(net(x), net.head(h))  # eval mode: logits = linear head of the features
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        net(torch.zeros(5, 1, 32, 32))


def test_eval_mode_is_per_sample():
    # BatchNorm in eval mode uses running statistics: a sample's features do not depend on its batch
    torch.manual_seed(1)
    net = FeatureNet()
    net(torch.rand(64, 1, 28, 28) * 2 - 1)  # one training-mode pass moves the running stats
    net.eval()
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(net.features(x)[:3], net.features(x[:3]), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path: Path):
    torch.manual_seed(2)
    net = FeatureNet()
    net(torch.rand(16, 1, 28, 28))  # non-trivial BatchNorm running statistics
    net.eval()
    path = tmp_path / "net.safetensors"
    save_feature_net(net, path)
    loaded = load_feature_net("fashion_mnist", path=path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded(x), net(x))


def test_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_feature_net("cifar10")
    with pytest.raises(ValueError, match="no feature-net weights ship"):
        load_feature_net("fashion_mnist")
    with pytest.raises(FileNotFoundError):
        load_feature_net(path=tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not hold FeatureNet weights"):
        load_feature_net(path=tmp_path / "other.safetensors")


def test_shipped_weights_are_small_and_documented():
    path = classifier._weights_file("mnist_feature_net.safetensors")
    assert path.is_file() and path.stat().st_size < 2 * 2**20
    info = feature_net_info("mnist")
    assert info["test_accuracy"] >= 0.993 and info["epochs"] >= 1
    assert "benchmarks/train_feature_net.py" in info["command"]
    net = load_feature_net("mnist")
    assert sum(p.numel() for p in net.parameters()) == info["parameters"]


@pytest.mark.skipif(not os.environ.get("MINIDIT_DATA"), reason="real MNIST needed: set MINIDIT_DATA to the dataset root")
def test_shipped_net_classifies_real_mnist_test_digits():
    from minidit.data import load_mnist

    images, labels = load_mnist(split="test")
    net = load_feature_net("mnist")
    with torch.no_grad():
        pred = net(images[:2000]).argmax(1)
    assert (pred == labels[:2000]).double().mean().item() >= 0.99

"""The weights that ship with minidit: checksums, loading, and that each shipped model is good."""

from __future__ import annotations

import json

import pytest
import torch

from minidit.metrics import classifier_accuracy
from minidit.classifier import load_feature_net
from minidit.run import weights
from minidit.run.checkpoint import CheckpointError
from minidit.run.generate import class_labels, sample_model
from minidit.run.pretrained import describe, load, names
from minidit.toy_models import TinyMLP

SHIPPED = ["mnist-ae", "mnist-cd", "mnist-ddpm", "mnist-dit", "mnist-meanflow", "mnist-mmdit", "mnist-text"]  # what the package must hold
CAPTION_MODELS = ["mnist-mmdit", "mnist-text"]  # read captions (minidit.captions), not labels


def test_write_then_read_round_trips_and_checks_the_checksum(tmp_path):
    net = TinyMLP(1, 8, num_classes=10, hidden=16)
    config = {"model": "mlp", "dataset": "synthetic"}
    entry = weights.write("tiny", net.state_dict(), config, {"steps": 3}, "float16", folder=tmp_path)
    assert entry.sha256 == weights.sha256_of(tmp_path / "tiny.safetensors")
    state, again = weights.read("tiny", folder=tmp_path)
    assert again == entry and set(state) == set(net.state_dict())
    for k, v in net.state_dict().items():  # float16 storage, read back as float32
        assert state[k].dtype == torch.float32
        torch.testing.assert_close(state[k], v.half().float())
    # a second entry keeps the first; the manifest is plain JSON
    weights.write("tiny32", net.state_dict(), config, {}, "float32", folder=tmp_path)
    assert set(json.loads((tmp_path / "manifest.json").read_text())) == {"tiny", "tiny32"}
    exact, _ = weights.read("tiny32", folder=tmp_path)
    assert all(torch.equal(exact[k], v) for k, v in net.state_dict().items())  # float32: bit for bit
    # one flipped byte is caught before the file is read as weights
    data = bytearray((tmp_path / "tiny.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "tiny.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or changed"):
        weights.read("tiny", folder=tmp_path)
    (tmp_path / "tiny.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        weights.read("tiny", folder=tmp_path)
    with pytest.raises(ValueError, match="valid names: tiny, tiny32"):
        weights.read("nope", folder=tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        weights.write("x", net.state_dict(), config, {}, "int8", folder=tmp_path)


def test_every_model_the_package_promises_is_there_and_small():
    assert names() == SHIPPED
    total = sum((weights.FOLDER / e.file).stat().st_size for e in weights.entries().values())
    assert total <= 20 * 2**20
    for name in SHIPPED:
        record = weights.entry(name).record
        assert record["command"].startswith("minidit train --preset") and record["steps"] > 0
        assert name in describe(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in ("mnist-ae", *CAPTION_MODELS)])
def test_each_shipped_generator_draws_the_digit_asked_for(name):
    # a hundred samples with the model's own sampler, classified by the shipped MNIST classifier
    model, objective, config = load(name)
    drawn = sample_model(model, objective, config, 100, seed=1)
    accuracy = classifier_accuracy(drawn["images"], drawn["labels"], load_feature_net("mnist"), progress=False)
    assert accuracy >= 0.9, (name, accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("name", CAPTION_MODELS)
def test_each_shipped_caption_model_draws_the_digit_and_the_attributes_asked_for(name, mnist_root):
    # every (digit, thickness, slant) once: the digit read by the classifier, the attributes measured on
    # the samples in the training set's bins; a model deaf to the attribute words scores 1/3 on each
    from minidit.captions import AttributeBins, prompt_grid
    from minidit.data import load_dataset

    model, objective, config = load(name)
    assert config.captions and model.config.conditioning in ("text-cross-attention", "mmdit")
    texts, wanted = prompt_grid(90)
    drawn = sample_model(model, objective, config, 90, prompts=texts, seed=1)
    accuracy = classifier_accuracy(drawn["images"], wanted[:, 0], load_feature_net("mnist"), progress=False)
    images, _ = load_dataset("mnist", "train", root=mnist_root)
    thick, slant = AttributeBins.fit(images).classes(drawn["images"])
    attributes = [float((thick == wanted[:, 1]).float().mean()), float((slant == wanted[:, 2]).float().mean())]
    assert accuracy >= 0.9 and min(attributes) > 0.5, (name, accuracy, attributes)


def test_the_shipped_autoencoder_reconstructs_digits(mnist_root):
    from minidit.data import load_dataset

    model, _, _ = load("mnist-ae")
    images, labels = load_dataset("mnist", "test", root=mnist_root)
    x = images[:200]
    with torch.no_grad():
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
    psnr = 10 * torch.log10(4.0 / ((recon - x) ** 2).mean())
    assert psnr > 20.0
    assert classifier_accuracy(recon, labels[:200], load_feature_net("mnist"), progress=False) >= 0.95

"""What a config builds: the network, the objective, the training data; and a trained run from its file.

`make_model` sizes the network for the dataset (or, for a latent objective, for the
autoencoder's latents) and `make_objective` sets the null label of classifier-free guidance
to the number of classes. With `captions` the network reads captions (`minidit.captions`: MNIST or Fashion-MNIST)
instead of labels: its text conditioning defaults to cross-attention, the training data are
(image, caption ids) pairs without the held-out combinations, and the null label is `<null>`. `load_checkpoint` rebuilds both from the config a checkpoint
stores, with its weights, ready to sample (`minidit.run.generate`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from minidit import data
from minidit.autoencoder import AUTOENCODER_BUILDERS
from minidit.captions import CLASS_NAMES, caption_tokenizer, encode_dataset
from minidit.dit import TEXT_CONDITIONINGS, make_dit
from minidit.run import weights
from minidit.run.checkpoint import load_weights, read_checkpoint
from minidit.run.config import TrainConfig
from minidit.run.fewstep import FEWSTEP_OBJECTIVES, StudentObjective
from minidit.run.latent import AutoencoderObjective, LatentObjective, latent_input_shape
from minidit.run.objectives import DIFFUSION_OBJECTIVES, objective_from_config
from minidit.text import NULL
from minidit.toy_models import TinyMLP
from minidit.unet import UNET_BUILDERS

MODEL_BUILDERS = {"mlp": TinyMLP, **AUTOENCODER_BUILDERS, **UNET_BUILDERS}  # other names go to minidit.dit.make_dit
OBJECTIVES = {**DIFFUSION_OBJECTIVES, "latent": LatentObjective, "autoencoder": AutoencoderObjective,
              **FEWSTEP_OBJECTIVES}


def make_model(config: TrainConfig) -> nn.Module:
    """The network of `config`, sized for its dataset (or its latents), with fresh weights."""
    channels, side, classes = data.dataset_shape(config.dataset)
    if config.objective.get("kind") == "latent":
        channels, side, _ = latent_input_shape(config.objective)  # the DiT sees c x h x w latents
    kwargs = {"in_channels": channels, "input_size": side,
              "num_classes": classes if config.class_conditional else 0, **config.model_overrides}
    if config.captions:
        check_captions(config)
        tok = caption_tokenizer(config.dataset)
        kwargs = {"conditioning": "text-cross-attention", **kwargs, "num_classes": 0, "text_vocab": tok.vocab_size,
                  "text_length": tok.length}
    if config.model in MODEL_BUILDERS:
        return MODEL_BUILDERS[config.model](**kwargs)
    return make_dit(config.model, **{"learn_sigma": False, **kwargs})  # minidit's objectives learn no variance


def make_objective(config: TrainConfig):
    """The objective of `config`; its null label defaults to the number of classes."""
    null_label = data.dataset_shape(config.dataset)[2] if config.class_conditional else None
    null_label = NULL if config.captions else null_label
    objective = objective_from_config({"null_label": null_label, **config.objective}, OBJECTIVES)
    student = getattr(objective, "inner_objective", objective)  # a latent objective's inner one
    if isinstance(student, StudentObjective):  # it loads its teacher's run when it first needs it
        student.load_run = load_teacher
    return objective


def load_shipped(name: str, device: str | torch.device = "cpu", folder=weights.FOLDER
                 ) -> tuple[nn.Module, object, TrainConfig]:
    """Shipped model `name` ("pretrained:NAME" without the prefix): (EMA network, frozen, in eval
    mode on `device`; its objective; its TrainConfig). See `minidit.run.pretrained`."""
    state, entry = weights.read(name, folder)
    config = TrainConfig.from_dict(entry.config)
    model = make_model(config)
    load_weights(model, state, f"{weights.PREFIX}{name}")
    return model.requires_grad_(False).to(device).eval(), make_objective(config), config


def load_teacher(path: str, device: str | torch.device = "cpu"):
    """A few-step student's teacher: (network, EMA network, objective, config) of a checkpoint, or of
    a shipped model ("pretrained:NAME", whose one network is its EMA). A latent run's objective is
    its inner one, the diffusion its network solves on the latents the student shares with it."""
    if str(path).startswith(weights.PREFIX):
        model, objective, config = load_shipped(str(path)[len(weights.PREFIX):], device)
        ema = model
    else:
        model, ema, objective, config = load_checkpoint(path, device)
    return model, ema, getattr(objective, "inner_objective", objective), config


def training_data(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images [N, C, H, W] in [-1, 1] and labels [N] of `config.dataset` (the first
    `dataset_size` of them); "synthetic" is 512 seeded random 8x8 images, label i % 10."""
    if config.dataset == "synthetic":
        n = config.dataset_size or 512
        images = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1234)) * 2 - 1
        return images, torch.arange(n) % 10
    images, labels = data.load_dataset(config.dataset, "train", root=config.data_root)
    images, labels = images[: config.dataset_size], labels[: config.dataset_size]
    if config.captions:  # (image, caption ids [L]) pairs; the held-out combinations never seen
        check_captions(config)
        ids, keep, _ = encode_dataset(images, labels, dataset=config.dataset)
        return images[keep], ids[keep]
    return images, labels


def check_captions(config: TrainConfig) -> None:
    """Raise ValueError unless `config` can train on captions: a captioned dataset, conditional, a
    text-reading DiT."""
    conditioning = config.model_overrides.get("conditioning", "text-cross-attention")
    if config.dataset not in CLASS_NAMES or not config.class_conditional or conditioning not in TEXT_CONDITIONINGS:
        raise ValueError(f"captions=true needs a dataset in {sorted(CLASS_NAMES)}, class_conditional=true and a "
                         f"DiT whose conditioning is one of {TEXT_CONDITIONINGS}; got {config.dataset!r}, "
                         f"class_conditional={config.class_conditional}, conditioning={conditioning!r}")
    if config.hflip:
        raise ValueError("captions=true with hflip=true: a mirrored image leans the other way, so its caption's "
                         "slant word would be wrong; set hflip=false")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a trained run from its checkpoint, for sampling and evaluation.

    Returns:
        (model, ema_model, objective, config): the live and the EMA network (eval mode, on
        `device`), the objective and the `TrainConfig` the run was trained with.

    Raises:
        CheckpointError: the file is unreadable or does not fit its model; for a latent model,
            its autoencoder checkpoint is missing or not the one it was trained with.
    """
    state = read_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    model, ema_model = make_model(config), make_model(config)
    load_weights(model, state["model"], path)
    load_weights(ema_model, state["ema"]["model"], path)
    ema_model.requires_grad_(False)
    return model.to(device).eval(), ema_model.to(device).eval(), make_objective(config), config

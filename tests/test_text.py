"""Captions measured on images, the tokenizer and text encoder, and the DiT's two ways of reading text."""

from __future__ import annotations

import math

import pytest
import torch

from minidit import captions as C
from minidit.attention import Attention, CrossAttention, explicit_attention
from minidit.captions import HELD_OUT, caption_tokenizer, parse_caption
from minidit.cli import config_from_preset
from minidit.dit import AdaLNBlock, make_dit
from minidit.guidance import drop_labels, guided
from minidit.denoiser import Denoiser
from minidit.flow import FlowProcess
from minidit.run.build import load_checkpoint, make_model, make_objective, training_data
from minidit.run.engine import train
from minidit.run.generate import evaluate_model, sample_model
from minidit.text import NULL, PAD, UNK, TextEncoder, Tokenizer
from minidit.text_blocks import MMDiTBlock, TextCrossAttentionBlock


# --------------------------------------------------------------------------- synthetic strokes


def bar(width: int, height: int, shear: float = 0.0, side: int = 28, top: int = 4) -> torch.Tensor:
    """One image [1, 1, side, side] in [-1, 1]: a vertical bar of `width` x `height` pixels whose
    column moves right by `shear` per row upwards (anti-aliased by the fraction of each pixel covered)."""
    img = torch.zeros(side, side, dtype=torch.float64)
    bottom = top + height - 1
    for r in range(top, top + height):
        left = side // 2 - width // 2 + shear * (bottom - r)  # the row's left edge, shifted by the shear
        for col in range(side):
            img[r, col] = max(0.0, min(col + 1, left + width) - max(col, left))  # overlap of [col, col+1]
    return (img * 2 - 1)[None, None].float()


@pytest.mark.parametrize("width", [2, 3, 4])
def test_thickness_of_a_long_bar_is_its_width(width):
    # area w·l over half the perimeter (w + l): w·l/(w + l), within 15 % of w for l = 20
    w = float(C.thickness(bar(width, 20)))
    assert w == pytest.approx(width * 20 / (width + 20), rel=0.05)
    assert abs(w - width) / width < 0.17


def test_thickness_orders_strokes():
    ws = [float(C.thickness(bar(w, 18))) for w in (1, 2, 3, 5)]
    assert ws == sorted(ws) and ws[0] < ws[-1] / 3


@pytest.mark.parametrize("shear", [-0.3, 0.0, 0.25, 0.5])
def test_slant_recovers_the_shear(shear):
    assert float(C.slant(bar(3, 20, shear))) == pytest.approx(shear, abs=0.02)


def test_size_and_position_of_a_bar():
    img = bar(4, 12, top=3)
    assert float(C.size(img)) == 12
    u, v = C.position(img)[0].tolist()
    assert u == pytest.approx(12 + 1.5, abs=1e-4)  # columns 12..15 -> centre 13.5
    assert v == pytest.approx(27 - (3 + 14) / 2, abs=1e-4)  # rows 3..14 counted from the bottom (row 27 is v = 0)


def test_measure_rejects_colour_images():
    with pytest.raises(ValueError, match="grey"):
        C.measure(torch.zeros(2, 3, 28, 28))


# --------------------------------------------------------------------------- captions


def test_captions_name_digit_thickness_and_slant():
    assert C.caption(7, 2, 2) == "a thick seven, slanted right"
    assert C.caption(1) == "a one"
    assert C.caption(8, None, 1) == "an eight, upright"
    with pytest.raises(ValueError, match="label must lie in"):
        C.caption(10)
    for d in range(10):
        for w in (None, 0, 1, 2):
            for s in (None, 0, 1, 2):
                assert C.parse_caption(C.caption(d, w, s)) == (d, w, s)


def test_bins_are_terciles_and_captions_are_deterministic_with_held_out_combinations():
    gen = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 5, (60,), generator=gen)
    shears = (torch.rand(60, generator=gen) - 0.5) * 0.8
    images = torch.cat([bar(int(w), 18, float(s)) for w, s in zip(widths, shears)])
    bins = C.AttributeBins.fit(images)
    w, s = bins.classes(images)
    for cls in (w, s):  # terciles: each word covers about a third of the images
        counts = torch.bincount(cls, minlength=3)
        assert counts.min() >= 12, counts
    labels = torch.arange(60) % 10
    texts, keep = C.caption_dataset(images, labels, bins, held_out=((3, 0, 0),))
    again, _ = C.caption_dataset(images, labels, bins, held_out=((3, 0, 0),))
    assert texts == again
    held = (labels == 3) & (w == 0) & (s == 0)
    assert torch.equal(keep, ~held)
    for i, text in enumerate(texts):  # the form follows the index; what it names is what was measured
        d, wc, sc = C.parse_caption(text)
        form = C.CAPTION_FORMS[i % 4]
        assert d == labels[i] and (wc == w[i] if "thickness" in form else wc is None)
        assert sc == s[i] if "slant" in form else sc is None


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_unknown_words_truncation_and_null():
    tok = C.caption_tokenizer()
    ids, mask = tok.encode(["a thick seven, slanted right", "a purple seven", ""])
    assert ids.shape == (3, C.CAPTION_LENGTH) and ids.dtype == torch.long
    assert tok.decode(ids[:1]) == ["a thick seven slanted right"]
    assert ids[1, 1] == UNK and tok.decode(ids[1:2]) == ["a <unk> seven"]
    assert torch.equal(ids[2], tok.null_ids(1)[0]) and bool(mask[2].all())  # empty -> the null caption
    assert mask[0].tolist() == [True] * 5 + [False] and ids[0, 5] == PAD
    short = Tokenizer(tok.vocabulary, length=2)
    assert short.decode(short.encode("a thick seven")[0]) == ["a thick"]
    with pytest.raises(ValueError, match="distinct"):
        Tokenizer(["a", "a"])
    assert Tokenizer.fit(["b a", "c"]).vocabulary == ("a", "b", "c")


# --------------------------------------------------------------------------- masks


def test_masked_keys_get_zero_weight_and_sdpa_agrees():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    out, w = explicit_attention(q, k, v, mask[:, None, None, :])
    assert float(w[0, :, :, [2, 4]].abs().max()) == 0.0
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    attn = Attention(12, 3)
    x = torch.randn(2, 5, 12, generator=gen)
    torch.testing.assert_close(attn(x, mask=mask), Attention.forward(attn, x, True, mask)[0])
    with pytest.raises(ValueError, match="bool tensor"):
        attn(x, mask=mask.float())
    with pytest.raises(ValueError, match="at least one True"):
        attn(x, mask=torch.zeros(2, 5, dtype=torch.bool))


def test_padding_never_changes_cross_attention():
    gen = torch.Generator().manual_seed(1)
    cross = CrossAttention(8, 2)
    x, c = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 4 + [False] * 2])
    other = torch.where(mask[..., None], c, torch.randn(2, 6, 8, generator=gen))  # new padding values
    torch.testing.assert_close(cross(x, c, context_mask=mask), cross(x, other, context_mask=mask))
    assert not torch.allclose(cross(x, c), cross(x, other))  # without the mask the padding is read


# --------------------------------------------------------------------------- the blocks


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every parameter N(0, scale²): the zero-initialised gates open, so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_new_blocks_are_the_identity_at_initialisation():
    gen = torch.Generator().manual_seed(2)
    x, c, s = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 4, 16, generator=gen), torch.randn(2, 16, generator=gen)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    torch.testing.assert_close(TextCrossAttentionBlock(16, 4)(x, s, c, mask), x)
    x2, c2 = MMDiTBlock(16, 4)(x, c, s, mask)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(c2, c)
    for cond in ("text-cross-attention", "mmdit"):  # and the whole DiT predicts zero
        dit = make_dit("dit-mnist-cpu", conditioning=cond, num_classes=0, text_vocab=10, text_length=4)
        ids = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]])
        with torch.no_grad():
            assert float(dit(torch.randn(2, 1, 28, 28), torch.tensor([10.0, 500.0]), ids).abs().max()) == 0.0


def test_mmdit_with_shared_weights_is_one_adaln_zero_block_on_the_joined_sequence():
    block = MMDiTBlock(16, 4)
    _randomise(block.image, 3)
    block.text.load_state_dict(block.image.state_dict())  # the same weights for text and image tokens
    plain = AdaLNBlock(16, 4, 4.0, zero=True, backend="sdpa")
    plain.load_state_dict(block.image.state_dict())  # the same parameter names: norm1, attn, norm2, mlp, modulation
    gen = torch.Generator().manual_seed(4)
    x, c, s = torch.randn(2, 7, 16, generator=gen), torch.randn(2, 3, 16, generator=gen), torch.randn(2, 16, generator=gen)
    x2, c2 = block(x, c, s)
    joined = plain(torch.cat([c, x], dim=1), s)
    torch.testing.assert_close(torch.cat([c2, x2], dim=1), joined, atol=1e-5, rtol=1e-5)
    # and the explicit path (with the weights) computes the same
    x3, c3, w = block(x, c, s, return_weights=True)
    torch.testing.assert_close(x3, x2, atol=1e-5, rtol=1e-5)
    assert w.shape == (2, 4, 10, 10)


@pytest.mark.parametrize("cond", ["text-cross-attention", "mmdit"])
def test_padding_content_never_reaches_the_dit_output(cond):
    dit = make_dit("dit-mnist-cpu", conditioning=cond, num_classes=0, text_vocab=12, text_length=6).eval()
    _randomise(dit, 5, 0.05)
    gen = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 1, 28, 28, generator=gen), torch.tensor([100.0, 700.0])
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 0]])
    before = dit(x, t, ids)
    with torch.no_grad():  # change what padding would contribute: its embedding and positions 3..5
        dit.text_encoder.token_embed.weight[PAD].normal_(generator=gen)
        dit.text_encoder.pos_embed[:, 5].normal_(generator=gen)
    torch.testing.assert_close(dit(x, t, ids), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a real token's embedding does matter
        dit.text_encoder.token_embed.weight[3].normal_(generator=gen)
    assert not torch.allclose(dit(x, t, ids), before, atol=1e-4)


def test_text_dit_checks_its_inputs_and_reads_none_as_the_null_caption():
    dit = make_dit("dit-mnist-cpu", conditioning="mmdit", num_classes=0, text_vocab=12, text_length=4).eval()
    _randomise(dit, 7, 0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3.0, 4.0])
    torch.testing.assert_close(dit(x, t, None), dit(x, t, torch.full((2, 4), NULL)))
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        dit(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 12\)"):
        dit(x, t, torch.full((2, 4), 12))
    with pytest.raises(ValueError, match="padding only"):
        dit(x, t, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="text_vocab"):
        make_dit("dit-mnist-cpu", conditioning="mmdit")  # a label DiT cannot read captions
    maps = dit.text_attention(x, t, torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]]))
    assert len(maps) == dit.config.depth and maps[0].shape == (2, 4, 49, 4)
    assert float(maps[0][1, :, :, 1:].abs().max()) == 0.0  # padded words get no attention


def test_caption_dropout_drops_whole_captions_and_guidance_uses_the_null_caption():
    ids = torch.arange(12).reshape(3, 4) + 3
    dropped = drop_labels(ids, 0.0, NULL, force=torch.tensor([False, True, False]))
    assert torch.equal(dropped[1], torch.full((4,), NULL)) and torch.equal(dropped[[0, 2]], ids[[0, 2]])
    gen = torch.Generator().manual_seed(0)
    some = drop_labels(ids.repeat(200, 1), 0.5, NULL, generator=gen)
    rows = (some == NULL).all(1) | (some != NULL).all(1)
    assert bool(rows.all())  # never a part of a caption
    assert 0.35 < float((some == NULL).all(1).float().mean()) < 0.65

    dit = make_dit("dit-mnist-cpu", conditioning="text-cross-attention", num_classes=0, text_vocab=20,
                   text_length=4, learn_sigma=False).eval()
    _randomise(dit, 8, 0.05)
    den = Denoiser(dit, "velocity", FlowProcess(), time_scale=1000.0)
    x, t, y = torch.randn(3, 1, 28, 28), torch.full((3,), 0.5), ids
    s = 2.5
    cond, uncond = dit(x, 500.0, y), dit(x, 500.0, torch.full_like(y, NULL))
    out = guided(den, y, s, NULL).network_output(x, t)
    torch.testing.assert_close(out, uncond + s * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(out.abs().max()))


# --------------------------------------------------------------------------- training on captions


@pytest.mark.slow
@pytest.mark.parametrize("cond", ["text-cross-attention", "mmdit"])
def test_a_caption_model_trains_samples_from_prompts_and_scores_its_attributes(cond, mnist_root, tmp_path):

    config = config_from_preset("mnist-flow-cpu", [
        "captions=true", f'model_overrides={{"conditioning": "{cond}", "depth": 2, "hidden_size": 64}}',
        "dataset_size=600", "steps=3", "batch_size=16", "sample_every=0", "checkpoint_every=0", "log_every=1",
        f"out_dir={tmp_path / 'run'}", f"data_root={mnist_root}", "device=cpu", "n_samples=4"])
    images, ids = training_data(config)
    assert ids.shape == (len(images), caption_tokenizer().length)
    names = [parse_caption(t) for t in caption_tokenizer().decode(ids)]
    assert all(d is not None for d, _, _ in names)  # every caption names its digit
    assert make_objective(config).null_label == NULL
    train(config, progress=False)
    _, ema, objective, loaded = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert loaded.captions and ema.config.conditioning == cond
    drawn = sample_model(ema, objective, loaded, 3, prompts=["a thick seven"], steps=2)
    assert drawn["images"].shape == (3, 1, 28, 28) and drawn["labels"].shape == (3, caption_tokenizer().length)
    with pytest.raises(ValueError, match="prompts, not labels"):
        sample_model(ema, objective, loaded, 3, labels=[1], steps=2)
    scores = evaluate_model(ema, objective, loaded, len(HELD_OUT), held_out=True, steps=2)
    for key in ("accuracy", "thickness_accuracy", "slant_accuracy"):
        assert 0.0 <= scores[key] <= 1.0
    assert scores["held_out"] is True


def test_captions_need_a_text_reading_dit():
    with pytest.raises(ValueError, match="captions=true needs"):
        make_model(config_from_preset("mnist-flow-cpu", ["captions=true"] + ['model_overrides={"conditioning": "adaln-zero"}']))


# --------------------------------------------------------------------------- Fashion-MNIST captions


def test_mnist_token_ids_are_the_ones_the_shipped_caption_models_read():
    # the shipped mnist-text and mnist-mmdit embed ids 3.. in this order: a reordering would scramble them
    assert C.vocabulary("mnist") == ("a", "an", *C.DIGITS, "thin", "medium", "thick", "slanted", "left", "upright",
                                     "right")
    assert caption_tokenizer().vocabulary == C.VOCABULARY == C.vocabulary("mnist")


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_every_caption_of_a_dataset_tokenizes_without_unknowns_and_parses_back(dataset):
    tok = caption_tokenizer(dataset)
    combos = [(k, w, s) for k in range(10) for w in (None, 0, 1, 2) for s in (None, 0, 1, 2)]
    texts = [C.caption(*combo, dataset=dataset) for combo in combos]
    ids, mask = tok.encode(texts)
    assert not bool((ids == UNK).any()) and bool(mask[:, 0].all())
    assert int(mask.sum(1).max()) <= tok.length  # nothing cut: the longest caption fits L
    assert [parse_caption(t, dataset) for t in tok.decode(ids)] == combos
    assert len(set(texts)) == len(texts)


def test_fashion_captions_name_the_garment_with_the_right_article():
    assert C.caption(9, 2, 0, dataset="fashion-mnist") == "a thick ankle boot, slanted left"
    assert C.caption(9, dataset="fashion-mnist") == "an ankle boot"
    assert C.caption(0, 0, dataset="fashion-mnist") == "a thin t-shirt"
    assert parse_caption("a shirt, upright", "fashion-mnist") == (6, None, 1)  # not the t-shirt
    with pytest.raises(ValueError, match="captions exist for"):
        C.caption(1, dataset="cifar10")


def test_fashion_text_gpu_preset_trains_on_captioned_garments(monkeypatch, tmp_path):
    # the GPU preset's data path on the CPU: fake garments (random blobs), one step, then prompts
    from minidit import data

    g = torch.Generator().manual_seed(0)
    blobs = (torch.rand(64, 1, 28, 28, generator=g) > 0.6).float() * 2 - 1
    real = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda name, *a, **k: (blobs, torch.arange(64) % 10)
                        if name == "fashion-mnist" else real(name, *a, **k))
    config = config_from_preset("fashion-text-gpu", [
        'model_overrides={"conditioning": "text-cross-attention", "depth": 2, "hidden_size": 64, "num_heads": 4}',
        "steps=1", "batch_size=8", "device=cpu", "sample_every=0", "checkpoint_every=0", "log_every=1",
        "warmup_steps=1", f"out_dir={tmp_path / 'run'}"])
    images, ids = training_data(config)
    tok = caption_tokenizer("fashion-mnist")
    assert ids.shape == (len(images), tok.length) and not bool((ids == UNK).any())
    assert all(parse_caption(t, "fashion-mnist")[0] is not None for t in tok.decode(ids))
    model = make_model(config)
    assert model.config.text_vocab == tok.vocab_size
    train(config, progress=False)
    _, ema, objective, loaded = load_checkpoint(tmp_path / "run" / "latest.pt")
    drawn = sample_model(ema, objective, loaded, 2, prompts=["a thick coat, slanted left"], steps=2)
    assert drawn["images"].shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="mirrored image leans the other way"):
        make_model(config_from_preset("fashion-text-gpu", ["hflip=true"]))

"""Checks of tutorial 05 (the Diffusion Transformer): they accept the reference solutions and
name a wrong shape and a wrong term of adaLN's modulation and of classifier-free guidance."""

from __future__ import annotations

import torch

from minidit import exercises as ex
from minidit.dit import make_dit

from exercise_helpers import fails as _fails


# ----------------------------------------------------------------------------------------
# Reference solutions (as in the notebook) and their classic mistakes


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def cfg_predict(model, x, t, y, s, null_label):
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = out.chunk(2)
    return uncond + s * (cond - uncond)


# ----------------------------------------------------------------------------------------
# modulate


def test_check_modulate_accepts_the_solution_and_minidit(capsys):
    from minidit.dit import modulate as library

    ex.check_modulate(modulate)
    ex.check_modulate(library)
    assert capsys.readouterr().out.count("correct ✓") == 2


def test_check_modulate_names_a_missing_token_axis():
    _fails(ex.check_modulate, lambda x, shift, scale: x * (1 + scale) + shift, "shift[:, None]")


def test_check_modulate_names_the_wrong_term():
    _fails(ex.check_modulate, lambda x, s, c: x * c[:, None] + s[:, None], "scale term", "(1 + scale)")
    _fails(ex.check_modulate, lambda x, s, c: x * (1 + s[:, None]) + c[:, None], "swapped")
    _fails(ex.check_modulate, lambda x, s, c: (x + s[:, None]) * (1 + c[:, None]), "added before scaling")


def test_check_modulate_says_not_implemented():
    def stub(x, shift, scale):
        raise NotImplementedError()

    _fails(ex.check_modulate, stub, "not implemented")


# ----------------------------------------------------------------------------------------
# classifier-free guidance


def test_check_cfg_accepts_the_solution_and_two_calls(capsys):
    def two_calls(model, x, t, y, s, null_label):
        uncond = model(x, t, torch.full_like(y, null_label))
        return uncond + s * (model(x, t, y) - uncond)

    ex.check_cfg(cfg_predict)
    ex.check_cfg(two_calls)
    assert capsys.readouterr().out.count("correct ✓") == 2


def test_check_cfg_names_swapped_terms_and_a_missing_term():
    def swapped(model, x, t, y, s, null_label):
        uncond = model(x, t, torch.full_like(y, null_label))
        cond = model(x, t, y)
        return cond + s * (uncond - cond)

    def no_difference(model, x, t, y, s, null_label):
        return model(x, t, torch.full_like(y, null_label)) + s * model(x, t, y)

    def ignores_s(model, x, t, y, s, null_label):
        model(x, t, torch.full_like(y, null_label))
        return model(x, t, y)

    _fails(ex.check_cfg, swapped, "swapped")
    _fails(ex.check_cfg, no_difference, "not ε(∅) + s·ε(y)")
    _fails(ex.check_cfg, ignores_s, "conditional prediction", "not used")


def test_check_cfg_names_the_labels_and_the_shape():
    def no_null(model, x, t, y, s, null_label):
        return model(x, t, y)

    def no_labels(model, x, t, y, s, null_label):
        return model(x, t, None)

    def doubled(model, x, t, y, s, null_label):  # forgot to split the doubled batch
        return model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))

    _fails(ex.check_cfg, no_null, "null label")
    _fails(ex.check_cfg, no_labels, "without labels")
    _fails(ex.check_cfg, doubled, "shape (12, 1, 4, 4)", "split the doubled batch")


def test_reference_cfg_equals_the_guided_dit():
    """The notebook's verification, small: a DiT whose modulation is not zero."""
    torch.manual_seed(0)
    model = make_dit("dit-mnist-cpu", hidden_size=32, depth=2, num_heads=2).eval()
    for p in model.parameters():  # leave the zero initialisation, so that y matters
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([1, 7, 10])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))  # two calls, by hand
        want = uncond + 2.5 * (cond - uncond)
        got = cfg_predict(model, x, t, y, 2.5, 10)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(want, model(x, t, y))  # guidance changed the prediction

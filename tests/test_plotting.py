"""Plotting: grid layout and pixel mapping, PNG round trip, the log helpers and the loss plots."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from minidit import plotting


def test_grid_layout_and_pixel_mapping():
    images = torch.stack([torch.full((1, 4, 5), v) for v in (-1.0, 0.0, 1.0)])  # [3, 1, 4, 5]
    grid = plotting.make_grid(images, nrow=2, padding=1)
    assert grid.shape == (2 * (4 + 1) + 1, 2 * (5 + 1) + 1, 3)
    assert np.allclose(grid[1:5, 1:6], 0.0)  # x = -1 -> black
    assert np.allclose(grid[1:5, 7:12], 0.5)  # x = 0 -> grey
    assert np.allclose(grid[6:10, 1:6], 1.0)  # x = +1 -> white
    assert np.allclose(grid[0], 1.0) and np.allclose(grid[6:10, 7:12], 1.0)  # padding, empty cell


def test_rgb_and_clipping():
    images = torch.tensor([2.0, -3.0, 0.0]).reshape(1, 3, 1, 1).expand(2, 3, 2, 2)
    grid = plotting.make_grid(images, nrow=8, padding=0)
    assert grid.shape == (2, 4, 3)
    assert np.allclose(grid[0, 0], [1.0, 0.0, 0.5])


def test_png_round_trip(tmp_path):
    images = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = plotting.save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    read = matplotlib.image.imread(tmp_path / "sub" / "grid.png")[..., :3]  # RGBA -> RGB
    assert read.shape == grid.shape
    assert np.abs(read - grid).max() <= 1 / 255 + 1e-6  # 8-bit quantisation only


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 2, 8, 8)])
def test_bad_image_shapes(shape):
    with pytest.raises(ValueError, match="images"):
        plotting.make_grid(torch.zeros(shape))


def test_animation_shows_each_frame_as_its_grid():
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(4, 1, 5, 5, generator=g) * 2 - 1 for _ in range(3)]  # 3 frames of 4 images
    anim = plotting.animate_images(frames, titles=["t = 2", "t = 1", "t = 0"], nrow=2, dpi=40)
    image = anim._fig.axes[0].images[0]
    for k in (2, 0, 1):  # any order: each frame draws its own grid and title
        anim._func(k)
        assert np.array_equal(image.get_array(), plotting.make_grid(frames[k], nrow=2))
        assert anim._fig.axes[0].get_title() == f"t = {2 - k}"
    for frame_format in ("png", "jpeg"):  # every frame embedded once, in the format asked for
        assert plotting.animation_html(anim, frame_format).count(f"data:image/{frame_format};base64") == 3
    with pytest.raises(ValueError, match="one title per frame"):
        plotting.animate_images(frames, titles=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        plotting.animate_images([])


def test_log_helpers(tmp_path):
    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        plotting.append_log(log, {"event": "train", "step": step, "loss": 1.0 / step})
        plotting.append_log(log, {"event": "checkpoint", "step": step, "path": "x"})
    assert [r["step"] for r in plotting.read_log(log)] == [1, 2, 3]
    assert len(plotting.read_log(log, "checkpoint")) == 3
    plotting.truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 1, 2, 2]


def test_loss_plots(tmp_path):
    log = tmp_path / "log.jsonl"
    for step in range(1, 21):
        plotting.append_log(log, {"event": "train", "step": step, "loss": 1.0 / step,
                                  "loss_by_t": [0.1 * step, None, 0.3]})
    for make, name in ((plotting.plot_loss, "loss.png"), (plotting.plot_loss_by_t, "by_t.png")):
        path = make(log, tmp_path / name)
        assert matplotlib.image.imread(path).shape[2] in (3, 4)
    assert plotting.plot_loss(log, tmp_path / "smooth.png", smooth=5).is_file()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training records"):
        plotting.plot_loss(empty, tmp_path / "x.png")


def test_save_samples_is_seeded_and_restores_the_global_rng(tmp_path):
    model = torch.nn.Linear(1, 1)

    def sample_fn(model, shape, y, generator):
        torch.rand(1)  # a sampler that also touches the global stream
        return torch.rand(shape, generator=generator) * 2 - 1

    torch.manual_seed(0)
    plotting.save_samples(sample_fn, model, (4, 1, 3, 3), None, tmp_path / "a.png", seed=7)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the global stream is where it was
    plotting.save_samples(sample_fn, model, (4, 1, 3, 3), None, tmp_path / "b.png", seed=7)
    assert np.array_equal(matplotlib.image.imread(tmp_path / "a.png"), matplotlib.image.imread(tmp_path / "b.png"))


def test_plot_run_waits_for_training_records(tmp_path):
    plotting.plot_run(tmp_path)  # no log yet: nothing to draw
    plotting.append_log(tmp_path / "log.jsonl", {"event": "sample", "step": 1, "path": "x"})
    plotting.plot_run(tmp_path)
    assert not (tmp_path / "loss.png").exists()
    plotting.append_log(tmp_path / "log.jsonl", {"event": "train", "step": 2, "loss": 0.5, "loss_by_t": [0.4, 0.6]})
    plotting.plot_run(tmp_path)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "loss_by_t.png").is_file()


def test_a_torn_last_line_is_skipped(tmp_path):
    log = tmp_path / "log.jsonl"
    plotting.append_log(log, {"event": "train", "step": 1, "loss": 1.0})
    with open(log, "a") as f:
        f.write('{"event": "train", "st')  # a write cut short by a kill
    assert [r["step"] for r in plotting.read_log(log)] == [1]
    plotting.truncate_log(log, 5)
    assert log.read_text() == '{"event": "train", "step": 1, "loss": 1.0}\n'

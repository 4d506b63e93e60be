"""Pictures and records of a training run: sample grids, the loss curve, the loss by timestep,
and animations of a sampler's chain.

Images live in [-1, 1] throughout minidit; a grid maps them to [0, 1] with
    pixel = (x + 1) / 2, clipped to [0, 1].
`animate_images` plays a list of such batches (x_t at a few steps of a reverse chain) as one
grid per frame; in a notebook, `IPython.display.HTML(animation_html(anim))` embeds it.
A run's record is a JSON-lines log (`append_log`, `read_log`, `truncate_log`): one dict
per line with an "event" ("train", "sample", "checkpoint") and a "step"; training records
carry "loss" and "loss_by_t", the mean loss in each equal-width bin of t ∈ [0, 1] (None
where a bin saw no example), which the plots read. Everything uses matplotlib's object
API (`Figure`, `matplotlib.image.imsave`), so no GUI backend is needed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from tempfile import TemporaryDirectory

import matplotlib
import matplotlib.image
import numpy as np
import torch
from matplotlib.animation import FuncAnimation, HTMLWriter
from matplotlib.figure import Figure


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tile a batch of images into one array.

    Args:
        images: [N, C, H, W] with C = 1 or 3, values in [-1, 1].
        nrow: images per row.
        padding: pixels of white between images.

    Returns:
        [rows·(H+p)+p, nrow·(W+p)+p, 3] float array in [0, 1].
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C in (1, 3), got {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)  # [N, C, H, W] in [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB: [N, 3, H, W]
    N, C, H, W = x.shape
    ncol = min(nrow, N)
    rows = math.ceil(N / ncol)
    grid = torch.ones(C, rows * (H + padding) + padding, ncol * (W + padding) + padding)
    for i in range(N):
        r, c = divmod(i, ncol)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = x[i]
    return grid.permute(1, 2, 0).numpy()  # [C, H', W'] -> [H', W', C]


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> np.ndarray:
    """Write a grid of images in [-1, 1] to a PNG file; returns the [H', W', 3] grid."""
    grid = make_grid(images, nrow)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, grid)
    return grid


def animate_images(frames, titles: list[str] | None = None, nrow: int = 8, interval: int = 250,
                   figsize: tuple[float, float] = (3.0, 3.0), dpi: int = 70) -> FuncAnimation:
    """An animation that shows one grid of images per frame, e.g. x_t along a reverse chain.

    Args:
        frames: F batches [N, C, H, W] in [-1, 1] (a list, or a tensor [F, N, C, H, W]); frame k
            shows `make_grid(frames[k], nrow)`.
        titles: one title per frame (e.g. "t = 999"), or None.
        nrow: images per row of each grid.
        interval: milliseconds between frames.
        figsize, dpi: size of the figure; keep both small, since `animation_html` embeds every
            frame as an image (a notebook stays light with dpi 60-80 and a few dozen frames).

    Returns:
        A `matplotlib.animation.FuncAnimation` on its own `Figure` (no pyplot window, nothing
        shown twice): `animation_html(anim)` for a notebook, `anim.save("chain.gif", writer="pillow")`.
    """
    grids = [make_grid(torch.as_tensor(f), nrow) for f in frames]  # F x [H', W', 3]
    if not grids:
        raise ValueError("frames must hold at least one batch of images")
    if titles is not None and len(titles) != len(grids):
        raise ValueError(f"give one title per frame: {len(titles)} titles for {len(grids)} frames")
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88 if titles else 0.96))
    ax.set_axis_off()
    shown = ax.imshow(grids[0])
    title = ax.set_title(titles[0] if titles else "", fontsize=9)

    def draw(k: int):
        shown.set_data(grids[k])
        title.set_text(titles[k] if titles else "")
        return shown, title

    return FuncAnimation(fig, draw, frames=len(grids), interval=interval, blit=False)


def animation_html(anim: FuncAnimation, frame_format: str = "jpeg") -> str:
    """The animation as one HTML snippet with its frames embedded and play controls
    (matplotlib's `to_jshtml`). JPEG frames ("jpeg", the default) take a quarter of the space of
    PNG frames ("png") for noisy images such as x_t, which keeps a notebook light."""
    with TemporaryDirectory() as folder, matplotlib.rc_context({"animation.frame_format": frame_format}):
        path = Path(folder, "animation.html")
        anim.save(path, writer=HTMLWriter(fps=1000 / anim.event_source.interval, embed_frames=True,
                                          default_mode="loop"))
        return path.read_text()


def read_log(log_path: str | os.PathLike, event: str = "train") -> list[dict]:
    """The records of one kind ("train", "checkpoint", "sample") from a JSON-lines log."""
    return [r for r in _records(log_path) if r.get("event", "train") == event]


def _records(log_path: str | os.PathLike) -> list[dict]:
    """Every complete record; a last line without its newline (a write cut by a kill) is skipped."""
    text = Path(log_path).read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is empty or torn
    return [json.loads(line) for line in lines if line.strip()]


def plot_loss(log_path: str | os.PathLike, out: str | os.PathLike, smooth: int = 1) -> Path:
    """Plot training loss against step (log scale), optionally a running mean over `smooth` records."""
    records = read_log(log_path)
    if not records:
        raise ValueError(f"{log_path} holds no training records to plot")
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], dtype=float)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, alpha=0.35 if smooth > 1 else 1.0, label="loss")
    if smooth > 1 and len(loss) >= smooth:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(loss, kernel, mode="valid"), label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_loss_by_t(log_path: str | os.PathLike, out: str | os.PathLike, n_curves: int = 5) -> Path:
    """Plot the loss per timestep bin at `n_curves` moments of training, early to late.

    Each curve is one log record: the mean loss of the examples whose t fell in each of the
    equal-width bins of [0, 1] during that record's logging interval.
    """
    records = [r for r in read_log(log_path) if r.get("loss_by_t")]
    if not records:
        raise ValueError(f"{log_path} holds no loss_by_t records to plot")
    picks = sorted({round(i) for i in np.linspace(0, len(records) - 1, min(n_curves, len(records)))})
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 1, len(picks)))
    for colour, i in zip(colours, picks):
        bins = np.array([np.nan if v is None else v for v in records[i]["loss_by_t"]], dtype=float)
        centres = (np.arange(len(bins)) + 0.5) / len(bins)  # bin centres in [0, 1]
        ax.plot(centres, bins, marker="o", color=colour, label=f"step {records[i]['step']}")
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="loss", yscale="log", title="loss by timestep")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_run(out_dir: str | os.PathLike) -> None:
    """Write `loss.png` and `loss_by_t.png` of the run in `out_dir` from its `log.jsonl`
    (nothing before the first training record)."""
    out = Path(out_dir)
    if not (out / "log.jsonl").is_file() or not read_log(out / "log.jsonl"):
        return
    plot_loss(out / "log.jsonl", out / "loss.png")
    plot_loss_by_t(out / "log.jsonl", out / "loss_by_t.png")


def _save(fig: Figure, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.13, top=0.92)  # fixed: tight_layout is slow
    fig.savefig(out, dpi=100)
    return out


def append_log(log_path: str | os.PathLike, record: dict) -> None:
    """Add one record (a dict of plain data) as a line of the JSON-lines log."""
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(log_path: str | os.PathLike, step: int) -> None:
    """Keep only the records up to `step` (a resumed run drops what its killed run wrote later)."""
    if Path(log_path).is_file():
        kept = [r for r in _records(log_path) if r["step"] <= step]
        Path(log_path).write_text("".join(json.dumps(r) + "\n" for r in kept))


@torch.no_grad()
def save_samples(sample_fn, model: torch.nn.Module, shape: tuple[int, ...], y: torch.Tensor | None,
                 path: str | os.PathLike, seed: int = 0) -> Path:
    """Draw samples with ``sample_fn(model, shape, y, generator)`` and save them as a grid.

    The generator (on the model's device) is seeded with `seed`, and the global random
    state is put back afterwards, so a training run that calls this is not changed by it.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = sample_fn(model, tuple(shape), y, torch.Generator(device).manual_seed(seed))
    save_image_grid(images, path, nrow=math.ceil(math.sqrt(shape[0])))
    return Path(path)

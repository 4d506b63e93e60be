"""Captions for MNIST with no download: each digit described by attributes measured on its pixels.

A text-conditioned model needs (image, caption) pairs. MNIST has labels only, so we write the
captions ourselves from the label and from four attributes measured on the image, with ink
I = (x + 1)/2 in [0, 1] on the pixel grid (u = column, v = row counted upwards):

    thickness  w = 2 ΣI / Σ|∇I|                 ink area over half the perimeter: a stroke of
                                                width w and length l (l >> w) has area w·l and
                                                perimeter about 2l, so w ≈ 2·area/perimeter
    slant      s = μ_uv / μ_vv                  the shear of the ink (columns moved per row up,
                                                from its second moments): s > 0 leans right
    size       h = rows spanned by the ink     (rows whose ink exceeds a small threshold)
    position   (ū, v̄) = the ink's centroid

MNIST's digits are centred on their centroid and scaled to a 20-pixel box, so size and position
hardly vary; thickness and slant vary a lot. The caption therefore names the digit, its
thickness and its slant, in words whose cut points are the terciles of the training set
(`AttributeBins`), so each word of an attribute covers about a third of the digits (chance: 1/3):

    "a thick seven, slanted right"     "a thin one"     "a four, upright"

Fashion-MNIST gets the same scheme with its class names for nouns ("a thick coat, slanted
left", "an ankle boot"): `CLASS_NAMES` holds both, and every function takes `dataset`. The
measurements mean the same on a garment (bulk as area over half-perimeter, lean from the moments).

Which attributes a caption names is fixed by the image's index (`CAPTION_FORMS`), so captions are
deterministic and the model also sees prompts that leave an attribute out. `HELD_OUT` lists
combinations (digit, thickness, slant) that training never sees, for a test of generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minidit.text import Tokenizer, words

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CLASS_NAMES = {"mnist": DIGITS, "fashion-mnist": FASHION}  # the noun of each label, per dataset
THICKNESS = ("thin", "medium", "thick")
SLANT = ("slanted left", "upright", "slanted right")
CAPTION_FORMS = ("digit thickness slant", "digit thickness", "digit slant", "digit thickness slant")
# (digit, thickness, slant) combinations removed from training, to test generalisation
HELD_OUT = ((7, 2, 0), (4, 0, 2), (2, 2, 1), (0, 0, 0), (9, 2, 2))
INK_THRESHOLD = 0.2  # a row "has ink" when its brightest pixel exceeds this
CAPTION_LENGTH = 6  # tokens per caption: the longest, "a medium ankle boot, slanted right", has 6 words


def _names(dataset: str) -> tuple[str, ...]:
    if dataset not in CLASS_NAMES:
        raise ValueError(f"captions exist for {sorted(CLASS_NAMES)}, not {dataset!r}")
    return CLASS_NAMES[dataset]


def vocabulary(dataset: str = "mnist") -> tuple[str, ...]:
    """Every word a caption of `dataset` can hold, in the tokenizer's id order (ids 3, 4, ...).
    (MNIST's order is fixed: the shipped models' token ids depend on it.)"""
    nouns = dict.fromkeys(w for name in _names(dataset) for w in words(name))  # "ankle boot" -> ankle, boot
    return ("a", "an", *nouns, *THICKNESS, "slanted", "left", "upright", "right")


VOCABULARY = vocabulary("mnist")


def caption_tokenizer(dataset: str = "mnist") -> Tokenizer:
    """The word-level tokenizer of the captions of `dataset` (`vocabulary`, L = `CAPTION_LENGTH`)."""
    return Tokenizer(vocabulary(dataset), CAPTION_LENGTH)


def _ink(images: Tensor) -> Tensor:
    """Images [N, 1, H, W] in [-1, 1] -> ink I [N, H, W] in [0, 1] (float64)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N, 1, H, W] grey images, got {list(images.shape)}")
    return ((images[:, 0].double() + 1) / 2).clamp(0, 1)


def thickness(images: Tensor) -> Tensor:
    """Stroke width w = 2 ΣI / Σ|∇I| in pixels, [N] (|∇I| by forward differences)."""
    ink = _ink(images)
    du = ink.diff(dim=2, append=torch.zeros_like(ink[:, :, :1]))  # I(v, u+1) − I(v, u), 0 past the edge
    dv = ink.diff(dim=1, append=torch.zeros_like(ink[:, :1, :]))
    perimeter = (du**2 + dv**2).sqrt().sum((1, 2))
    return (2 * ink.sum((1, 2)) / perimeter.clamp_min(1e-8)).float()


def _moments(ink: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mass, ū, v̄, μ_uv, μ_vv) of ink [N, H, W], v counted upwards."""
    N, H, W = ink.shape
    v = torch.arange(H - 1, -1, -1, dtype=ink.dtype)[:, None].expand(H, W)  # row 0 is the top: v = H − 1
    u = torch.arange(W, dtype=ink.dtype)[None, :].expand(H, W)
    mass = ink.sum((1, 2)).clamp_min(1e-8)
    u_bar = (ink * u).sum((1, 2)) / mass
    v_bar = (ink * v).sum((1, 2)) / mass
    du, dv = u - u_bar[:, None, None], v - v_bar[:, None, None]
    return mass, u_bar, v_bar, (ink * du * dv).sum((1, 2)) / mass, (ink * dv * dv).sum((1, 2)) / mass


def slant(images: Tensor) -> Tensor:
    """Shear s = μ_uv / μ_vv [N]: columns the ink moves right per row up (0 upright, > 0 leans right)."""
    _, _, _, mu_uv, mu_vv = _moments(_ink(images))
    return (mu_uv / mu_vv.clamp_min(1e-8)).float()


def size(images: Tensor) -> Tensor:
    """Height h [N] in pixels: the number of rows from the first to the last row with ink."""
    rows = _ink(images).amax(dim=2) > INK_THRESHOLD  # [N, H]
    idx = torch.arange(rows.shape[1])
    first = torch.where(rows, idx, rows.shape[1]).amin(1)
    last = torch.where(rows, idx, -1).amax(1)
    return (last - first + 1).clamp_min(0).float()


def position(images: Tensor) -> Tensor:
    """The ink's centroid (ū, v̄) [N, 2] in pixels: column from the left, row from the bottom."""
    _, u_bar, v_bar, _, _ = _moments(_ink(images))
    return torch.stack([u_bar, v_bar], dim=1).float()


def measure(images: Tensor) -> dict[str, Tensor]:
    """All four attributes of images [N, 1, H, W] in [-1, 1]: thickness, slant, size [N], position [N, 2]."""
    return {"thickness": thickness(images), "slant": slant(images), "size": size(images),
            "position": position(images)}


@dataclass(frozen=True)
class AttributeBins:
    """Cut points that turn measured thickness and slant into words (terciles of a training set)."""

    thickness: tuple[float, float]
    slant: tuple[float, float]

    @classmethod
    def fit(cls, images: Tensor) -> AttributeBins:
        """Terciles of thickness and slant over `images` [N, 1, H, W]."""
        q = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
        w = torch.quantile(thickness(images).double(), q).tolist()
        s = torch.quantile(slant(images).double(), q).tolist()
        return cls(tuple(w), tuple(s))

    def classes(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(thickness class, slant class) [N] each in {0, 1, 2}: indices into THICKNESS and SLANT."""
        cut = lambda values, edges: torch.bucketize(values.double(), torch.tensor(edges, dtype=torch.float64))  # noqa: E731
        return cut(thickness(images), self.thickness), cut(slant(images), self.slant)


def caption(digit: int, thickness_class: int | None = None, slant_class: int | None = None,
            dataset: str = "mnist") -> str:
    """The caption of one image of class `digit`: "a thick seven, slanted right"; None leaves an
    attribute out."""
    names = _names(dataset)
    if not 0 <= digit < len(names):
        raise ValueError(f"the label must lie in [0, {len(names) - 1}], got {digit}")
    adjective = [THICKNESS[thickness_class]] if thickness_class is not None else []
    noun = " ".join([*adjective, names[digit]])
    article = "an" if noun.split()[0] in ("eight", "ankle") else "a"  # "a one", "an eight", "an ankle boot"
    text = f"{article} {noun}"
    return text if slant_class is None else f"{text}, {SLANT[slant_class]}"


def caption_dataset(images: Tensor, labels: Tensor, bins: AttributeBins,
                    held_out: tuple[tuple[int, int, int], ...] = HELD_OUT, dataset: str = "mnist"
                    ) -> tuple[list[str], Tensor]:
    """Captions for a dataset and the mask of images to train on.

    Image i is described in form CAPTION_FORMS[i mod 4] (all attributes, or one left out), so the
    captions are a pure function of the data. Images whose (digit, thickness, slant) is `held_out`
    are masked out (mask False), whatever their caption form.

    Returns:
        (captions [N], keep [N] bool).
    """
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {list(labels.shape)}")
    w, s = bins.classes(images)
    keep = torch.ones(len(labels), dtype=torch.bool)
    for d, wc, sc in held_out:
        keep &= ~((labels == d) & (w == wc) & (s == sc))
    texts = []
    for i, (d, wc, sc) in enumerate(zip(labels.tolist(), w.tolist(), s.tolist())):
        form = CAPTION_FORMS[i % len(CAPTION_FORMS)]
        texts.append(caption(d, wc if "thickness" in form else None, sc if "slant" in form else None, dataset))
    return texts, keep


def parse_caption(text: str, dataset: str = "mnist") -> tuple[int | None, int | None, int | None]:
    """(label, thickness class, slant class) named by a caption (None where it names none)."""
    said = f" {' '.join(words(text))} "  # words between spaces: " a thick ankle boot slanted left "
    names = _names(dataset)  # longest first, so that "t-shirt" is not read as "shirt"
    label = next((i for i in sorted(range(len(names)), key=lambda i: -len(names[i]))
                  if f" {' '.join(words(names[i]))} " in said), None)
    thick = next((i for i, w in enumerate(THICKNESS) if f" {w} " in said), None)
    sl = next((i for i, w in enumerate(SLANT) if f" {w} " in said), None)
    return label, thick, sl


def encode_dataset(images: Tensor, labels: Tensor, held_out: tuple[tuple[int, int, int], ...] = HELD_OUT,
                   dataset: str = "mnist") -> tuple[Tensor, Tensor, AttributeBins]:
    """A labelled image set as text-conditioning data: (token ids [N, L], keep [N] bool, bins).

    The bins are the terciles of these images (`AttributeBins.fit`); `keep` drops the held-out
    (digit, thickness, slant) combinations; ids are `caption_tokenizer()`'s encoding of
    `caption_dataset`'s captions.
    """
    bins = AttributeBins.fit(images)
    texts, keep = caption_dataset(images, labels, bins, held_out, dataset)
    ids, _ = caption_tokenizer(dataset).encode(texts)
    return ids, keep, bins


def prompt_grid(n: int, held_out: bool = False, dataset: str = "mnist") -> tuple[list[str], Tensor]:
    """n full prompts that cycle through labels, then thickness, then slant: (captions, [n, 3] of
    (label, thickness class, slant class)). With `held_out`, cycle through `HELD_OUT` instead."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if held_out:
        combos = [HELD_OUT[i % len(HELD_OUT)] for i in range(n)]
    else:
        combos = [(i % 10, (i // 10) % 3, (i // 30) % 3) for i in range(n)]
    return [caption(*c, dataset=dataset) for c in combos], torch.tensor(combos, dtype=torch.long)

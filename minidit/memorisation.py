"""A memorisation check: how close each sample lies to its nearest training image.

A model that copies its training set puts its samples at distance about 0 from a training image;
real test images, which are not copies, show the distance a new image has (tutorial 09 compares
the two distributions). `minidit.metrics` re-exports `nearest_neighbours`.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query image its nearest reference image in pixel space (a memorisation check).

        d(q) = min_j ||q − r_j||_2 / sqrt(D),   j* = argmin_j ||q − r_j||_2

    (the root-mean-square pixel difference, so d does not grow with the image size D = C·H·W).
    A model that copies its training set puts its samples at d ≈ 0 from a training image; real
    test images, which are not copies, show the distance a new digit has. Compare the two
    distributions, not single values.

    Args:
        queries: [Q, C, H, W], e.g. samples; references: [R, C, H, W], e.g. training images.
        batch_size: queries per distance matrix ([batch_size, R] floats at a time).

    Returns:
        (d [Q], index [Q]): the RMS distance to, and the index of, each query's nearest reference.
    """
    if queries.dim() < 2 or references.dim() < 2 or queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"queries and references must be [N, ...] with one image shape, got "
                         f"{tuple(queries.shape)} and {tuple(references.shape)}")
    if references.shape[0] == 0 or queries.shape[0] == 0:
        raise ValueError("need at least one query and one reference image")
    r = references.flatten(1).double()
    r2 = (r * r).sum(1)  # [R]
    D = r.shape[1]
    dists, index = [], []
    for q in queries.flatten(1).double().split(batch_size):
        # ||q − r||² = ||q||² − 2 q·r + ||r||², clamped at 0 against round-off
        d2 = ((q * q).sum(1, keepdim=True) - 2 * q @ r.T + r2).clamp_min(0)  # [b, R]
        best, j = d2.min(1)
        dists.append((best / D).sqrt())
        index.append(j)
    return torch.cat(dists).float(), torch.cat(index)

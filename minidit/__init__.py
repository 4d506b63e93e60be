"""minidit: a small, readable, from-scratch PyTorch library for diffusion models.

Each idea lives in one short module that reads like its paper; see
``../shared/DESIGN.md`` in the source tree, or the documentation site, for the map.
Submodules are imported on demand (``from minidit import ddpm``) so that
``import minidit`` stays fast.
"""

__version__ = "0.1.0"

from minidit.device import get_device, seed_everything  # noqa: E402

__all__ = ["__version__", "get_device", "seed_everything"]

"""Where a process puts its tensors."""

from __future__ import annotations

import torch

__all__ = ["device"]


def device() -> torch.device:
    """Return the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

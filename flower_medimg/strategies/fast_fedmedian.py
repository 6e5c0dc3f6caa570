"""Federated Median (FedMedian) [Yin et al., 2018], fast version.

Paper: arxiv.org/pdf/1803.01498v1.pdf
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedMedian

from .fast_fedavg import FastFedAvg
from .kernels import coordinate_median
from .quality import ScreenedReplies

__all__ = ["FastFedMedian"]


class FastFedMedian(FastFedAvg, FedMedian):
    """Federated Median (FedMedian) strategy reading replies in place.

    Implementation based on https://arxiv.org/pdf/1803.01498v1

    Same result as Flower's ``FedMedian`` (the coordinate-wise median of the
    replied arrays; integer arrays are rounded back to their dtype), of which it is
    a subclass, computed on column chunks of all replies at once instead of one
    stacked copy per tensor, and with the reply checks of :class:`FastFedAvg` (a
    non-finite reply is dropped rather than sorted into the median). Takes the same
    arguments as :class:`FastFedAvg`.
    """

    _weighted = False

    def _combine(
        self, server_round: int, screened: ScreenedReplies, weights: np.ndarray
    ) -> list[np.ndarray]:
        """Return the coordinate-wise median of the accepted replies."""
        return coordinate_median(screened.columns)

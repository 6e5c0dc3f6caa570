"""Federated Trimmed Average [Yin et al., 2018], fast version.

Paper: arxiv.org/abs/1803.01498
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedTrimmedAvg

from .fast_fedavg import FastFedAvg
from .kernels import trimmed_mean
from .quality import ScreenedReplies

__all__ = ["FastFedTrimmedAvg"]


class FastFedTrimmedAvg(FastFedAvg, FedTrimmedAvg):
    """Federated Trimmed Average strategy reading replies in place.

    Implementation based on https://arxiv.org/abs/1803.01498

    Same result as Flower's ``FedTrimmedAvg``, of which it is a subclass with the
    same arguments in the same order (``beta`` after Flower's ``FedAvg`` arguments,
    default 0.2, in ``[0, 0.5)``): per coordinate, ``int(beta * N)`` values are cut
    from each end and the rest averaged. Computed on column chunks of all replies
    at once, with the reply checks of :class:`FastFedAvg` (keyword arguments
    ``check_finite``, ``max_update_norm``, ``update_norm_factor``).
    """

    _weighted = False

    def _combine(
        self, server_round: int, screened: ScreenedReplies, weights: np.ndarray
    ) -> list[np.ndarray]:
        """Return the coordinate-wise trimmed mean of the accepted replies."""
        return trimmed_mean(screened.columns, self.beta)

"""FedCostWAvg: cost-weighted averaging [Mächler et al., 2021].

Paper: arxiv.org/abs/2111.08649 (winner of the MICCAI FeTS 2021 challenge)
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from flower_medimg.core.protocol import (
    METRIC_TRAIN_LOSS_AFTER,
    METRIC_TRAIN_LOSS_BEFORE,
)

from .fast_fedavg import FastFedAvg
from .kernels import fallback_weights
from .quality import ScreenedReplies, node_id_of

__all__ = ["FedCostWAvg", "fedcostwavg_weights"]


def fedcostwavg_weights(
    num_examples: Sequence[float] | np.ndarray,
    loss_before: Sequence[float] | np.ndarray,
    loss_after: Sequence[float] | np.ndarray,
    alpha: float = 0.5,
    loss_floor: float = 1e-12,
    max_ratio: float | None = None,
) -> np.ndarray:
    """Return FedCostWAvg weights ``p_k = alpha n_k/N + (1 - alpha) k_k/K``.

    ``k_k = L_before / max(L_after, loss_floor)`` is the cost improvement of client
    k (Mächler et al. 2021, https://arxiv.org/abs/2111.08649), clipped to
    ``[1 / max_ratio, max_ratio]`` when given, so that no site can claim an
    improvement that outweighs the others without bound. If the improvements are
    unusable (non-finite, negative or summing to 0), plain data-size weights are
    returned (alpha = 1).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("`alpha` must be in [0, 1]")
    n = np.asarray(num_examples, dtype=np.float64)
    q = n / n.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(loss_before, dtype=np.float64) / np.maximum(
            np.asarray(loss_after, dtype=np.float64), loss_floor
        )
    if max_ratio is not None:
        ratio = np.clip(ratio, 1.0 / max_ratio, max_ratio)
    total = ratio.sum()
    if not np.all(np.isfinite(ratio)) or np.any(ratio < 0) or total <= 0:
        return q
    return alpha * q + (1.0 - alpha) * ratio / total


class FedCostWAvg(FastFedAvg):
    """FedCostWAvg strategy: data-size weights mixed with cost-improvement weights.

    Implementation based on https://arxiv.org/abs/2111.08649

    Each client k reports ``train-loss-before`` (loss of the received global model
    on its data, before training) and ``train-loss-after`` (loss of its trained
    model on the same data). With ``k_k = L_k^before / L_k^after`` and
    ``K = sum_j k_j`` the aggregation weights are::

        p_k = alpha * n_k / N + (1 - alpha) * k_k / K

    so clients that reduced their cost most get more weight; ``alpha = 1`` is FedAvg.
    With ``mode="across-rounds"`` (what public third-party Flower implementations
    do) ``k_k = L_k^after(t') / L_k^after(t)`` where ``t'`` is the node's previous
    participation (``k_k = 1`` on its first one), so only ``train-loss-after`` is
    required. ``L^after`` is floored at ``loss_floor``; if the ratios are unusable
    (all non-finite, negative or summing to zero) the weights fall back to
    ``n_k / N``. Replies without the required losses, or with non-finite ones, are
    dropped.

    Parameters
    ----------
    alpha : float (default: 0.5)
        Weight of the data-size term, in [0, 1].
    mode : str (default: "within-round")
        ``"within-round"`` (ratio of the two losses of this round) or
        ``"across-rounds"`` (ratio of ``train-loss-after`` between participations).
    loss_floor : float (default: 1e-12)
        Lower bound for the denominator loss.
    max_loss_ratio : Optional[float] (default: 10.0)
        Bound on each site's cost improvement ``k_k``, clipped to
        ``[1 / max_loss_ratio, max_loss_ratio]``; None for the unbounded original.
        Losses must be positive: a reply reporting a loss <= 0 is dropped.
    *args, **kwargs
        The arguments of :class:`FastFedAvg` (Flower's ``FedAvg`` arguments, also
        positionally, and the reply checks).
    """

    def __init__(
        self,
        *args: Any,
        alpha: float = 0.5,
        mode: str = "within-round",
        loss_floor: float = 1e-12,
        max_loss_ratio: float | None = 10.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("`alpha` must be in [0, 1].")
        if mode not in ("within-round", "across-rounds"):
            raise ValueError("`mode` must be 'within-round' or 'across-rounds'.")
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.mode = mode
        self.loss_floor = loss_floor
        self.max_loss_ratio = max_loss_ratio
        self.previous_loss: dict[int, float] = {}

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """The losses the weights are made of (none when ``alpha = 1``)."""
        if self.alpha == 1.0:
            return ()
        if self.mode == "within-round":
            return (METRIC_TRAIN_LOSS_BEFORE, METRIC_TRAIN_LOSS_AFTER)
        return (METRIC_TRAIN_LOSS_AFTER,)

    @property
    def requested_metrics(self) -> tuple[str, ...]:
        """The sites compute the losses only when asked."""
        return self.required_metrics

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FedCostWAvg settings:")
        log(INFO, "\t│\t├── alpha: %s", self.alpha)
        log(INFO, "\t│\t└── mode: %s", self.mode)
        super().summary()

    def _aggregation_weights(
        self, server_round: int, screened: ScreenedReplies
    ) -> np.ndarray:
        """Return the FedCostWAvg weights of the accepted replies."""
        num_examples = screened.metric(self.weighted_by_key)
        if self.alpha == 1.0:
            return fallback_weights(None, num_examples)[0]
        screened.reject_non_positive(self.required_metrics)
        if not screened.accepted:
            return np.zeros(0)
        num_examples = screened.metric(self.weighted_by_key)
        after = screened.metric(METRIC_TRAIN_LOSS_AFTER)
        if self.mode == "within-round":
            before = screened.metric(METRIC_TRAIN_LOSS_BEFORE)
        else:
            before = np.array(
                [
                    self.previous_loss.get(node_id_of(msg), max(loss, self.loss_floor))
                    for msg, loss in zip(screened.accepted, after, strict=True)
                ]
            )
        weights = fedcostwavg_weights(
            num_examples,
            before,
            after,
            self.alpha,
            self.loss_floor,
            self.max_loss_ratio,
        )
        weights, _ = fallback_weights(weights, num_examples)
        return weights

    def _on_aggregated(self, server_round: int, screened: ScreenedReplies) -> None:
        """Remember each node's last ``train-loss-after`` (across-rounds mode)."""
        if self.mode == "across-rounds" and self.alpha < 1.0:
            for msg, loss in zip(
                screened.accepted, screened.metric(METRIC_TRAIN_LOSS_AFTER), strict=True
            ):
                self.previous_loss[node_id_of(msg)] = float(loss)

"""FedCostWAvg: cost-weighted averaging [Mächler et al., 2021].

Paper: arxiv.org/abs/2111.08649 (winner of the MICCAI FeTS 2021 challenge)
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from .fast_fedavg import FastFedAvg
from .kernels import fallback_weights, fedcostwavg_weights
from .quality import ScreenedReplies, node_id_of

KEY_LOSS_BEFORE = "train-loss-before"
KEY_LOSS_AFTER = "train-loss-after"


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
    dropped (spec section 0.3).

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes`
        is larger than `fraction_train * total_connected_nodes`, `min_train_nodes`
        will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation. In case `min_evaluate_nodes`
        is larger than `fraction_evaluate * total_connected_nodes`,
        `min_evaluate_nodes` will still be sampled.
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    weighted_by_key : str (default: "num-examples")
        The key within each MetricRecord whose value is used as the weight when
        computing weighted averages for both ArrayRecords and MetricRecords.
    arrayrecord_key : str (default: "arrays")
        Key used to store the ArrayRecord when constructing Messages.
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from training round replies.
        If `None`, defaults to `aggregate_metricrecords`, which performs a weighted
        average using the provided weight factor key.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from training round replies.
        If `None`, defaults to `aggregate_metricrecords`, which performs a weighted
        average using the provided weight factor key.
    alpha : float (default: 0.5)
        Weight of the data-size term, in [0, 1].
    mode : str (default: "within-round")
        ``"within-round"`` (ratio of the two losses of this round) or
        ``"across-rounds"`` (ratio of ``train-loss-after`` between participations).
    loss_floor : float (default: 1e-12)
        Lower bound for the denominator loss.
    check_finite : bool (default: True)
        Drop replies with non-finite array values. Linear aggregators check the
        aggregate and only search for the culprits when it is not finite.
    max_update_norm : Optional[float] (default: None)
        Drop replies whose update norm ``||theta_k - theta||`` exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Drop replies whose update norm exceeds this factor times the round's median
        update norm (applied with at least three replies).
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        evaluate_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        *,
        alpha: float = 0.5,
        mode: str = "within-round",
        loss_floor: float = 1e-12,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("`alpha` must be in [0, 1].")
        if mode not in ("within-round", "across-rounds"):
            raise ValueError("`mode` must be 'within-round' or 'across-rounds'.")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            check_finite=check_finite,
            max_update_norm=max_update_norm,
            update_norm_factor=update_norm_factor,
        )
        self.alpha = alpha
        self.mode = mode
        self.loss_floor = loss_floor
        self.required_metrics = (
            (KEY_LOSS_BEFORE, KEY_LOSS_AFTER)
            if mode == "within-round"
            else (KEY_LOSS_AFTER,)
        )
        self.previous_loss: dict[int, float] = {}

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
        after = screened.metric(KEY_LOSS_AFTER)
        if self.mode == "within-round":
            before = screened.metric(KEY_LOSS_BEFORE)
        else:
            before = np.array(
                [
                    self.previous_loss.get(node_id_of(msg), max(loss, self.loss_floor))
                    for msg, loss in zip(screened.accepted, after, strict=True)
                ]
            )
        weights = fedcostwavg_weights(
            num_examples, before, after, self.alpha, self.loss_floor
        )
        weights, _ = fallback_weights(weights, num_examples)
        return weights

    def _on_aggregated(self, server_round: int, screened: ScreenedReplies) -> None:
        """Remember each node's last ``train-loss-after`` (across-rounds mode)."""
        if self.mode == "across-rounds":
            for msg, loss in zip(
                screened.accepted, screened.metric(KEY_LOSS_AFTER), strict=True
            ):
                self.previous_loss[node_id_of(msg)] = float(loss)

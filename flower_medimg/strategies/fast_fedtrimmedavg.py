"""Federated Trimmed Average [Yin et al., 2018], fast version.

Paper: arxiv.org/abs/1803.01498
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from .fast_fedavg import FastFedAvg
from .kernels import trimmed_mean
from .quality import ScreenedReplies


class FastFedTrimmedAvg(FastFedAvg):
    """Federated Trimmed Average strategy reading replies in place.

    Implementation based on https://arxiv.org/abs/1803.01498

    Same result as Flower's ``FedTrimmedAvg``: per coordinate, ``int(beta * N)``
    values are cut from each end and the rest averaged. Computed on column chunks
    of all replies at once, with the reply checks of ``FastFedAvg``.

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
    beta : float (default: 0.2)
        Fraction to cut off of both tails of the distribution. Must be in the range
        ``[0, 0.5)``.
    check_finite : bool (default: True)
        Drop replies with non-finite array values. Linear aggregators check the
        aggregate and only search for the culprits when it is not finite.
    max_update_norm : Optional[float] (default: None)
        Drop replies whose update norm ``||theta_k - theta||`` exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Drop replies whose update norm exceeds this factor times the round's median
        update norm (applied with at least three replies).
    """

    _linear = False
    _weighted = False

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
        beta: float = 0.2,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
    ) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError("`beta` must be in the range [0, 0.5).")
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
        self.beta = beta

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FastFedTrimmedAvg settings:")
        log(INFO, "\t│\t└── beta: %s", self.beta)
        super().summary()

    def _combine(
        self, server_round: int, screened: ScreenedReplies, weights: np.ndarray
    ) -> list[np.ndarray]:
        """Return the coordinate-wise trimmed mean of the accepted replies."""
        return trimmed_mean(screened.columns, self.beta)

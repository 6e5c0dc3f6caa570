"""Distance-based Outlier Suppression (DOS) [Alkhunaizi et al., 2022].

Paper: doi.org/10.1007/978-3-031-16452-1_64 (MICCAI 2022); reference code
github.com/Naiftt/SPAFD
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from .fast_fedavg import FastFedAvg
from .kernels import copod_scores, pairwise_distances, softmin_weights
from .quality import ScreenedReplies, check_update_norms


class DistanceOutlierSuppression(FastFedAvg):
    """Distance-based Outlier Suppression (DOS) strategy.

    Implementation based on https://doi.org/10.1007/978-3-031-16452-1_64

    Byzantine-robust weighting without hyperparameters. Each reply is flattened
    (float arrays only) into ``u_k``: its update ``theta_k - theta`` (the paper's
    choice, default) or its weights (the reference code's default,
    ``use_updates=False``). From the cosine and Euclidean distance matrices ``D``
    between the ``u_k`` each client gets the COPOD outlier score
    ``a_k = copod(D_cos)_k + copod(D_euc)_k`` and the weight
    ``p_k = exp(-a_k) / sum_j exp(-a_j)``; the new model is ``sum_k p_k theta_k``.

    Distances come from one chunked Gram matrix (one read of each reply), or from
    exact pairwise differences for small problems. Fewer than three valid replies
    cannot be scored (two clients always get equal scores): equal weights are used
    and logged, as when the scores are not finite (e.g. identical updates). A
    client with a zero update has cosine distance 1 to every other client.
    Weights never reach 0 (a poisoned update is suppressed, not removed) unless
    ``min_weight`` cuts them.

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
    use_updates : bool (default: True)
        Score updates ``theta_k - theta`` (needs the global arrays sent in
        ``configure_train``) rather than the replied weights.
    min_weight : float (default: 0.0)
        Weights below this value are set to 0 (then renormalised).
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
    _finite_pass = False  # the distance pass detects non-finite replies

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
        use_updates: bool = True,
        min_weight: float = 0.0,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
    ) -> None:
        if not 0.0 <= min_weight < 1.0:
            raise ValueError("`min_weight` must be in [0, 1).")
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
        self.use_updates = use_updates
        self.min_weight = min_weight
        self.last_scores: np.ndarray | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> DOS settings:")
        log(INFO, "\t│\t├── Score updates (not weights): %s", self.use_updates)
        log(INFO, "\t│\t└── Minimum weight: %s", self.min_weight)
        super().summary()

    def _aggregation_weights(
        self, server_round: int, screened: ScreenedReplies
    ) -> np.ndarray:
        """Return the DOS weights of the accepted replies."""
        reference = screened.reference if self.use_updates else None
        if self.use_updates and reference is None:
            log(
                WARNING,
                "DOS: global arrays unknown (configure_train not called); "
                "scoring the replied weights instead of updates",
            )
        euclid, cosine, sq_norms = pairwise_distances(screened.columns, reference)
        if self.check_finite and not np.all(np.isfinite(sq_norms)):
            reasons = check_update_norms(sq_norms)
            bad = [i for i, r in enumerate(reasons) if r is not None]
            screened.reject(bad, [reasons[i] for i in bad])  # type: ignore[misc]
            keep = np.setdiff1d(np.arange(len(sq_norms)), bad)
            euclid, cosine = euclid[np.ix_(keep, keep)], cosine[np.ix_(keep, keep)]
        num = len(screened.accepted)
        if num == 0:
            return np.zeros(0)
        if num < 3:
            log(
                INFO,
                "DOS: %d valid replies, fewer than 3 cannot be scored; "
                "using equal weights",
                num,
            )
            self.last_scores = None
            return np.full(num, 1.0 / num)
        scores = copod_scores(cosine) + copod_scores(euclid)
        self.last_scores = scores
        if not np.all(np.isfinite(scores)):
            log(
                WARNING,
                "DOS: outlier scores are not finite (e.g. identical updates); "
                "using equal weights",
            )
            return np.full(num, 1.0 / num)
        weights = softmin_weights(scores)
        if self.min_weight > 0.0:
            cut = np.where(weights < self.min_weight, 0.0, weights)
            if cut.sum() > 0:
                weights = cut / cut.sum()
        return weights

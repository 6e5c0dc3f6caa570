"""Distance-based Outlier Suppression (DOS) [Alkhunaizi et al., 2022].

Paper: doi.org/10.1007/978-3-031-16452-1_64 (MICCAI 2022); reference code
github.com/Naiftt/SPAFD
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common.logger import log

from .fast_fedavg import FastFedAvg
from .kernels import pairwise_distances
from .quality import ScreenedReplies

__all__ = ["DistanceOutlierSuppression", "copod_scores", "softmin_weights"]


def copod_scores(x: np.ndarray) -> np.ndarray:
    """COPOD outlier score of each row of ``x``.

    Copula-based outlier detection (Li et al., ICDM 2020,
    https://arxiv.org/abs/2009.09463), computed in one pass as pyod's
    ``COPOD().fit(X).decision_function(X)`` does::

        F_l(x_ij) = #{r: x_rj <= x_ij} / K      U_l = -ln F_l
        F_r(x_ij) = #{r: x_rj >= x_ij} / K      U_r = -ln F_r
        U_s = U_l if skew_j < 0, U_r if skew_j > 0, U_l + U_r if skew_j = 0
        score_i = sum_j max(U_s_ij, (U_l_ij + U_r_ij) / 2)

    with the population skewness of each column. A constant column has undefined
    skewness, which makes every score NaN (as in pyod); callers fall back.

    Parameters
    ----------
    x : np.ndarray
        (K, M) matrix, one row per sample.

    Returns
    -------
    np.ndarray
        (K,) scores; larger means more outlying.
    """
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0]
    # counts[i, j] = #{r : x[r, j] <= x[i, j]} via sorted columns
    ordered = np.sort(x, axis=0)
    f_left = np.empty_like(x)
    f_right = np.empty_like(x)
    for j in range(x.shape[1]):
        col = ordered[:, j]
        f_left[:, j] = np.searchsorted(col, x[:, j], side="right")
        f_right[:, j] = k - np.searchsorted(col, x[:, j], side="left")
    u_left = -np.log(f_left / k)
    u_right = -np.log(f_right / k)
    mean = x.mean(axis=0)
    centred = x - mean
    m2 = np.mean(centred**2, axis=0)
    m3 = np.mean(centred**3, axis=0)
    eps = np.finfo(np.float64).eps
    with np.errstate(invalid="ignore", divide="ignore"):
        skew = np.where(m2 <= (eps * mean) ** 2, np.nan, m3 / m2**1.5)
    sign = np.sign(skew)
    u_skew = -u_left * np.sign(sign - 1) + u_right * np.sign(sign + 1)
    outlying = np.maximum(u_skew, 0.5 * (u_left + u_right))
    return outlying.sum(axis=1)


def softmin_weights(scores: np.ndarray) -> np.ndarray:
    """Return ``exp(-a_k) / sum_j exp(-a_j)`` (shifted for stability)."""
    a = np.asarray(scores, dtype=np.float64)
    e = np.exp(-(a - a.min()))
    return e / e.sum()


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
    use_updates : bool (default: True)
        Score updates ``theta_k - theta`` (needs the global arrays sent in
        ``configure_train``) rather than the replied weights.
    min_weight : float (default: 0.0)
        Weights below this value are set to 0 (then renormalised).
    *args, **kwargs
        The arguments of :class:`FastFedAvg` (Flower's ``FedAvg`` arguments, also
        positionally, and the reply checks).
    """

    def __init__(
        self,
        *args: Any,
        use_updates: bool = True,
        min_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= min_weight < 1.0:
            raise ValueError("`min_weight` must be in [0, 1).")
        super().__init__(*args, **kwargs)
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
        euclid, cosine, _ = pairwise_distances(screened.columns, reference)
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

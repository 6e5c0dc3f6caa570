"""FedNova: normalised averaging of local updates [Wang et al., 2020].

Paper: arxiv.org/abs/2007.07481 (NeurIPS 2020); reference code
github.com/JYWa/FedNova (distoptim/FedNova.py)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from .fast_fedavg import FastFedAvg
from .kernels import fednova_coefficients, weighted_sum
from .quality import ScreenedReplies

KEY_NOVA_A = "nova-a"
KEY_LOCAL_STEPS = "local-steps"
KEY_PROXIMAL_MU = "proximal-mu"


class FedNova(FastFedAvg):
    """FedNova strategy: updates normalised by each client's local step count.

    Implementation based on https://arxiv.org/abs/2007.07481

    Each client reports ``nova-a`` (its normalising scalar ``a_k``: the number of
    local steps for plain SGD, larger with momentum) and ``local-steps``
    (``tau_k``). With ``p_k = n_k / N``, ``d_k = theta - theta_k`` and
    ``tau_eff = sum_k p_k tau_k`` if ``proximal_mu != 0`` else ``sum_k p_k a_k``,
    the new global model is::

        theta <- theta - sum_k p_k (tau_eff / a_k) d_k

    a *sum*, as in the reference code (Flower's baseline divides by the sum of the
    scales instead, a normalised mean). Optional server momentum ``beta_g``:
    ``m <- beta_g m + step``, ``theta <- theta - m``. Integer arrays get the
    ``p``-weighted mean. Replies with ``nova-a <= 0`` (no local step) are dropped.
    Without the global arrays (``configure_train`` not called) the strategy falls
    back to the normalised mean with a warning.

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
    proximal_mu : float (default: 0.0)
        FedProx term used by the clients; sent as ``proximal-mu`` in the train
        config when non-zero, and selects ``tau_eff = sum_k p_k tau_k``.
    server_momentum : float (default: 0.0)
        Server momentum factor ``beta_g`` (``gmf`` in the reference code).
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
        proximal_mu: float = 0.0,
        server_momentum: float = 0.0,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
    ) -> None:
        if proximal_mu < 0:
            raise ValueError("`proximal_mu` must be non-negative.")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError("`server_momentum` must be in [0, 1).")
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
        self.proximal_mu = proximal_mu
        self.server_momentum = server_momentum
        self.required_metrics = (KEY_NOVA_A, KEY_LOCAL_STEPS)
        self.momentum_buffer: list[np.ndarray] | None = None
        self.last_tau_eff: float | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FedNova settings:")
        log(INFO, "\t│\t├── proximal mu: %s", self.proximal_mu)
        log(INFO, "\t│\t└── server momentum: %s", self.server_momentum)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training."""
        if self.proximal_mu > 0:
            config[KEY_PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def _aggregation_weights(
        self, server_round: int, screened: ScreenedReplies
    ) -> np.ndarray:
        """Return the (unnormalised) FedNova coefficients ``p_k tau_eff / a_k``."""
        nova_a = screened.metric(KEY_NOVA_A)
        bad = [i for i, a in enumerate(nova_a) if a <= 0]
        if bad:
            screened.reject(bad, [f"metric '{KEY_NOVA_A}' is <= 0" for _ in bad])
        if not screened.accepted:
            return np.zeros(0)
        coeffs, _, tau_eff = fednova_coefficients(
            screened.metric(self.weighted_by_key),
            screened.metric(KEY_NOVA_A),
            screened.metric(KEY_LOCAL_STEPS),
            self.proximal_mu,
        )
        self.last_tau_eff = tau_eff
        return coeffs

    def _combine(
        self, server_round: int, screened: ScreenedReplies, weights: np.ndarray
    ) -> list[np.ndarray]:
        """Apply ``theta - sum_k c_k (theta - theta_k)`` to the float blocks."""
        layout = screened.layout
        assert layout is not None
        float_blocks = layout.float_blocks
        other_blocks = [b for b in range(len(layout.blocks)) if b not in float_blocks]
        num_examples = screened.metric(self.weighted_by_key)
        p = num_examples / num_examples.sum()
        values = weighted_sum(screened.columns, p, other_blocks)
        reference = screened.reference
        if reference is None:
            log(
                WARNING,
                "FedNova: global arrays unknown (configure_train not called); "
                "using the normalised mean of the replies",
            )
            floats = weighted_sum(
                screened.columns, weights / weights.sum(), float_blocks
            )
        else:
            # theta (1 - sum_k c_k) + sum_k c_k theta_k
            floats = weighted_sum(
                [*screened.columns, reference],
                [*weights, 1.0 - float(weights.sum())],
                float_blocks,
            )
            if self.server_momentum > 0:
                floats = self._apply_momentum(floats, reference, float_blocks)
        for b in float_blocks:
            values[b] = floats[b]
        return values  # type: ignore[return-value]

    def _apply_momentum(
        self,
        floats: list[np.ndarray | None],
        reference: list[np.ndarray],
        float_blocks: list[int],
    ) -> list[np.ndarray | None]:
        """Server momentum: ``m <- beta m + (theta - theta_new)``, ``theta - m``."""
        steps = [np.subtract(reference[b], floats[b]) for b in float_blocks]
        if self.momentum_buffer is None or len(self.momentum_buffer) != len(steps):
            self.momentum_buffer = steps
        else:
            for buf, step in zip(self.momentum_buffer, steps, strict=True):
                buf *= self.server_momentum
                buf += step
        for b, buf in zip(float_blocks, self.momentum_buffer, strict=True):
            floats[b] = np.subtract(reference[b], buf, dtype=floats[b].dtype)  # type: ignore[union-attr]
        return floats

"""FedNova: normalised averaging of local updates [Wang et al., 2020].

Paper: arxiv.org/abs/2007.07481 (NeurIPS 2020); reference code
github.com/JYWa/FedNova (distoptim/FedNova.py)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from flower_medimg.core.protocol import (
    CONFIG_PROXIMAL_MU,
    METRIC_LOCAL_STEPS,
    METRIC_NOVA_A,
)

from .fast_fedavg import FastFedAvg
from .kernels import weighted_sum
from .quality import ScreenedReplies

__all__ = ["FedNova", "fednova_coefficients"]


def fednova_coefficients(
    num_examples: Sequence[float] | np.ndarray,
    nova_a: Sequence[float] | np.ndarray,
    local_steps: Sequence[float] | np.ndarray,
    proximal_mu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return FedNova's per-client coefficients (Wang et al. 2020).

    With ``p_k = n_k / N`` and ``tau_eff = sum_k p_k tau_k`` if ``proximal_mu != 0``
    else ``sum_k p_k a_k``, the new model is
    ``theta - sum_k c_k (theta - theta_k)`` with ``c_k = p_k tau_eff / a_k``
    (a sum, as in the reference code, not a normalised mean).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, float]
        ``(c, p, tau_eff)``.
    """
    n = np.asarray(num_examples, dtype=np.float64)
    a = np.asarray(nova_a, dtype=np.float64)
    tau = np.asarray(local_steps, dtype=np.float64)
    if np.any(a <= 0):
        raise ValueError("`nova-a` must be positive")
    p = n / n.sum()
    tau_eff = float(np.dot(p, tau) if proximal_mu != 0.0 else np.dot(p, a))
    return p * tau_eff / a, p, tau_eff


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
    proximal_mu : float (default: 0.0)
        FedProx term used by the clients; sent as ``proximal-mu`` in the train
        config when non-zero, and selects ``tau_eff = sum_k p_k tau_k``.
    server_momentum : float (default: 0.0)
        Server momentum factor ``beta_g`` (``gmf`` in the reference code).
    max_nova_factor : float (default: 100.0)
        ``a_k`` must lie in ``[tau_k, max_nova_factor * tau_k]``: SGD gives
        ``a = tau``, momentum ``rho`` at most ``tau / (1 - rho)`` (100: ``rho <=
        0.99``). A reply outside is dropped.
    max_steps_per_example : Optional[float] (default: None)
        ``tau_k`` may not exceed this times ``num-examples`` (the local epochs when
        every batch holds at least one sample); the ServerApp sets it.
    max_amplification : Optional[float] (default: 10.0)
        No update is scaled by more than this: ``c_k <= max_amplification * p_k``
        (``tau_eff / a_k`` is capped). None for the unbounded original.
    *args, **kwargs
        The arguments of :class:`FastFedAvg` (Flower's ``FedAvg`` arguments, also
        positionally, and the reply checks).
    """

    def __init__(
        self,
        *args: Any,
        proximal_mu: float = 0.0,
        server_momentum: float = 0.0,
        max_nova_factor: float = 100.0,
        max_steps_per_example: float | None = None,
        max_amplification: float | None = 10.0,
        **kwargs: Any,
    ) -> None:
        if proximal_mu < 0:
            raise ValueError("`proximal_mu` must be non-negative.")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError("`server_momentum` must be in [0, 1).")
        if max_nova_factor < 1.0:
            raise ValueError("`max_nova_factor` must be >= 1.")
        super().__init__(*args, **kwargs)
        self.proximal_mu = proximal_mu
        self.server_momentum = server_momentum
        self.max_nova_factor = max_nova_factor
        self.max_steps_per_example = max_steps_per_example
        self.max_amplification = max_amplification
        self.momentum_buffer: list[np.ndarray] | None = None
        self.last_tau_eff: float | None = None

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """Each site's normaliser ``a_k`` and step count ``tau_k``."""
        return (METRIC_NOVA_A, METRIC_LOCAL_STEPS)

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
            config[CONFIG_PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)

    def _aggregation_weights(
        self, server_round: int, screened: ScreenedReplies
    ) -> np.ndarray:
        """Return the (unnormalised) FedNova coefficients ``p_k tau_eff / a_k``."""
        bad, reasons = [], []
        for i, metrics in enumerate(screened.metrics):
            reason = self._check_steps(metrics)
            if reason is not None:
                bad.append(i)
                reasons.append(reason)
        screened.reject(bad, reasons)
        if not screened.accepted:
            return np.zeros(0)
        coeffs, p, tau_eff = fednova_coefficients(
            screened.metric(self.weighted_by_key),
            screened.metric(METRIC_NOVA_A),
            screened.metric(METRIC_LOCAL_STEPS),
            self.proximal_mu,
        )
        if self.max_amplification is not None:
            coeffs = np.minimum(coeffs, self.max_amplification * p)
        self.last_tau_eff = tau_eff
        return coeffs

    def _check_steps(self, metrics: MetricRecord) -> str | None:
        """Why a reply's ``local-steps`` and ``nova-a`` do not fit together, or None."""
        steps, nova_a = metrics[METRIC_LOCAL_STEPS], float(metrics[METRIC_NOVA_A])  # type: ignore[arg-type]
        if not isinstance(steps, int) or steps < 1:
            return (
                f"metric '{METRIC_LOCAL_STEPS}' must be a whole number >= 1, got "
                f"{steps}"
            )
        if not steps * (1 - 1e-9) <= nova_a <= steps * self.max_nova_factor:
            return (
                f"metric '{METRIC_NOVA_A}' is {nova_a:g}, outside [{steps}, "
                f"{steps * self.max_nova_factor:g}] for {steps} local steps"
            )
        limit = self.max_steps_per_example
        examples = float(metrics[self.weighted_by_key])  # type: ignore[arg-type]
        if limit is not None and steps > limit * examples:
            return (
                f"metric '{METRIC_LOCAL_STEPS}' is {steps}, more than "
                f"{limit:g} x {examples:g} examples allow"
            )
        return None

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

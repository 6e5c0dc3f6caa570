"""User-level (client-level) differential privacy around a Flower strategy.

Papers: McMahan et al., https://arxiv.org/abs/1710.06963 (DP-FedAvg);
Geyer et al., https://arxiv.org/abs/1712.07557

Thin subclasses of Flower's ``DifferentialPrivacyServerSideFixedClipping`` and
``DifferentialPrivacyClientSideFixedClipping``::

    delta_k   = theta_k - theta                        (all arrays, flattened jointly)
    delta_k  <- delta_k * min(1, C / ||delta_k||)      (server, or the client's mod)
    theta'    = inner.aggregate(theta + delta_k) + N(0, (z C / m)^2 I)

that add what Flower's leave out:

- the round's train MetricRecord gets ``user-epsilon`` (cumulative, Opacus's RDP
  accountant, one Gaussian release per round at sample rate 1) and ``user-delta``;
- an update of norm 0 is not divided by its norm (Flower's clip helper raises
  ``ZeroDivisionError``);
- the noise ``z C / m`` is only calibrated when the inner strategy takes the
  *unweighted* mean of the clipped updates. Weighting by ``num-examples``, losses or
  scores raises the sensitivity to ``C * max_k p_k`` (and the weights themselves are
  computed from private data), so such strategies are refused unless
  ``allow_data_dependent_weights=True``. Uniform weighting in Flower's API is
  ``FedAvg(weighted_by_key="unit-weight")`` with every ClientApp sending the metric
  ``unit-weight = 1``; the wrapper resets any other value of that metric to 1.

Flower's adaptive-clipping wrappers are deliberately not offered: flwr 1.42 moves
the clipping norm in the opposite direction to Andrew et al.,
https://arxiv.org/abs/1905.03871.

Metrics travel in clear text and are not covered by the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies

from flower_medimg.core import protocol

from ._wire import cast_to_dtype
from .accounting import UserLevelAccountant
from .chain import strategy_chain
from .fast_fedavg import FastFedAvg
from .kernels import update_sq_norms

__all__ = [
    "UNIFORM_WEIGHT_KEY",
    "UserLevelDPClientSideFixedClipping",
    "UserLevelDPServerSideFixedClipping",
    "clip_update",
    "make_user_level_dp",
    "plain_mean",
    "uniform_weighting_problem",
]

#: Constant per-reply metric (= 1) that makes ``FedAvg`` average uniformly.
UNIFORM_WEIGHT_KEY = protocol.METRIC_UNIT_WEIGHT

# Relative slack when checking that a client clipped its own update.
_CLIP_TOLERANCE = 1e-6


def clip_update(
    arrays: list[np.ndarray], reference: list[np.ndarray], clipping_norm: float
) -> tuple[list[np.ndarray], float]:
    """Clip ``arrays - reference`` to L2 norm ``clipping_norm`` (flat clipping).

    ``reference + (arrays - reference) * min(1, C / norm)`` with the norm taken over
    all arrays jointly, in float64 (McMahan et al., https://arxiv.org/abs/1710.06963).
    A zero update is returned unchanged. Integer arrays are rounded back to their
    dtype.

    Parameters
    ----------
    arrays : list[np.ndarray]
        The client's arrays ``theta_k``.
    reference : list[np.ndarray]
        The global arrays ``theta`` the client received, same shapes.
    clipping_norm : float
        The bound ``C`` > 0.

    Returns
    -------
    tuple[list[np.ndarray], float]
        The clipped arrays (original dtypes) and the update's norm before clipping.
    """
    if len(arrays) != len(reference):
        raise ValueError(f"{len(arrays)} arrays against {len(reference)} references")
    flat = [np.ravel(np.asarray(a)) for a in arrays]
    flat_ref = [np.ravel(np.asarray(r)) for r in reference]
    norm = math.sqrt(float(update_sq_norms([flat], flat_ref)[0]))
    if norm <= clipping_norm or norm == 0.0:
        return [np.asarray(a) for a in arrays], norm
    factor = clipping_norm / norm
    clipped = []
    for array, ref in zip(arrays, reference, strict=True):
        array, ref = np.asarray(array), np.asarray(ref, dtype=np.float64)
        value = ref + (array.astype(np.float64) - ref) * factor
        clipped.append(cast_to_dtype(value, array.dtype))
    return clipped, norm


def plain_mean(strategy: FedAvg) -> bool:
    """Whether the strategy aggregates as FedAvg's weighted mean, unchanged."""
    cls = type(strategy)
    if cls.aggregate_train is FedAvg.aggregate_train:
        return True
    return isinstance(strategy, FastFedAvg) and all(
        getattr(cls, name, None) is getattr(FastFedAvg, name, None)
        for name in ("aggregate_screened", "_aggregation_weights", "_combine")
    )


def uniform_weighting_problem(strategy: Strategy) -> tuple[str | None, str | None]:
    """Say why a strategy's aggregate is not an unweighted mean of the replies.

    Rules, applied to the strategy and then to the strategies it wraps (any
    ``Strategy`` held in a ``strategy`` attribute, e.g. ``QualityGate``):

    1. A ``data_dependent_weights`` attribute, when present, decides
       (``True``: refused; ``False``: accepted as uniform).
    2. A ``FedAvg``-family strategy is a uniform mean only if its aggregation is
       ``FedAvg``'s (or ``FastFedAvg``'s) unchanged and ``weighted_by_key`` is
       ``"unit-weight"``. Subclasses that override the aggregation (loss-, score-
       or distance-based weights, medians, server optimisers) are refused.
    3. Any other strategy is refused: its aggregate is not known to be a mean.

    Parameters
    ----------
    strategy : Strategy
        The strategy the DP wrapper would wrap.

    Returns
    -------
    tuple[Optional[str], Optional[str]]
        ``(problem, weight_key)``: ``problem`` is ``None`` when the aggregate is an
        unweighted mean; ``weight_key`` is the metric that must then be constant
        (``None`` if the strategy declared itself uniform).
    """
    for level in strategy_chain(strategy):
        name = type(level).__name__
        declared = getattr(level, "data_dependent_weights", None)
        if declared is True:
            return f"{name} declares data-dependent client weights", None
        if declared is False:
            return None, getattr(level, "weighted_by_key", None)
        if isinstance(level, FedAvg):
            if not plain_mean(level):
                return (
                    f"{name} overrides FedAvg's aggregation, so its client weights "
                    "may depend on client data (losses, scores, distances) or its "
                    "aggregate is not a mean",
                    None,
                )
            key = level.weighted_by_key
            if key != UNIFORM_WEIGHT_KEY:
                return (
                    f"{name} weights clients by the per-client metric '{key}' "
                    f"(use weighted_by_key='{UNIFORM_WEIGHT_KEY}' with every "
                    f"ClientApp sending {UNIFORM_WEIGHT_KEY}=1)",
                    None,
                )
            return None, key
    innermost = type(strategy_chain(strategy)[-1]).__name__
    return (
        f"{innermost} is not a FedAvg-family strategy, so its aggregate is not "
        "known to be an unweighted mean",
        None,
    )


class _UserLevelMixin:
    """Checks, clipping and reporting shared by both user-level DP wrappers."""

    strategy: Strategy
    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        delta: float = 1e-5,
        allow_data_dependent_weights: bool = False,
    ) -> None:
        super().__init__(  # the Flower wrapper next in the MRO
            strategy, noise_multiplier, clipping_norm, num_sampled_clients
        )
        self._setup_user_level(delta, allow_data_dependent_weights)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        self._log_user_level()
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training and remember the global arrays."""
        self._remember(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _setup_user_level(
        self, delta: float, allow_data_dependent_weights: bool
    ) -> None:
        self.user_accountant = UserLevelAccountant(self.noise_multiplier, delta)
        self.allow_data_dependent_weights = allow_data_dependent_weights
        self._reference = ArrayRecord()
        self._warned_integer = False
        problem, key = uniform_weighting_problem(self.strategy)
        self._uniform_key = key if problem is None else None
        if problem is not None:
            if not allow_data_dependent_weights:
                raise ValueError(
                    f"User-level DP noise z*C/m is calibrated for an unweighted mean "
                    f"of the clipped updates, but {problem}. Wrap a uniform strategy, "
                    f"or pass allow_data_dependent_weights=True to accept a "
                    f"sensitivity of C*max_k p_k instead of C/m."
                )
            log(
                WARNING,
                "User-level DP with data-dependent weights (%s): the sensitivity is "
                "C*max_k p_k, not C/m, so the reported user-epsilon understates the "
                "privacy loss, and the weights are released unprotected",
                problem,
            )
        if self.num_sampled_clients == 1:
            log(WARNING, "User-level DP with m = 1: the noise std is z*C itself")
        if self.noise_multiplier == 0:
            log(WARNING, "User-level DP with noise_multiplier 0: epsilon is infinite")

    def _remember(self, arrays: ArrayRecord) -> None:
        self._reference = arrays
        if not self._warned_integer and any(
            not np.issubdtype(np.dtype(a.dtype), np.floating) for a in arrays.values()
        ):
            self._warned_integer = True
            log(
                WARNING,
                "User-level DP: the global model holds integer arrays; Flower casts "
                "the Gaussian noise to their dtype. Keep integer buffers (e.g. "
                "num_batches_tracked) out of the shared arrays.",
            )

    def _enforce_uniform(self, replies: list[Message]) -> None:
        """Reset the uniform weight metric to 1 where a client sent another value."""
        key = self._uniform_key
        if key is None:
            return
        for reply in replies:
            if reply.has_error() or len(reply.content.metric_records) != 1:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            if key in metrics and metrics[key] != 1:
                log(
                    WARNING,
                    "User-level DP: node %s sent %s=%s; reset to 1",
                    reply.metadata.src_node_id,
                    key,
                    metrics[key],
                )
                metrics[key] = 1

    def _clip_replies(self, replies: list[Message], expect_clipped: bool) -> None:
        """Clip every reply's update against the arrays sent this round."""
        reference = self._reference.to_numpy_ndarrays()
        bound = self.clipping_norm * (1.0 + _CLIP_TOLERANCE)
        for reply in replies:
            for name, record in list(reply.content.array_records.items()):
                clipped, norm = clip_update(
                    record.to_numpy_ndarrays(), reference, self.clipping_norm
                )
                if norm <= (bound if expect_clipped else self.clipping_norm):
                    continue
                if expect_clipped:
                    log(
                        WARNING,
                        "User-level DP: node %s sent an update of norm %.4g > C = "
                        "%.4g (is safe_fixedclipping_mod missing?); clipped here",
                        reply.metadata.src_node_id,
                        norm,
                        self.clipping_norm,
                    )
                reply.content[name] = ArrayRecord(
                    {
                        k: Array(np.asarray(v))
                        for k, v in zip(record.keys(), clipped, strict=True)
                    }
                )

    def _report(
        self, released: bool, metrics: MetricRecord | None
    ) -> MetricRecord | None:
        if released:
            self.user_accountant.step()
        epsilon = self.user_accountant.epsilon
        log(
            INFO,
            "User-level DP: epsilon %.4f at delta %g after %d releases",
            epsilon,
            self.user_accountant.delta,
            self.user_accountant.num_releases,
        )
        metrics = MetricRecord() if metrics is None else metrics
        metrics[protocol.ROUND_USER_EPSILON] = epsilon
        metrics[protocol.ROUND_USER_DELTA] = self.user_accountant.delta
        return metrics

    def _log_user_level(self) -> None:
        log(INFO, "\t│\t├── User-level delta: %g", self.user_accountant.delta)
        log(INFO, "\t│\t├── Uniform weight key: %s", self._uniform_key)


class UserLevelDPServerSideFixedClipping(
    _UserLevelMixin, DifferentialPrivacyServerSideFixedClipping
):
    """Central DP with server-side fixed clipping, ε reporting and weight checks.

    Flower's ``DifferentialPrivacyServerSideFixedClipping`` (DP-FedAvg, McMahan et
    al., https://arxiv.org/abs/1710.06963), plus the ``user-epsilon`` and
    ``user-delta`` round metrics, a zero-norm-safe clip, and the refusal of inner
    strategies with data-dependent weights (module docstring). The ClientApp needs
    no change besides sending the ``unit-weight`` metric.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap.
    noise_multiplier : float
        Noise multiplier ``z``; the noise std is ``z * C / m``.
    clipping_norm : float
        Clipping bound ``C`` on each client's update.
    num_sampled_clients : int
        ``m``, the number of clients sampled each round.
    delta : float (default: 1e-5)
        The δ reported with ε.
    allow_data_dependent_weights : bool (default: False)
        Accept an inner strategy whose weights depend on the clients' data.
    """

    def __repr__(self) -> str:
        return "User-level DP Strategy Wrapper (Server-Side Fixed Clipping)"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip the updates, aggregate with the inner strategy, add noise, report ε."""
        replies_list = list(replies)
        if not validate_replies(replies_list, self.num_sampled_clients):
            return None, self._report(False, None)
        self._enforce_uniform(replies_list)
        self._clip_replies(replies_list, expect_clipped=False)
        log(INFO, "aggregate_train: updates clipped to norm %.4f", self.clipping_norm)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies_list)
        if arrays:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        return arrays, self._report(bool(arrays), metrics)


class UserLevelDPClientSideFixedClipping(
    _UserLevelMixin, DifferentialPrivacyClientSideFixedClipping
):
    """Central DP with client-side fixed clipping, ε reporting and weight checks.

    Flower's ``DifferentialPrivacyClientSideFixedClipping`` (DP-FedAvg, McMahan et
    al., https://arxiv.org/abs/1710.06963), plus the ``user-epsilon`` and
    ``user-delta`` round metrics and the refusal of inner strategies with
    data-dependent weights (module docstring). The server sends ``clipping_norm`` in
    the train ConfigRecord; an update that arrives with a norm above it is logged
    and clipped on the server, so a misconfigured site cannot void the guarantee.

    What the ClientApp must do:

    - apply :func:`~flower_medimg.privacy.mods.safe_fixedclipping_mod` (or Flower's
      ``fixedclipping_mod``, which fails on a zero update) to train messages, as
      the *first* mod in the list, so it is the last to touch the arrays, after any
      sparse-sharing mod or DP-SGD;
    - reply with exactly the received array keys, in the same order (private
      parameters stay out of the ArrayRecord in both directions);
    - send the metric ``unit-weight = 1`` in every train reply.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap.
    noise_multiplier : float
        Noise multiplier ``z``; the noise std is ``z * C / m``.
    clipping_norm : float
        Clipping bound ``C`` on each client's update.
    num_sampled_clients : int
        ``m``, the number of clients sampled each round.
    delta : float (default: 1e-5)
        The δ reported with ε.
    allow_data_dependent_weights : bool (default: False)
        Accept an inner strategy whose weights depend on the clients' data.
    """

    def __repr__(self) -> str:
        return "User-level DP Strategy Wrapper (Client-Side Fixed Clipping)"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the clipping, aggregate with the inner strategy, add noise, report."""
        replies_list = list(replies)
        if not validate_replies(replies_list, self.num_sampled_clients):
            return None, self._report(False, None)
        self._enforce_uniform(replies_list)
        self._clip_replies(replies_list, expect_clipped=True)
        arrays, metrics = super().aggregate_train(server_round, replies_list)
        return arrays, self._report(bool(arrays), metrics)


# pylint: disable=too-many-arguments
def make_user_level_dp(
    strategy: Strategy,
    *,
    side: Literal["server", "client"] = "server",
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    delta: float = 1e-5,
    allow_data_dependent_weights: bool = False,
) -> UserLevelDPServerSideFixedClipping | UserLevelDPClientSideFixedClipping:
    """Wrap a strategy with user-level DP (DP-FedAvg with fixed clipping).

    McMahan et al., https://arxiv.org/abs/1710.06963. Every round the clipped
    updates are averaged by ``strategy`` and Gaussian noise of std
    ``noise_multiplier * clipping_norm / num_sampled_clients`` is added; the round's
    train metrics report ``user-epsilon`` (cumulative, Opacus RDP, sample rate 1)
    and ``user-delta``.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap, e.g. ``FedAvg(weighted_by_key="unit-weight")``.
    side : {"server", "client"} (default: "server")
        Where updates are clipped. ``"client"`` needs ``safe_fixedclipping_mod`` in
        the ClientApp (see :class:`UserLevelDPClientSideFixedClipping`); it keeps
        unclipped updates from the server only together with secure aggregation.
    noise_multiplier : float
        Noise multiplier ``z`` >= 0.
    clipping_norm : float
        Clipping bound ``C`` > 0.
    num_sampled_clients : int
        ``m``, the number of clients sampled each round (set the inner strategy to
        sample exactly that many).
    delta : float (default: 1e-5)
        The δ reported with ε.
    allow_data_dependent_weights : bool (default: False)
        Accept an inner strategy whose client weights depend on client data
        (``num-examples``, losses, scores); a warning then says the sensitivity is
        ``C * max_k p_k`` and the reported ε is too small.

    Returns
    -------
    Strategy
        The wrapped strategy; use it like any other (``start(...)``).

    Raises
    ------
    ValueError
        For an unknown ``side``, an invalid parameter, or an inner strategy whose
        aggregate is not an unweighted mean (without the opt-in).
    """
    wrappers = {
        "server": UserLevelDPServerSideFixedClipping,
        "client": UserLevelDPClientSideFixedClipping,
    }
    if side not in wrappers:
        raise ValueError(f"side must be 'server' or 'client', got {side!r}")
    return wrappers[side](
        strategy,
        noise_multiplier,
        clipping_norm,
        num_sampled_clients,
        delta=delta,
        allow_data_dependent_weights=allow_data_dependent_weights,
    )

"""QualityGate: reply screening in front of any Message-API strategy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_medimg.core import protocol

from ._wire import cast_to_dtype
from .fast_fedavg import FastFedAvg
from .quality import ReplyOutcome, ScreenedReplies, node_id_of, screen_replies

__all__ = ["QualityGate", "restore_layout"]


def restore_layout(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give aggregated arrays the dtypes and shapes of the global model they replace.

    Flower's ``FedAvg`` returns BatchNorm's ``num_batches_tracked`` (a 0-d int64) as a
    float64 array of shape (1,). Left so, the next round's replies would no longer
    match the global model and every one would be rejected; integers are therefore
    rounded back, other dtypes cast back and same-size shapes restored.
    """
    for key, array in arrays.items():
        if key not in reference:
            continue
        target = reference[key]
        if array.dtype == target.dtype and list(array.shape) == list(target.shape):
            continue
        restored = cast_to_dtype(array.numpy(), np.dtype(target.dtype))
        if restored.size == int(np.prod(target.shape)):
            restored = restored.reshape(target.shape)
        arrays[key] = Array(np.asarray(restored))  # stays an ndarray, even 0-d
    return arrays


#: The gate's own attributes; every other attribute is the wrapped strategy's.
_OWN_ATTRIBUTES = frozenset(
    {
        "strategy",
        "required_metrics",
        "check_finite",
        "max_update_norm",
        "update_norm_factor",
        "current_arrays",
        "last_outcomes",
        "_weighted_by_key",
    }
)


class QualityGate(Strategy):
    """Wrap a strategy so that malformed or harmful train replies never reach it.

    ``QualityGate(FedAvg())``, ``QualityGate(Krum(num_malicious_nodes=1))`` or
    ``QualityGate(FedCostWAvg())`` behave like the wrapped strategy, except that
    before its ``aggregate_train`` sees the replies the gate drops, and logs with
    the node id and the reason, every reply that:

    - carries an error, or not exactly one ArrayRecord and one MetricRecord;
    - lacks the weighting metric or a required metric, has a non-finite metric, a
      metric key set differing from the other replies', or ``num-examples <= 0``;
    - has missing or extra array keys, or shapes / dtypes differing from the global
      model sent in ``configure_train``;
    - holds non-finite array values, or (optionally) an update norm above
      ``max_update_norm`` or above ``update_norm_factor`` times the median norm.

    An exception raised by the wrapped ``aggregate_train`` is caught and logged and
    the round keeps the previous global model (``(None, None)`` is returned), so one
    reply can never abort the run. In front of one of our strategies
    (:class:`~flower_medimg.strategies.FastFedAvg` and its subclasses) the gate and
    the strategy share one screening pass (the stricter of both settings). The
    counts ``gate-accepted`` and ``gate-rejected`` are added to the round's train
    MetricRecord; :attr:`last_outcomes` describes every reply of the last round.

    Everything else (``configure_train``, ``configure_evaluate``,
    ``aggregate_evaluate``, ``summary``) is delegated to the wrapped strategy, and
    so are attribute reads and writes other than the gate's own parameters
    (``gate.server_learning_rate = 0.5`` sets the wrapped FedOpt's). The gate is not
    an instance of the wrapped class: ``isinstance(QualityGate(FedAvg()), FedAvg)``
    is false; test for the wrapped strategy with ``gate.strategy``.

    Parameters
    ----------
    strategy : Strategy
        The Message-API strategy to protect.
    required_metrics : Sequence[str] (default: ())
        Metrics every train reply must carry as finite scalars, besides the wrapped
        strategy's ``weighted_by_key``.
    check_finite : bool (default: True)
        Drop replies with non-finite array values (one read of each reply).
    max_update_norm : Optional[float] (default: None)
        Drop replies whose update norm ``||theta_k - theta||`` exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Drop replies whose update norm exceeds this factor times the round's median
        update norm (applied with at least three replies).
    weighted_by_key : Optional[str] (default: None)
        Metric holding the number of examples; defaults to the wrapped strategy's
        ``weighted_by_key`` (or ``"num-examples"``).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        *,
        required_metrics: Sequence[str] = (),
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
        weighted_by_key: str | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"QualityGate wraps a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        self.strategy = strategy
        self.required_metrics = tuple(required_metrics)
        self.check_finite = check_finite
        self.max_update_norm = max_update_norm
        self.update_norm_factor = update_norm_factor
        self._weighted_by_key = weighted_by_key
        self.current_arrays: ArrayRecord | None = None
        self.last_outcomes: list[ReplyOutcome] = []

    def __getattr__(self, name: str) -> Any:
        """Delegate unknown attributes to the wrapped strategy."""
        if name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set the gate's own attributes here, every other on the wrapped strategy."""
        if name in _OWN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            setattr(self.strategy, name, value)

    @property
    def weighted_by_key(self) -> str:
        """The metric holding each reply's number of examples."""
        return self._weighted_by_key or getattr(
            self.strategy, "weighted_by_key", protocol.METRIC_NUM_EXAMPLES
        )

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> QualityGate in front of %s:", type(self.strategy).__name__)
        log(INFO, "\t│\t├── Required metrics: %s", list(self.required_metrics))
        log(INFO, "\t│\t├── Non-finite arrays dropped: %s", self.check_finite)
        log(INFO, "\t│\t├── Max update norm: %s", self.max_update_norm)
        log(INFO, "\t│\t└── Update norm factor (x median): %s", self.update_norm_factor)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays, then delegate to the wrapped strategy."""
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _screen(self, replies: Iterable[Message]) -> ScreenedReplies:
        """One screening pass with the gate's rules (and the strategy's, if ours)."""
        inner = self.strategy
        required = list(self.required_metrics)
        max_norm, factor = self.max_update_norm, self.update_norm_factor
        check_finite = self.check_finite
        if isinstance(inner, FastFedAvg):
            required += [m for m in inner.required_metrics if m not in required]
            max_norm = _stricter(max_norm, inner.max_update_norm)
            factor = _stricter(factor, inner.update_norm_factor)
            check_finite = check_finite or inner.check_finite
        return screen_replies(
            replies,
            reference=self.current_arrays,
            weighted_by_key=self.weighted_by_key,
            required_metrics=required,
            check_finite=check_finite,
            max_update_norm=max_norm,
            update_norm_factor=factor,
        )

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies, then aggregate the others with the wrapped strategy."""
        try:
            screened = self._screen(replies)
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(ERROR, "QualityGate: screening failed (%r); keeping the model", err)
            return None, None
        self.last_outcomes = screened.outcomes(_shares(screened, self.weighted_by_key))
        num_accepted, num_rejected = len(screened.accepted), len(screened.rejected)
        log(
            INFO,
            "QualityGate: %d replies accepted, %d rejected (nodes %s)",
            num_accepted,
            num_rejected,
            [node_id for node_id, _ in screened.rejected],
        )
        if not screened.accepted:
            log(WARNING, "QualityGate: no valid reply; keeping the global model")
            return None, None
        try:
            if isinstance(self.strategy, FastFedAvg):
                arrays, metrics = self.strategy.aggregate_screened(
                    server_round, screened
                )
                self.last_outcomes = self.strategy.last_outcomes
            else:
                arrays, metrics = self.strategy.aggregate_train(
                    server_round, screened.accepted
                )
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(
                ERROR,
                "QualityGate: %s.aggregate_train raised %r; keeping the global model",
                type(self.strategy).__name__,
                err,
                exc_info=True,
            )
            return None, None
        if arrays is None and metrics is None:
            return None, None
        if arrays is not None and self.current_arrays is not None:
            arrays = restore_layout(arrays, self.current_arrays)
        metrics = MetricRecord() if metrics is None else metrics
        metrics[protocol.ROUND_GATE_ACCEPTED] = num_accepted
        metrics[protocol.ROUND_GATE_REJECTED] = num_rejected
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def _stricter(a: float | None, b: float | None) -> float | None:
    """Return the smaller of two optional bounds (None is no bound)."""
    bounds = [x for x in (a, b) if x is not None]
    return min(bounds) if bounds else None


def _shares(screened: ScreenedReplies, weighted_by_key: str) -> dict[int, float]:
    """Each accepted reply's share of the summed weighting metric."""
    sizes = screened.metric(weighted_by_key)
    total = float(sizes.sum())
    if total <= 0:
        return {}
    return {
        node_id_of(msg): float(size) / total
        for msg, size in zip(screened.accepted, sizes, strict=True)
    }

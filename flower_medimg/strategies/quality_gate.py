"""QualityGate: reply validation in front of any Message-API strategy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .fast_fedavg import KEY_ACCEPTED, KEY_REJECTED
from .quality import screen_replies


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
        values = array.numpy()
        if np.issubdtype(np.dtype(target.dtype), np.integer):
            values = np.rint(values)
        restored = np.array(values, dtype=target.dtype)  # stays an ndarray, even 0-d
        if restored.size == int(np.prod(target.shape)):
            restored = restored.reshape(target.shape)
        arrays[key] = Array(restored)
    return arrays


class QualityGate(Strategy):
    """Wrap a strategy so that malformed or harmful train replies never reach it.

    ``QualityGate(FedAvg())``, ``QualityGate(Krum(num_malicious_nodes=1))`` or
    ``QualityGate(FedCostWAvg())`` behave like the wrapped strategy, except that
    before its ``aggregate_train`` sees the replies the gate drops, and logs with
    the node id and the reason, every reply that (spec section 0.3):

    - carries an error, or not exactly one ArrayRecord and one MetricRecord;
    - lacks the weighting metric or a required metric, has a non-finite metric, a
      metric key set differing from the other replies', or ``num-examples <= 0``;
    - has missing or extra array keys, or shapes / dtypes differing from the global
      model sent in ``configure_train``;
    - holds non-finite array values, or (optionally) an update norm above
      ``max_update_norm`` or above ``update_norm_factor`` times the median norm.

    An exception raised by the wrapped ``aggregate_train`` is caught and logged and
    the round keeps the previous global model (``(None, None)`` is returned), so one
    reply can never abort the run. The counts ``gate-accepted`` and
    ``gate-rejected`` are added to the round's train MetricRecord. Everything else
    (``configure_train``, ``configure_evaluate``, ``aggregate_evaluate``,
    ``summary``, attributes) is delegated to the wrapped strategy.

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
        self.weighted_by_key = weighted_by_key or getattr(
            strategy, "weighted_by_key", "num-examples"
        )
        self.current_arrays: ArrayRecord | None = None

    def __getattr__(self, name: str) -> Any:
        """Delegate unknown attributes to the wrapped strategy."""
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

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

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies, then aggregate the others with the wrapped strategy."""
        try:
            screened = screen_replies(
                replies,
                reference=self.current_arrays,
                weighted_by_key=self.weighted_by_key,
                required_metrics=self.required_metrics,
                check_finite=self.check_finite,
                max_update_norm=self.max_update_norm,
                update_norm_factor=self.update_norm_factor,
            )
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(ERROR, "QualityGate: screening failed (%r); keeping the model", err)
            return None, None
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
        metrics[KEY_ACCEPTED] = num_accepted
        metrics[KEY_REJECTED] = num_rejected
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

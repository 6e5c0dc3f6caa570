"""FedAvg with reply screening and in-place reading of reply arrays.

Paper (FedAvg): arxiv.org/abs/1602.05629
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flower_medimg.core import protocol

from ._wire import build_arrayrecord
from .kernels import cap_shares, fallback_weights, weighted_sum
from .quality import (
    ReplyOutcome,
    ReplyScreening,
    ScreenedReplies,
    ScreeningRules,
    node_id_of,
    screen_evaluate_replies,
    screen_replies,
)

__all__ = ["FastFedAvg", "MissingMetricError"]


class MissingMetricError(ValueError):
    """No reply of a round carries a metric the strategy cannot aggregate without."""


# pylint: disable=too-many-instance-attributes
class FastFedAvg(ReplyScreening, FedAvg):
    """Federated Averaging that validates replies and reads them in place.

    Implementation based on https://arxiv.org/abs/1602.05629

    Drop-in replacement for Flower's ``FedAvg``: same constructor arguments (also
    positionally), same messages, same result (up to float32 rounding). Before
    aggregating it drops, and logs with the node id and the reason, every reply
    that has an error, lacks the weighting metric, has ``num-examples <= 0``,
    non-finite metrics or arrays, or arrays whose keys, shapes or dtypes differ from
    the global model, instead of raising for the whole round. Arrays are read in
    place from the reply bytes and combined with BLAS, which makes aggregation
    several times faster than ``FedAvg``'s. Integer arrays (e.g. BatchNorm
    ``num_batches_tracked``) are averaged and rounded back to their dtype. The
    round's train MetricRecord gets the counts ``gate-accepted`` and
    ``gate-rejected``; :attr:`last_outcomes` describes every reply of the last
    round (accepted or not, why, its update norm and weight).

    Subclasses change the aggregation weights (``_aggregation_weights``) or the
    combination of the replies (``_combine``), and list the metrics they need in
    ``required_metrics`` (every reply must carry them) and ``requested_metrics``
    (asked of the sites in the train config, for metrics a site computes only on
    request, see :mod:`flower_medimg.core.protocol`).

    Parameters
    ----------
    *args, **kwargs
        The arguments of Flower's ``FedAvg`` (``fraction_train``, ...,
        ``evaluate_metrics_aggr_fn``), positionally in its order or by name.
    check_finite, max_update_norm, update_norm_factor, min_cosine, max_abs_value, \
max_num_examples, max_weight_share
        The reply checks and the weight cap, keyword only; see
        :class:`~flower_medimg.strategies.quality.ReplyScreening`. By default only
        malformed and non-finite replies are dropped, as a drop-in for ``FedAvg``;
        the ServerApp's defaults (``gate.*``) switch on the rest.
    """

    #: Whether ``_combine`` uses the weights (they are logged per node).
    _weighted = True

    # pylint: disable-next=too-many-arguments
    def __init__(
        self,
        *args: Any,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
        min_cosine: float | None = None,
        max_abs_value: float | None = None,
        max_num_examples: int | None = None,
        max_weight_share: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._setup_screening(
            check_finite,
            max_update_norm,
            update_norm_factor,
            min_cosine,
            max_abs_value,
            max_num_examples,
            max_weight_share,
        )
        self.current_arrays: ArrayRecord | None = None
        self.last_weights: dict[int, float] = {}
        self.last_outcomes: list[ReplyOutcome] = []

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """Metrics every reply must carry as finite scalars (besides the weight)."""
        return ()

    @property
    def requested_metrics(self) -> tuple[str, ...]:
        """Optional metrics the strategy asks the sites for in the train config."""
        return ()

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        self._log_screening()
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training.

        Keeps a reference to the global arrays, against which replies are checked
        and updates are measured, and asks the sites for ``requested_metrics``.
        """
        self.current_arrays = arrays
        if self.requested_metrics:
            asked = protocol.requested_metrics(config) | set(self.requested_metrics)
            config[protocol.CONFIG_REQUEST_METRICS] = sorted(asked)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate ArrayRecords and MetricRecords in the received Messages."""
        return self.aggregate_screened(server_round, self._screen(replies))

    def aggregate_screened(
        self, server_round: int, screened: ScreenedReplies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies that were screened already (by this strategy's rules).

        :class:`~flower_medimg.strategies.QualityGate` calls this after its own
        screening pass, so a reply is screened and read once.
        """
        self._check_contract(screened)
        self.last_weights = {}
        arrays = None
        if screened.accepted:
            arrays = self._aggregate_arrays(server_round, screened)
        self.last_outcomes = screened.outcomes(self.last_weights)
        if arrays is None or not screened.accepted:
            log(
                WARNING,
                "aggregate_train: no valid reply in round %d (%d rejected); "
                "keeping the global model",
                server_round,
                len(screened.rejected),
            )
            return None, None
        self._on_aggregated(server_round, screened)
        metrics = self.train_metrics_aggr_fn(
            [msg.content for msg in screened.accepted], self.weighted_by_key
        )
        metrics[protocol.ROUND_GATE_ACCEPTED] = len(screened.accepted)
        metrics[protocol.ROUND_GATE_REJECTED] = len(screened.rejected)
        return arrays, metrics

    @property
    def rules(self) -> ScreeningRules:
        """What a train reply must satisfy to be aggregated."""
        return self.screening_rules(self.weighted_by_key, self.required_metrics)

    def _screen(self, replies: Iterable[Message]) -> ScreenedReplies:
        """Validate the replies and read the accepted ones."""
        return screen_replies(replies, reference=self.current_arrays, rules=self.rules)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Screen the evaluate replies, then aggregate the valid ones' metrics."""
        accepted, rejected = screen_evaluate_replies(
            replies, self.screening_rules(self.weighted_by_key)
        )
        log(
            INFO,
            "aggregate_evaluate: %d replies accepted, %d rejected",
            len(accepted),
            len(rejected),
        )
        if not accepted:
            return None
        return self.evaluate_metrics_aggr_fn(
            [msg.content for msg in accepted], self.weighted_by_key
        )

    def _check_contract(self, screened: ScreenedReplies) -> None:
        """Raise when no reply carries a metric this strategy cannot do without.

        One reply without it is dropped like any malformed reply; *every* reply
        without it means the ClientApps do not send it, and the model would never
        move, so the run stops and says which metric is missing.
        """
        if screened.accepted or not screened.rejected:
            return
        for key in self.required_metrics:
            missing = f"metric '{key}' is missing"
            if all(reason == missing for _, reason in screened.rejected):
                raise MissingMetricError(
                    f"{type(self).__name__} needs the metric '{key}' in every train "
                    f"reply, and no reply of this round has it (nodes "
                    f"{[node for node, _ in screened.rejected]}). The ClientApp must "
                    f"send it in its reply's MetricRecord (see "
                    f"flower_medimg.core.protocol)."
                )

    def _aggregation_weights(
        self, server_round: int, screened: ScreenedReplies
    ) -> np.ndarray:
        """Return one normalised weight per accepted reply (may drop replies)."""
        weights, _ = fallback_weights(None, screened.metric(self.weighted_by_key))
        return weights

    def _combine(
        self, server_round: int, screened: ScreenedReplies, weights: np.ndarray
    ) -> list[np.ndarray]:
        """Combine the accepted replies' blocks (default: weighted average)."""
        return weighted_sum(screened.columns, weights)  # type: ignore[return-value]

    def _on_aggregated(self, server_round: int, screened: ScreenedReplies) -> None:
        """Update the strategy's state after a successful aggregation."""

    def _aggregate_arrays(
        self, server_round: int, screened: ScreenedReplies
    ) -> ArrayRecord | None:
        """Weight and combine the replies; None if nothing valid is left."""
        weights = self._aggregation_weights(server_round, screened)
        if not screened.accepted:
            return None
        if self._weighted and self.max_weight_share is not None:
            weights = self._capped(screened, weights)
        values = self._combine(server_round, screened, weights)
        if self.check_finite and not all_finite(values):
            log(WARNING, "aggregate_train: the aggregate is not finite; skipping round")
            return None
        self._log_weights(screened, weights)
        return build_arrayrecord(screened.layout, values)  # type: ignore[arg-type]

    def _capped(self, screened: ScreenedReplies, weights: np.ndarray) -> np.ndarray:
        """Cap every share at ``max_weight_share`` and log the nodes it cut.

        Coefficients that do not sum to one (FedNova's) are capped as shares and
        scaled back to their sum.
        """
        total = float(np.sum(weights))
        if not total > 0:
            return weights
        capped = cap_shares(weights / total, self.max_weight_share) * total  # type: ignore[arg-type]
        for msg, before, after in zip(screened.accepted, weights, capped, strict=True):
            if after < before * (1 - 1e-9):
                log(
                    WARNING,
                    "aggregate_train: weight of node %d capped from %.4f to %.4f "
                    "(max-weight-share %g)",
                    node_id_of(msg),
                    before / total,
                    after / total,
                    self.max_weight_share,
                )
        return capped

    def _log_weights(self, screened: ScreenedReplies, weights: np.ndarray) -> None:
        if not self._weighted:
            log(INFO, "aggregate_train: %d replies aggregated", len(weights))
            return
        self.last_weights = {
            node_id_of(msg): float(w)
            for msg, w in zip(screened.accepted, weights, strict=True)
        }
        log(
            INFO,
            "aggregate_train: %d replies aggregated, weights by node: %s",
            len(weights),
            ", ".join(f"{k}: {w:.4f}" for k, w in self.last_weights.items()),
        )


def all_finite(values: Iterable[np.ndarray | None]) -> bool:
    """Whether every float block (of any shape) of an aggregate is finite."""
    for block in values:
        if block is None or block.dtype.kind != "f":
            continue
        if (
            not np.isfinite(np.add.reduce(block, axis=None))
            and not np.isfinite(block).all()
        ):
            return False
    return True

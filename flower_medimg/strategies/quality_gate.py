"""QualityGate: reply screening in front of any Message-API strategy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_medimg.core import protocol

from ._wire import cast_to_dtype
from .chain import DelegatingWrapper, strategy_chain
from .fast_fedavg import FastFedAvg, all_finite
from .kernels import cap_shares
from .quality import (
    ReplyOutcome,
    ReplyScreening,
    ScreenedReplies,
    ScreeningRules,
    node_id_of,
    screen_evaluate_replies,
    screen_replies,
)

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
        "current_arrays",
        "last_outcomes",
        "num_examples_bounds",
        "_weighted_by_key",
        *ReplyScreening._screening_names,
    }
)


class QualityGate(DelegatingWrapper, ReplyScreening, Strategy):
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
    - holds non-finite array values, or (optionally) values above
      ``max_abs_value``, an update norm above ``max_update_norm`` or above
      ``update_norm_factor`` times the median norm, or an update pointing away from
      most of the other updates (``min_cosine``);

    and caps every remaining reply's weight at ``max_weight_share`` (in front of
    Flower's strategies by lowering the weighting metric the wrapped strategy
    reads). Evaluate replies are screened the same way before the wrapped
    ``aggregate_evaluate`` sees them.

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
    (``gate.server_learning_rate = 0.5`` sets the wrapped FedOpt's). The gate keeps
    its own ``current_arrays`` (the global model it screens against): writing
    ``gate.current_arrays`` does not set the wrapped strategy's, which its own
    ``configure_train`` sets (a Flower test of FedAvgM that writes it directly
    fails for this reason). The gate is not
    an instance of the wrapped class: ``isinstance(QualityGate(FedAvg()), FedAvg)``
    is false; test for the wrapped strategy with ``gate.strategy``.

    Parameters
    ----------
    strategy : Strategy
        The Message-API strategy to protect.
    required_metrics : Sequence[str] (default: ())
        Metrics every train reply must carry as finite scalars, besides the wrapped
        strategy's ``weighted_by_key``.
    check_finite, max_update_norm, update_norm_factor, min_cosine, max_abs_value, \
max_num_examples, max_weight_share
        The reply checks and the weight cap; see
        :class:`~flower_medimg.strategies.quality.ReplyScreening`.
    weighted_by_key : Optional[str] (default: None)
        Metric holding the number of examples; defaults to the wrapped strategy's
        ``weighted_by_key`` (or ``"num-examples"``).
    """

    _OWN_ATTRIBUTES = _OWN_ATTRIBUTES

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        strategy: Strategy,
        *,
        required_metrics: Sequence[str] = (),
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
        min_cosine: float | None = None,
        max_abs_value: float | None = None,
        max_num_examples: int | None = None,
        max_weight_share: float | None = None,
        weighted_by_key: str | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"QualityGate wraps a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        self.strategy = strategy
        self.required_metrics = tuple(required_metrics)
        self._setup_screening(
            check_finite,
            max_update_norm,
            update_norm_factor,
            min_cosine,
            max_abs_value,
            max_num_examples,
            max_weight_share,
        )
        self._weighted_by_key = weighted_by_key
        self.current_arrays: ArrayRecord | None = None
        self.last_outcomes: list[ReplyOutcome] = []

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
        self._log_screening()
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays, then delegate to the wrapped strategy."""
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    @property
    def rules(self) -> ScreeningRules:
        """One set of rules: the gate's, and the wrapped strategy's if it is ours."""
        rules = self.screening_rules(self.weighted_by_key, self.required_metrics)
        if isinstance(self.strategy, FastFedAvg):
            rules = rules.stricter(self.strategy.rules)
        return rules

    def _screen(self, replies: Iterable[Message]) -> ScreenedReplies:
        """One screening pass with the gate's rules (and the strategy's, if ours)."""
        return screen_replies(
            replies,
            reference=self.current_arrays,
            rules=self.rules,
            log_received=isinstance(self.strategy, FastFedAvg),
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
        self.last_outcomes = screened.outcomes(
            _shares(screened, self.weighted_by_key, self.max_weight_share)
        )
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
                with _metrics_of(self.strategy, "train", screened.accepted):
                    arrays, metrics = self.strategy.aggregate_train(
                        server_round, self._with_capped_weights(screened.accepted)
                    )
                if arrays is not None and self.current_arrays is not None:
                    arrays = restore_layout(arrays, self.current_arrays)
                if arrays is not None and not self._finite(arrays):
                    return None, None
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
        metrics = MetricRecord() if metrics is None else metrics
        metrics[protocol.ROUND_GATE_ACCEPTED] = num_accepted
        metrics[protocol.ROUND_GATE_REJECTED] = num_rejected
        return arrays, metrics

    def _finite(self, arrays: ArrayRecord) -> bool:
        """Whether the wrapped strategy's aggregate may replace the global model.

        (Our strategies check their own aggregate before they build it.)
        """
        if not self.check_finite or all_finite(a.numpy() for a in arrays.values()):
            return True
        log(
            WARNING,
            "QualityGate: %s's aggregate is not finite; keeping the global model",
            type(self.strategy).__name__,
        )
        return False

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
        """Screen the evaluate replies, then delegate the valid ones."""
        try:
            accepted, rejected = screen_evaluate_replies(
                replies, self.screening_rules(self.weighted_by_key)
            )
            log(
                INFO,
                "QualityGate: %d evaluate replies accepted, %d rejected (nodes %s)",
                len(accepted),
                len(rejected),
                [node_id for node_id, _ in rejected],
            )
            if not accepted:
                return None
            with _metrics_of(self.strategy, "evaluate", accepted):
                return self.strategy.aggregate_evaluate(
                    server_round, self._with_capped_weights(accepted)
                )
        except Exception as err:  # pylint: disable=broad-exception-caught
            log(ERROR, "QualityGate: evaluation aggregate failed (%r)", err)
            return None

    def _with_capped_weights(self, replies: list[Message]) -> list[Message]:
        """Lower the weighting metric of replies above ``max_weight_share``.

        A Flower strategy weights by the metric itself, so the cap is applied to a
        copy of each reply's MetricRecord that the wrapped strategy reads (its
        metric aggregation still sees what the sites sent, see :func:`_metrics_of`).
        """
        if self.max_weight_share is None or len(replies) < 2:
            return replies
        key = self.weighted_by_key
        records = [next(iter(r.content.metric_records.values())) for r in replies]
        values = np.array([float(m[key]) for m in records])  # type: ignore[arg-type]
        total = float(values.sum())
        capped = cap_shares(values / total, self.max_weight_share) * total
        if np.allclose(capped, values, rtol=1e-12, atol=0):
            return replies
        out = []
        for reply, record, before, after in zip(
            replies, records, values, capped, strict=True
        ):
            if after < before * (1 - 1e-9):
                log(
                    WARNING,
                    "QualityGate: weight of node %d capped from %.4f to %.4f "
                    "(max-weight-share %g)",
                    node_id_of(reply),
                    before / total,
                    after / total,
                    self.max_weight_share,
                )
            out.append(_with_metric(reply, record, key, float(after)))
        return out


def _with_metric(
    reply: Message, record: MetricRecord, key: str, value: float
) -> Message:
    """Return a copy of ``reply`` whose MetricRecord has ``key`` = ``value``."""
    content = RecordDict(dict(reply.content.items()))
    name = next(iter(reply.content.metric_records))
    content[name] = MetricRecord({**dict(record), key: value})
    return Message(content, metadata=reply.metadata)


def _shares(
    screened: ScreenedReplies, weighted_by_key: str, max_share: float | None
) -> dict[int, float]:
    """Each accepted reply's share of the summed weighting metric, capped."""
    sizes = screened.metric(weighted_by_key)
    total = float(sizes.sum())
    if total <= 0:
        return {}
    shares = sizes / total
    if max_share is not None and len(shares) > 1:
        shares = cap_shares(shares, max_share)
    return {
        node_id_of(msg): float(share)
        for msg, share in zip(screened.accepted, shares, strict=True)
    }


@contextmanager
def _metrics_of(
    strategy: Strategy, phase: str, replies: list[Message]
) -> Iterator[None]:
    """Let ``strategy``'s metric aggregation read ``replies`` as the sites sent them.

    The wrapped strategy receives copies whose weighting metric is capped; the
    ``<phase>_metrics_aggr_fn`` of the first strategy down the chain that has one
    (a recorder of each site's metrics, or Flower's average) gets the original
    contents for the time of the call.
    """
    name = f"{phase}_metrics_aggr_fn"
    owners = [level for level in strategy_chain(strategy) if name in vars(level)]
    if not owners:
        yield
        return
    owner, aggregate = owners[0], vars(owners[0])[name]
    originals = [reply.content for reply in replies]
    setattr(owner, name, lambda _contents, key: aggregate(originals, key))
    try:
        yield
    finally:
        setattr(owner, name, aggregate)

"""One federated round, driven step by step so that the run can stop or resume.

``Strategy.start`` runs a fixed number of rounds from round 1. :func:`run_round`
is the body of its loop for one round (train, federated evaluation, central
evaluation), the same calls in the same order with the same logging, so any
Message-API strategy behaves as under ``start``; in addition it hands the train
replies to the strategy in a fixed order (by content, for reproducible runs) and
reports which nodes were sampled and what happened to every train reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from .replies import ReplyOutcome, forget_outcomes, round_outcomes

__all__ = ["RoundReport", "log_start", "run_round"]

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class RoundReport:
    """What one round did besides updating ``Result``.

    Attributes
    ----------
    server_round : int
        The round.
    arrays : ArrayRecord
        The global arrays after the round (unchanged if aggregation failed).
    sampled : list[int]
        Node ids that were sent a train message.
    replies : list[ReplyOutcome]
        Every train reply, accepted or rejected.
    """

    server_round: int
    arrays: ArrayRecord
    sampled: list[int] = field(default_factory=list)
    replies: list[ReplyOutcome] = field(default_factory=list)

    @property
    def contributors(self) -> list[int]:
        """Node ids whose replies were aggregated."""
        return [r.node_id for r in self.replies if r.accepted]


def _content_key(reply: Message) -> str:
    """Order replies by the hash of their arrays, not by arrival.

    Aggregation sums floating-point numbers, so the order changes the last bits of
    the model; with FedAdam's normalised step these grow to visible differences.
    Sorting by the arrays makes a run with the same seeds give the same model, also
    after a resume, whichever site answers first.
    """
    if reply.has_error():
        return reply.error.reason
    # arrays only: metrics such as train-time-s differ between runs
    return "".join(record.object_id for record in reply.content.array_records.values())


def log_start(
    strategy: Strategy,
    num_rounds: int,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
) -> None:
    """Log the strategy's start as ``Strategy.start`` does."""
    log(INFO, "Starting %s strategy:", strategy.__class__.__name__)
    log_strategy_start_info(num_rounds, arrays, train_config, evaluate_config)
    strategy.summary()
    log(INFO, "")


# pylint: disable-next=too-many-arguments
def run_round(
    strategy: Strategy,
    grid: Grid,
    server_round: int,
    num_rounds: int,
    arrays: ArrayRecord,
    *,
    result: Result,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: EvaluateFn | None = None,
) -> RoundReport:
    """Run round ``server_round``: train, evaluate at the sites, evaluate centrally.

    ``result`` is updated as ``Strategy.start`` updates it.

    Returns
    -------
    RoundReport
        The new global arrays, the sampled nodes and every reply's outcome.
    """
    log(INFO, "")
    log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
    messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
    report = RoundReport(
        server_round,
        arrays,
        sampled=[int(m.metadata.dst_node_id) for m in messages],
    )
    replies = sorted(
        grid.send_and_receive(messages=messages, timeout=timeout), key=_content_key
    )
    forget_outcomes(strategy)
    agg_arrays, agg_metrics = strategy.aggregate_train(server_round, replies)
    report.replies = round_outcomes(strategy, replies)
    if agg_arrays is not None:
        result.arrays = agg_arrays
        report.arrays = agg_arrays
    if agg_metrics is not None:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_metrics)
        result.train_metrics_clientapp[server_round] = agg_metrics

    evaluate_replies = grid.send_and_receive(
        messages=strategy.configure_evaluate(
            server_round, report.arrays, evaluate_config, grid
        ),
        timeout=timeout,
    )
    agg_evaluate = strategy.aggregate_evaluate(server_round, evaluate_replies)
    if agg_evaluate is not None:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate)
        result.evaluate_metrics_clientapp[server_round] = agg_evaluate

    if evaluate_fn is not None:
        log(INFO, "Global evaluation")
        central = evaluate_fn(server_round, report.arrays)
        log(INFO, "\t└──> MetricRecord: %s", central)
        if central is not None:
            result.evaluate_metrics_serverapp[server_round] = central
    return report

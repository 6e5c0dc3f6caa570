"""What happened to each train reply of a round: accepted or rejected, and why.

Our strategies and the :class:`~flower_medimg.strategies.QualityGate` log every
reply they drop (``log_rejection``: node id and reason) rather than returning it, so
:class:`RejectionLog` listens to Flower's logger while ``aggregate_train`` runs.
:func:`reply_outcomes` adds what the replies themselves say: error replies, the
update norm ``||theta_k - theta||`` and the weight each accepted reply received.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import FLOWER_LOGGER

__all__ = [
    "RejectionLog",
    "ReplyOutcome",
    "reply_outcomes",
    "strategy_weights",
    "update_norms",
]

# The message that flower_medimg.strategies.quality.log_rejection logs.
_REJECTION_PREFIX = "\t> Rejected train reply from node"


@dataclass(frozen=True)
class ReplyOutcome:
    """One train reply, as the registry and the audit log record it.

    Attributes
    ----------
    node_id : int
        The sending node.
    accepted : bool
        Whether the reply was aggregated.
    reason : Optional[str]
        Why it was rejected.
    update_norm : Optional[float]
        ``||theta_k - theta||`` over all arrays (None if the layout differs).
    weight : Optional[float]
        The reply's share in the aggregate (accepted replies).
    """

    node_id: int
    accepted: bool
    reason: str | None
    update_norm: float | None
    weight: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


class RejectionLog(logging.Handler):
    """Collect ``(node id, reason)`` of the replies a strategy logs as rejected.

    Use as a context manager around ``strategy.aggregate_train``.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.rejected: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the node id and reason of a rejection record."""
        if isinstance(record.msg, str) and record.msg.startswith(_REJECTION_PREFIX):
            node_id, reason = record.args  # type: ignore[misc]
            self.rejected.setdefault(int(node_id), str(reason))

    def __enter__(self) -> RejectionLog:
        FLOWER_LOGGER.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        FLOWER_LOGGER.removeHandler(self)


def _update_norm(reply: Message, reference: ArrayRecord) -> float | None:
    if reply.has_error():
        return None
    records = list(reply.content.array_records.values())
    if len(records) != 1 or list(records[0].keys()) != list(reference.keys()):
        return None
    total = 0.0
    for key, array in records[0].items():
        values = array.numpy()
        if values.shape != tuple(reference[key].shape):
            return None
        diff = values.astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.vdot(diff, diff))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def update_norms(
    replies: Sequence[Message], reference: ArrayRecord
) -> dict[int, float | None]:
    """Return ``||theta_k - theta||`` by node (None for errors or another layout).

    Call it before ``aggregate_train``: the DP wrappers clip the replies in place.
    """
    return {
        int(reply.metadata.src_node_id): _update_norm(reply, reference)
        for reply in replies
    }


def strategy_weights(strategy: object) -> dict[int, float] | None:
    """Return the per-node weights the strategy (or one it wraps) last used.

    The dict itself is returned: a strategy that assigns a new one each round can
    be told apart from one whose weights are left from an earlier round.
    """
    level: object = strategy
    for _ in range(8):  # wrapper chains are short
        weights = vars(level).get("last_weights")
        if weights:
            return weights
        level = vars(level).get("strategy")
        if level is None:
            return None
    return None


def reply_outcomes(
    replies: Sequence[Message],
    norms: Mapping[int, float | None],
    rejected: Mapping[int, str],
    weights: Mapping[int, float] | None,
    weighted_by_key: str,
) -> list[ReplyOutcome]:
    """Describe every train reply of a round.

    Parameters
    ----------
    replies : Sequence[Message]
        The round's train replies.
    norms : Mapping[int, float | None]
        Update norms by node, from :func:`update_norms`.
    rejected : Mapping[int, str]
        Node id -> reason, from :class:`RejectionLog`; error replies are rejected
        too.
    weights : Optional[Mapping[int, float]]
        The strategy's own weights by node (:func:`strategy_weights`) when they
        cover exactly the accepted nodes; otherwise each accepted reply's share of
        ``weighted_by_key`` is reported.
    weighted_by_key : str
        Metric the strategy weights by.
    """
    outcomes = []
    reasons = dict(rejected)
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error():
            reasons.setdefault(node_id, f"error reply ({reply.error.reason})")
    accepted = [r for r in replies if int(r.metadata.src_node_id) not in reasons]
    accepted_ids = {int(r.metadata.src_node_id) for r in accepted}
    if weights is None or set(weights) != accepted_ids:
        sizes = {}
        for reply in accepted:
            metrics = next(iter(reply.content.metric_records.values()), {})
            sizes[int(reply.metadata.src_node_id)] = float(
                metrics.get(weighted_by_key, 0.0)
            )
        total = sum(sizes.values())
        weights = {n: s / total for n, s in sizes.items()} if total > 0 else None
    for reply in replies:
        node_id = int(reply.metadata.src_node_id)
        ok = node_id in accepted_ids
        outcomes.append(
            ReplyOutcome(
                node_id=node_id,
                accepted=ok,
                reason=None if ok else reasons[node_id],
                update_norm=norms.get(node_id),
                weight=(weights or {}).get(node_id) if ok else None,
            )
        )
    return outcomes

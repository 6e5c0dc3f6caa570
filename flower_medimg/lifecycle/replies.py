"""What happened to each train reply of a round: accepted or rejected, and why.

Our strategies and the :class:`~flower_medimg.strategies.QualityGate` screen every
reply and keep the result in ``last_outcomes`` (node id, accepted or not, the
reason, the update norm ``||theta_k - theta||`` and the weight it received).
:func:`round_outcomes` takes them from the outermost strategy of the chain that
screens; a chain without screening (``gate.enabled = false`` in front of one of
Flower's strategies) records error replies as rejected and the others as accepted,
without norms or weights: nothing read them.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from flower_medimg.strategies.chain import strategy_chain
from flower_medimg.strategies.quality import ReplyOutcome, node_id_of

__all__ = ["ReplyOutcome", "forget_outcomes", "round_outcomes"]


def _screening_levels(strategy: Strategy) -> list[Strategy]:
    return [
        level for level in strategy_chain(strategy) if hasattr(level, "last_outcomes")
    ]


def forget_outcomes(strategy: Strategy) -> None:
    """Clear the outcomes of the previous round (call before ``aggregate_train``)."""
    for level in _screening_levels(strategy):
        level.last_outcomes = []  # type: ignore[attr-defined]


def round_outcomes(
    strategy: Strategy, replies: Sequence[Message]
) -> list[ReplyOutcome]:
    """Describe every train reply of the round just aggregated.

    Parameters
    ----------
    strategy : Strategy
        The strategy (chain) that aggregated ``replies``.
    replies : Sequence[Message]
        The round's train replies.
    """
    for level in _screening_levels(strategy):
        outcomes = level.last_outcomes  # type: ignore[attr-defined]
        if outcomes:
            return list(outcomes)
    return [
        ReplyOutcome(
            node_id=node_id_of(reply),
            accepted=not reply.has_error(),
            reason=f"error reply ({reply.error.reason})" if reply.has_error() else None,
            update_norm=None,
            weight=None,
        )
        for reply in replies
    ]

"""Never wait forever for sites, and say which site did not answer.

Flower's strategies sample nodes with ``sample_nodes``, which polls
``grid.get_node_ids()`` once a second until ``min_available_nodes`` are connected,
without a time limit: a federation whose hospitals went offline hangs for ever.
:class:`NodeDeadlineGrid` wraps the Grid handed to ``Strategy.start`` and raises a
clear error once too few nodes have been connected for longer than the deadline.

It also pulls the replies every :data:`REPLY_POLL_INTERVAL` seconds instead of
the 3 s Flower 1.42's deployment Grid sleeps between pulls (the simulation Grid
pulls every 0.1 s), which would add up to 3 s to every phase of every round, and
names the sites that sent no valid reply in a round: Flower 1.42 reports a
vanished SuperNode's stand-in error as coming from the SuperLink (node 1) and does
not log a reply that timed out at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["REPLY_POLL_INTERVAL", "NodeDeadlineGrid", "TooFewNodesError"]

#: Seconds between two pulls of the replies of a phase.
REPLY_POLL_INTERVAL = 0.2


class TooFewNodesError(RuntimeError):
    """Fewer nodes than required stayed connected for longer than the deadline."""


class NodeDeadlineGrid:
    """A Grid that gives up waiting for ``required_nodes`` after ``timeout`` seconds.

    Every other attribute is the wrapped Grid's.

    Parameters
    ----------
    grid : Grid
        The Grid Flower hands to the ServerApp.
    required_nodes : int
        Nodes the strategy needs (``max(min_available_nodes, min_train_nodes)``).
    timeout : float
        Seconds a shortfall may last before :class:`TooFewNodesError` is raised.
    clock : callable, optional
        Monotonic clock (for tests).
    """

    def __init__(
        self,
        grid: Grid,
        required_nodes: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._grid = grid
        self.required_nodes = required_nodes
        self.timeout = timeout
        self._clock = clock
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        """Return the connected node ids; raise if a shortfall outlasts the timeout."""
        node_ids = list(self._grid.get_node_ids())
        if len(node_ids) >= self.required_nodes:
            self._short_since = None
            return node_ids
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        waited = now - self._short_since
        if waited > self.timeout:
            raise TooFewNodesError(
                f"Only {len(node_ids)} node(s) connected but the strategy needs "
                f"{self.required_nodes} (strategy.min-available-nodes / "
                f"strategy.min-train-nodes); gave up after {waited:.0f} s "
                f"(node-wait-timeout = {self.timeout:g} s)."
            )
        return node_ids

    def wait_for_nodes(self, poll_interval: float = 1.0) -> list[int]:
        """Block until ``required_nodes`` are connected; return their ids."""
        while len(node_ids := list(self.get_node_ids())) < self.required_nodes:
            log(
                INFO,
                "Waiting for sites: %d of %d connected",
                len(node_ids),
                self.required_nodes,
            )
            time.sleep(poll_interval)
        return node_ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for the replies, and log every node without a valid reply."""
        messages = list(messages)
        replies = self._push_and_pull(messages, timeout)
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
        missing = sorted({m.metadata.dst_node_id for m in messages} - answered)
        if missing:
            kinds = sorted({m.metadata.message_type for m in messages})
            log(
                WARNING,
                "No valid %s reply from node(s) %s (failed, disconnected or timed "
                "out); going on with the %d that replied",
                "/".join(kinds),
                missing,
                len(answered),
            )
        return replies

    def _push_and_pull(
        self, messages: list[Message], timeout: float | None
    ) -> list[Message]:
        """Flower's ``Grid.send_and_receive``, pulling every REPLY_POLL_INTERVAL."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else self._clock() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self._grid.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending or (deadline is not None and self._clock() >= deadline):
                break
            time.sleep(REPLY_POLL_INTERVAL)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

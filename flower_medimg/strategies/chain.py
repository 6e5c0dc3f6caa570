"""Wrapped strategies: a strategy and the strategies it wraps, outermost first.

``QualityGate``, the user-level DP wrappers and Flower's own DP wrappers keep the
strategy they wrap in their ``strategy`` attribute. Whoever needs to look through
the wrappers (the resume state, the weighting checks of user-level DP, the reply
outcomes of a round) walks the same chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["DelegatingWrapper", "strategy_chain"]


class DelegatingWrapper:
    """Mixin of a strategy wrapper: what is not its own is the wrapped strategy's.

    Attribute reads and writes other than the names in ``_OWN_ATTRIBUTES`` go to
    ``self.strategy``, so that ``wrapper.server_learning_rate = 0.5`` sets the
    wrapped FedOpt's and the lifecycle finds the wrapped strategy's
    ``num_examples_bounds`` through any chain of wrappers. Evaluation is the
    wrapped strategy's unless the wrapper defines its own.
    """

    _OWN_ATTRIBUTES: frozenset[str] = frozenset({"strategy"})

    def __getattr__(self, name: str) -> Any:
        """Delegate unknown attributes to the wrapped strategy."""
        if name in self._OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set the wrapper's own attributes here, every other on the wrapped one."""
        if name in self._OWN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            setattr(self.strategy, name, value)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """Return ``strategy`` and the strategies it wraps, outermost first."""
    chain = [strategy]
    while isinstance(inner := vars(chain[-1]).get("strategy"), Strategy):
        if any(inner is level for level in chain):  # a wrapper loop: stop here
            break
        chain.append(inner)
    return chain

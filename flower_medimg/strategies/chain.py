"""Wrapped strategies: a strategy and the strategies it wraps, outermost first.

``QualityGate``, the user-level DP wrappers and Flower's own DP wrappers keep the
strategy they wrap in their ``strategy`` attribute. Whoever needs to look through
the wrappers (the resume state, the weighting checks of user-level DP, the reply
outcomes of a round) walks the same chain.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

__all__ = ["strategy_chain"]


def strategy_chain(strategy: Strategy) -> list[Strategy]:
    """Return ``strategy`` and the strategies it wraps, outermost first."""
    chain = [strategy]
    while isinstance(inner := vars(chain[-1]).get("strategy"), Strategy):
        if any(inner is level for level in chain):  # a wrapper loop: stop here
            break
        chain.append(inner)
    return chain

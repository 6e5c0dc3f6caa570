"""Save and restore what a strategy remembers between rounds.

A strategy's memory is in its attributes: FedAdam's ``m_t`` and ``v_t``,
FedCostWAvg's ``previous_loss``, the cyclic strategy's position and random state,
the user-level DP wrapper's accountant, and so on. :func:`capture_strategy_state`
takes every attribute of the strategy and of each strategy it wraps (its
``strategy`` attribute: QualityGate, the DP wrappers), except functions and the
wrapped strategies themselves; :func:`restore_strategy_state` sets them on a
freshly built strategy of the same classes. This works for Flower's strategies
and ours without knowing their internals.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from flower_medimg.strategies.chain import strategy_chain

__all__ = ["capture_strategy_state", "restore_strategy_state"]


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _picklable(value: Any) -> Any:
    """Copy ArrayRecords into plain bytes.

    Arrays received over gRPC hold ``memoryview`` buffers, which cannot be pickled.
    """
    if isinstance(value, ArrayRecord):
        return ArrayRecord(
            {key: Array(np.array(array.numpy())) for key, array in value.items()}
        )
    return value


def capture_strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """Return the attributes of each strategy in the chain (picklable values).

    ArrayRecords are copied (see :func:`_picklable`); functions and the wrapped
    strategies are left out.

    Returns
    -------
    list[dict]
        One ``{"class": ..., "attributes": {...}}`` per level, outermost first.
    """
    return [
        {
            "class": _class_name(level),
            "attributes": {
                name: _picklable(value)
                for name, value in vars(level).items()
                if not callable(value) and not isinstance(value, Strategy)
            },
        }
        for level in strategy_chain(strategy)
    ]


def restore_strategy_state(strategy: Strategy, state: list[dict[str, Any]]) -> None:
    """Set the attributes captured by :func:`capture_strategy_state`.

    Raises
    ------
    ValueError
        If the strategy's chain of classes differs from the captured one.
    """
    chain = strategy_chain(strategy)
    classes = [_class_name(level) for level in chain]
    saved = [level["class"] for level in state]
    if classes != saved:
        raise ValueError(
            f"Cannot resume: the strategy is {' > '.join(classes)}, the saved state "
            f"belongs to {' > '.join(saved)}"
        )
    for level, saved_level in zip(chain, state, strict=True):
        unknown = sorted(set(saved_level["attributes"]) - set(vars(level)))
        if unknown:
            log(WARNING, "flower-medimg: resume ignores unknown attributes %s", unknown)
        for name, value in saved_level["attributes"].items():
            if name in vars(level):
                setattr(level, name, value)

"""Save and restore what a strategy remembers between rounds, field by field.

A resumed run must continue with the strategy's memory: FedAdam's moments ``m_t``
and ``v_t`` (Reddi et al., "Adaptive Federated Optimization", ICLR 2021),
FedAvgM's momentum (Hsu et al., 2019, https://arxiv.org/abs/1909.06335),
FedCostWAvg's remembered losses, FedNova's server momentum, the cyclic strategy's
visiting order and random state, the DP accountants' ledgers. :data:`STATE_FIELDS`
says, per strategy class, which attributes those are and of which kind; nothing
else is saved, and nothing but those kinds can come back: JSON scalars and lists,
and numpy arrays (stored apart, see :mod:`.resume_state`). A class the table does
not know is refused, rather than resumed without its memory.

Attributes that a strategy sets again in every ``configure_train`` (the arrays it
sent, the round's reply outcomes and weights) and its constructor parameters are
not state: the restarted ServerApp builds the same strategy from the same settings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import strategy as flwr
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import (
    DifferentialPrivacyFixedClippingBase,
)
from flwr.serverapp.strategy.fedopt import FedOpt

from flower_medimg.strategies import (
    CyclicIncremental,
    DistanceOutlierSuppression,
    FastFedAvg,
    FastFedMedian,
    FastFedTrimmedAvg,
    FedCostWAvg,
    FedFocus,
    FedNova,
    QualityGate,
)
from flower_medimg.strategies.chain import strategy_chain
from flower_medimg.strategies.compressed import DecompressUpdates
from flower_medimg.strategies.homomorphic import HomomorphicFedAvg
from flower_medimg.strategies.quality import ReplyScreening
from flower_medimg.strategies.secagg import SecAggPlus
from flower_medimg.strategies.user_level_dp import (
    UserLevelDPClientSideFixedClipping,
    UserLevelDPServerSideFixedClipping,
)

__all__ = [
    "STATE_FIELDS",
    "StateField",
    "StrategyStateError",
    "capture_strategy_state",
    "restore_strategy_state",
]


class StrategyStateError(ValueError):
    """A strategy state that does not fit the strategy it is restored into."""


@dataclass(frozen=True)
class StateField:
    """One attribute a strategy remembers between rounds.

    Parameters
    ----------
    path : str
        The attribute, dotted for an attribute of an attribute
        (``user_accountant.num_releases``).
    kind : str
        One of :data:`KINDS`.
    """

    path: str
    kind: str


#: What a field can hold, and how it is stored.
KINDS = {
    "int": "a whole number",
    "float": "a finite number",
    "int-list": "a list of whole numbers",
    "int-float-map": "{whole number: number}, stored as [[key, value], ...]",
    "int-int-map": "{whole number: whole number}, stored as [[key, value], ...]",
    "arrays": "None or {name: numpy array}",
    "array-record": "None or an ArrayRecord",
    "array-list": "None or a list of numpy arrays",
    "random-state": "the state of a random.Random",
    "privacy-accountant": "None or a Flower PrivacyAccountant (its state_dict)",
}

_RELEASES = (StateField("user_accountant.num_releases", "int"),)

#: Every strategy class that can be resumed, with the fields it adds to its bases.
#: A class's state is the union of the fields of the classes in its MRO.
STATE_FIELDS: dict[type, tuple[StateField, ...]] = {
    # Flower's FedAvg family: configuration only
    flwr.FedAvg: (),
    flwr.FedProx: (),
    flwr.FedMedian: (),
    flwr.FedTrimmedAvg: (),
    flwr.Krum: (),
    flwr.MultiKrum: (),
    flwr.Bulyan: (),
    # Flower's FedOpt family: first and second moments
    FedOpt: (StateField("m_t", "arrays"), StateField("v_t", "arrays")),
    flwr.FedAdam: (),
    flwr.FedYogi: (),
    flwr.FedAdagrad: (),
    # FedAvgM keeps the arrays of the previous round itself, and the momentum
    flwr.FedAvgM: (
        StateField("current_arrays", "array-record"),
        StateField("momentum_vector", "array-list"),
    ),
    # ours
    FastFedAvg: (),
    FastFedMedian: (),
    FastFedTrimmedAvg: (),
    DistanceOutlierSuppression: (),
    FedFocus: (),
    FedCostWAvg: (StateField("previous_loss", "int-float-map"),),
    FedNova: (StateField("momentum_buffer", "array-list"),),
    CyclicIncremental: (
        StateField("order", "int-list"),
        StateField("position", "int"),
        StateField("_rng", "random-state"),
    ),
    QualityGate: (),
    # what leaves the sites: stateless between rounds (SecAgg+ keys are per round)
    SecAggPlus: (),
    DecompressUpdates: (),
    HomomorphicFedAvg: (),
    # the statistics phase's per-node bound on num-examples (not collected again
    # on resume)
    ReplyScreening: (StateField("num_examples_bounds", "int-int-map"),),
    # central DP: Flower's accountant ledger, the adapted clipping norm, and our
    # user-level wrappers' count of noisy releases
    DifferentialPrivacyFixedClippingBase: (
        StateField("accountant", "privacy-accountant"),
    ),
    flwr.DifferentialPrivacyServerSideFixedClipping: (),
    flwr.DifferentialPrivacyClientSideFixedClipping: (),
    DifferentialPrivacyAdaptiveBase: (StateField("clipping_norm", "float"),),
    flwr.DifferentialPrivacyServerSideAdaptiveClipping: (),
    flwr.DifferentialPrivacyClientSideAdaptiveClipping: (),
    UserLevelDPServerSideFixedClipping: _RELEASES,
    UserLevelDPClientSideFixedClipping: _RELEASES,
}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fields(level: Strategy) -> tuple[StateField, ...]:
    """Return one strategy's state fields (refused if the table lacks its class)."""
    cls = type(level)
    if cls not in STATE_FIELDS:
        raise StrategyStateError(
            f"Cannot save or resume the state of {_class_name(cls)}: its fields are "
            "not described in flower_medimg.lifecycle.strategy_state.STATE_FIELDS"
        )
    seen: dict[str, StateField] = {}
    for klass in reversed(cls.__mro__):
        for field in STATE_FIELDS.get(klass, ()):
            seen[field.path] = field
    return tuple(seen.values())


def _get(level: Strategy, path: str) -> Any:
    value: Any = level
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _set(level: Strategy, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    owner: Any = level
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, value)


def _array_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}/{index}" for index in range(count)]


def _encode(value: Any, kind: str, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """Return the JSON form of ``value``; its arrays go into ``arrays``."""
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "int-list":
        return [int(v) for v in value]
    if kind == "int-float-map":
        return [[int(k), float(v)] for k, v in value.items()]
    if kind == "int-int-map":
        return [[int(k), int(v)] for k, v in value.items()]
    if kind == "random-state":
        version, internal, gauss = value.getstate()
        return [version, list(internal), gauss]
    if kind == "privacy-accountant":
        return None if value is None else value.state_dict()
    if value is None:  # the array kinds
        return None
    if kind == "array-record":
        value = {k: a.numpy() for k, a in value.items()}
    if kind == "array-list":
        value = dict(enumerate(value))
    names = _array_names(prefix, len(value))
    arrays.update(
        (name, np.array(a)) for name, a in zip(names, value.values(), strict=True)
    )
    keys = [str(k) for k in value]
    return {"count": len(keys)} if kind == "array-list" else {"keys": keys}


def capture_strategy_state(
    strategy: Strategy,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Return the state of each strategy in the chain: JSON and arrays.

    Returns
    -------
    tuple[list[dict], dict[str, np.ndarray]]
        One ``{"class": ..., "fields": {path: json}}`` per level, outermost first,
        and the fields' arrays by name (``strategy/<level>/<path>/<index>``).

    Raises
    ------
    StrategyStateError
        For a strategy class that :data:`STATE_FIELDS` does not describe.
    """
    levels, arrays = [], {}
    for index, level in enumerate(strategy_chain(strategy)):
        fields = {
            field.path: _encode(
                _get(level, field.path),
                field.kind,
                f"strategy/{index}/{field.path}",
                arrays,
            )
            for field in _fields(level)
        }
        levels.append({"class": _class_name(type(level)), "fields": fields})
    return levels, arrays


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (_whole(value) or isinstance(value, float)) and math.isfinite(value)


def _random_state(value: Any) -> tuple | None:
    """Return the ``random.Random`` state in ``value``, if it is one (version 3)."""
    if not (isinstance(value, list) and len(value) == 3 and value[0] == 3):
        return None
    _, internal, gauss = value
    if not (
        isinstance(internal, list)
        and len(internal) == 625
        and all(_whole(v) and 0 <= v < 2**32 for v in internal[:624])
        and _whole(internal[624])
        and 0 <= internal[624] <= 624
    ):
        return None
    if gauss is not None and not _number(gauss):
        return None
    return (3, tuple(internal), gauss)


# pylint: disable-next=too-many-return-statements,too-many-branches
def _decode(
    current: Any, kind: str, saved: Any, prefix: str, arrays: Mapping[str, np.ndarray]
) -> tuple[bool, Any]:
    """Return ``(valid, value)`` for a saved field (``current``: the fresh value)."""
    if kind == "int":
        return _whole(saved), saved
    if kind == "float":
        return _number(saved), float(saved) if _number(saved) else None
    if kind == "int-list":
        return isinstance(saved, list) and all(_whole(v) for v in saved), saved
    if kind == "int-float-map":
        valid = isinstance(saved, list) and all(
            isinstance(p, list) and len(p) == 2 and _whole(p[0]) and _number(p[1])
            for p in saved
        )
        return valid, {k: float(v) for k, v in saved} if valid else None
    if kind == "int-int-map":
        valid = isinstance(saved, list) and all(
            isinstance(p, list) and len(p) == 2 and _whole(p[0]) and _whole(p[1])
            for p in saved
        )
        return valid, {k: v for k, v in saved} if valid else None
    if kind == "random-state":
        state = _random_state(saved)
        if state is None:
            return False, None
        rng = random.Random()
        rng.setstate(state)
        return True, rng
    if kind == "privacy-accountant":
        if saved is None or current is None:
            return saved is None and current is None, current
        try:
            current.load_state_dict(saved)
        except (ValueError, TypeError, KeyError, AttributeError):
            return False, None
        return True, current
    if saved is None:
        return True, None
    count = saved.get("count") if isinstance(saved, dict) else None
    keys = saved.get("keys") if isinstance(saved, dict) else None
    if kind == "array-list" and _whole(count) and count >= 0:
        keys = list(range(count))
    if not isinstance(keys, list) or (
        kind != "array-list" and not all(isinstance(k, str) for k in keys)
    ):
        return False, None
    names = _array_names(prefix, len(keys))
    if not all(name in arrays for name in names):
        return False, None
    values = [arrays[name] for name in names]
    if kind == "array-list":
        return True, values
    if kind == "array-record":
        return True, ArrayRecord(
            {k: Array(v) for k, v in zip(keys, values, strict=True)}
        )
    return True, dict(zip(keys, values, strict=True))


def restore_strategy_state(
    strategy: Strategy,
    state: Any,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Set the fields captured by :func:`capture_strategy_state` on ``strategy``.

    Every field is checked against its kind before any is set (a Flower privacy
    accountant checks and loads its own ledger), so a state that does not fit
    leaves the strategy as it was built.

    Raises
    ------
    StrategyStateError
        If the chain of classes differs from the saved one, a field is missing,
        unknown or of the wrong kind, or an array is missing.
    """
    chain = strategy_chain(strategy)
    classes = [_class_name(type(level)) for level in chain]
    if not isinstance(state, list) or not all(
        isinstance(level, dict) and isinstance(level.get("fields"), dict)
        for level in state
    ):
        raise StrategyStateError("Cannot resume: the strategy state is malformed")
    saved = [level.get("class") for level in state]
    if classes != saved:
        raise StrategyStateError(
            f"Cannot resume: the strategy is {' > '.join(classes)}, the saved state "
            f"belongs to {' > '.join(map(str, saved))}"
        )
    updates = []
    for index, (level, saved_level) in enumerate(zip(chain, state, strict=True)):
        fields = {field.path: field for field in _fields(level)}
        if set(saved_level["fields"]) != set(fields):
            raise StrategyStateError(
                f"Cannot resume {classes[index]}: the saved fields are "
                f"{sorted(saved_level['fields'])}, expected {sorted(fields)}"
            )
        for path, field in fields.items():
            valid, value = _decode(
                _get(level, path),
                field.kind,
                saved_level["fields"][path],
                f"strategy/{index}/{path}",
                arrays,
            )
            if not valid:
                raise StrategyStateError(
                    f"Cannot resume {classes[index]}: field {path} is not "
                    f"{KINDS[field.kind]}"
                )
            updates.append((level, path, value))
    for level, path, value in updates:
        _set(level, path, value)

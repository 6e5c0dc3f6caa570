"""The resume state: JSON and numpy arrays in one safetensors file, never a pickle.

What a restarted ServerApp needs to continue after a round: the round, the
strategy's fields (:mod:`.strategy_state`), the stop rule, the best model, the
per-site metrics and Flower's metric history, and the stop decision if one was
made. It is one `safetensors <https://huggingface.co/docs/safetensors>`_ file: the
strategy's arrays as tensors, everything else as a JSON document in the header's
``__metadata__``. Reading it parses JSON and raw array bytes only, and the registry
checks the file's SHA-256 against its signed record first (:mod:`.registry`);
:meth:`ResumeState.from_bytes` still checks every field's type, so a state that
does not fit is refused with the field named.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from .stopping import RESULT_ATTRIBUTES, StopDecision

__all__ = ["FORMAT", "ResumeState", "ResumeStateError"]

#: The ``format`` entry of the file's metadata.
FORMAT = "flower-medimg resume state 1"


class ResumeStateError(ValueError):
    """A resume state that is not one, or whose fields have the wrong types."""


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


def _number(value: Any) -> bool:
    return _whole(value) or isinstance(value, float)


def _metric_value(value: Any) -> bool:
    return _number(value) or (
        isinstance(value, list) and all(_number(v) for v in value)
    )


def _rounds(value: Any, check: Any) -> dict[int, Any]:
    """``{"3": x}`` -> ``{3: x}`` after checking each ``x``."""
    if not isinstance(value, dict):
        raise ResumeStateError("expected an object of rounds")
    rounds = {}
    for key, entry in value.items():
        if not (isinstance(key, str) and key.isdigit()) or not check(entry):
            raise ResumeStateError(f"round {key!r} is malformed")
        rounds[int(key)] = entry
    return rounds


def _metric_record(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _metric_value(v) for k, v in value.items()
    )


def _progress(value: Any, keys: tuple[str, ...]) -> bool:
    """Check a stop rule's or best model's state: best value, its round, a count."""
    checks = {
        "best": _optional(_number),
        "best-round": _optional(_whole),
        "stale-rounds": _whole,
    }
    return (
        isinstance(value, dict)
        and set(value) == set(keys)
        and all(checks[k](value[k]) for k in keys)
    )


@dataclass
class ResumeState:
    """Everything a restarted ServerApp needs to continue after ``round``.

    Attributes
    ----------
    round : int
        The last round that was recorded.
    strategy : list[dict]
        The strategy's fields (:func:`~.strategy_state.capture_strategy_state`).
    strategy_arrays : dict[str, np.ndarray]
        The arrays those fields refer to.
    stop, best : dict
        ``StopRule.state()`` and ``BestModel.state()``.
    best_version : Optional[int]
        Registry version of the best model.
    recorder : dict[int, dict]
        Per-site metrics and wall time by round (``RoundRecorder.rounds``).
    history : dict[str, dict[int, dict]]
        Flower's ``Result`` metric histories: attribute -> round -> metrics.
    decision : Optional[StopDecision]
        The stop decision, if the round made one.
    """

    round: int
    strategy: list[dict[str, Any]]
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    best_version: int | None = None
    recorder: dict[int, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    decision: StopDecision | None = None

    def to_bytes(self) -> bytes:
        """Return the state as a safetensors file."""
        document = {
            "round": self.round,
            "strategy": self.strategy,
            "stop": self.stop,
            "best": self.best,
            "best-version": self.best_version,
            "recorder": self.recorder,
            "history": self.history,
            "decision": None if self.decision is None else vars(self.decision),
        }
        metadata = {"format": FORMAT, "state": json.dumps(document)}
        return safetensors.numpy.save(
            {k: np.ascontiguousarray(v) for k, v in self.strategy_arrays.items()},
            metadata=metadata,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ResumeState:
        """Read a state written by :meth:`to_bytes`, checking every field's type.

        Raises
        ------
        ResumeStateError
            If ``data`` is no resume state, or a field is missing or malformed (the
            message names it).
        """
        document = _document(data)
        try:
            arrays = safetensors.numpy.load(data)
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ResumeStateError(f"the arrays cannot be read ({err})") from None
        checks = {
            "round": _whole,
            "strategy": lambda v: isinstance(v, list),
            "stop": lambda v: _progress(v, ("best", "best-round", "stale-rounds")),
            "best": lambda v: _progress(v, ("best", "best-round")),
            "best-version": _optional(_whole),
            "recorder": lambda v: isinstance(v, dict),
            "history": lambda v: (
                isinstance(v, dict) and set(v) <= set(RESULT_ATTRIBUTES.values())
            ),
            "decision": _optional(_decision),
        }
        if set(document) != set(checks):
            raise ResumeStateError(
                f"the state's fields are {sorted(document)}, expected {sorted(checks)}"
            )
        for name, check in checks.items():
            if not check(document[name]):
                raise ResumeStateError(f"field {name!r} is malformed")
        decision = document["decision"]
        return cls(
            round=document["round"],
            strategy=document["strategy"],
            strategy_arrays=arrays,
            stop=document["stop"],
            best=document["best"],
            best_version=document["best-version"],
            recorder=_rounds(document["recorder"], lambda e: isinstance(e, dict)),
            history={
                attribute: _rounds(rounds, _metric_record)
                for attribute, rounds in document["history"].items()
            },
            decision=None if decision is None else StopDecision(**decision),
        )


def _decision(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"round", "reason", "message"}
        and _whole(value["round"])
        and isinstance(value["reason"], str)
        and isinstance(value["message"], str)
    )


def _document(data: bytes) -> Mapping[str, Any]:
    """Return the JSON document in a safetensors file's ``__metadata__``.

    The header is an 8-byte little-endian length and that many bytes of JSON.
    """
    if len(data) < 8:
        raise ResumeStateError("not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ResumeStateError("not a safetensors file (header length too large)")
    try:
        header = json.loads(data[8 : 8 + length])
        metadata = header["__metadata__"]
        if metadata["format"] != FORMAT:
            raise ResumeStateError(f"format {metadata['format']!r}, not {FORMAT!r}")
        document = json.loads(metadata["state"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResumeStateError(f"no resume state in the file ({err!r})") from None
    if not isinstance(document, dict):
        raise ResumeStateError("the state is not a JSON object")
    return document

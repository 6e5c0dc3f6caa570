"""Hash chains of JSON lines: the tamper evidence of the server's and the sites' logs.

Every line is one JSON object whose ``prev`` is the previous line's ``hash`` (64
zeros for the first line) and whose ``hash`` is the SHA-256 of the line's canonical
JSON without ``hash`` and ``sig`` (keys sorted, no spaces). A changed, removed or
inserted line breaks the chain for anyone who did not recompute it (Haber and
Stornetta, "How to time-stamp a digital document", J. Cryptology 1991,
https://doi.org/10.1007/BF00196791).
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any

__all__ = ["GENESIS", "canonical_json", "chained_entry", "jsonable", "line_hash"]

#: ``prev`` of the first line.
GENESIS = "0" * 64


def jsonable(value: Any) -> Any:
    """Make ``value`` strict JSON (non-finite floats become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def canonical_json(entry: dict[str, Any]) -> bytes:
    """Return ``entry`` as canonical JSON bytes (sorted keys, no spaces)."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def line_hash(entry: dict[str, Any]) -> str:
    """Return the SHA-256 of an entry's canonical JSON without ``hash`` and ``sig``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def chained_entry(
    event: str, fields: dict[str, Any], seq: int, prev: str
) -> dict[str, Any]:
    """Return the next line of a chain, ``hash`` included.

    ``fields`` (made strict JSON) plus ``seq``, ``time`` (UTC, ISO 8601), ``event``
    and ``prev``, the hash of the chain's current head.
    """
    entry = jsonable(fields)
    entry.update(seq=seq, time=datetime.now(UTC).isoformat(), event=event, prev=prev)
    entry["hash"] = line_hash(entry)
    return entry

"""Append-only, hash-chained JSON-lines audit log.

Every line is one JSON object with the event's fields plus ``seq`` (0, 1, ...),
``time`` (UTC, ISO 8601), ``prev`` (the previous line's ``hash``; 64 zeros for the
first line) and ``hash``: the SHA-256 of the line's canonical JSON without the
``hash`` field (keys sorted, no spaces). Changing any byte of a line breaks that
line's own hash (or its canonical form); removing or re-hashing a line breaks the
next line's ``prev``.
:func:`verify_audit_log` reports the first line where either happens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["GENESIS", "AuditLog", "AuditVerification", "line_hash", "verify_audit_log"]

#: ``prev`` of the first line.
GENESIS = "0" * 64


def _jsonable(value: Any) -> Any:
    """Make ``value`` strict JSON (non-finite floats become strings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), allow_nan=False
    ).encode()


def line_hash(entry: dict[str, Any]) -> str:
    """Return the SHA-256 of an entry's canonical JSON, its ``hash`` field left out."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


class AuditLog:
    """Append events to a run's hash-chained audit log.

    Opening an existing file continues its chain (after checking that it verifies).

    Parameters
    ----------
    path : str or Path
        The JSON-lines file (created with its folder if missing).

    Raises
    ------
    ValueError
        If an existing file does not verify (the message names the line).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head = GENESIS
        self.seq = 0
        if self.path.exists():
            check = verify_audit_log(self.path)
            if not check.ok:
                raise ValueError(f"Audit log {self.path} is corrupt: {check.message}")
            self.head, self.seq = check.head, check.num_lines

    def append(self, event: str, **fields: Any) -> str:
        """Append one event; return its hash (the new head of the chain)."""
        entry = _jsonable(fields)
        entry.update(
            seq=self.seq,
            time=datetime.now(UTC).isoformat(),
            event=event,
            prev=self.head,
        )
        entry["hash"] = line_hash(entry)
        with self.path.open("ab") as handle:
            handle.write(_canonical(entry) + b"\n")
        self.head, self.seq = entry["hash"], self.seq + 1
        return self.head


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :func:`verify_audit_log`.

    Attributes
    ----------
    ok : bool
        Whether every line verifies.
    num_lines : int
        Lines read (up to and including the first bad one).
    head : str
        Hash of the last good line.
    bad_line : Optional[int]
        1-based number of the first line that fails, if any.
    message : str
        What was found.
    """

    ok: bool
    num_lines: int
    head: str
    bad_line: int | None
    message: str


def _line_problem(raw: bytes, number: int, head: str) -> str | None:
    """Return why line ``number`` does not continue the chain at ``head``."""
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not valid JSON ({err})"
    if not isinstance(entry, dict) or "hash" not in entry:
        return "not an audit entry (no 'hash')"
    if entry["hash"] != line_hash(entry) or raw.rstrip(b"\n") != _canonical(entry):
        return "content does not match its hash (the line was changed)"
    if entry.get("prev") != head:
        return (
            "'prev' does not match the previous line's hash (a line before it was "
            "removed, inserted or re-hashed)"
        )
    if entry.get("seq") != number - 1:
        return f"seq is {entry.get('seq')}, expected {number - 1}"
    return None


def verify_audit_log(path: str | Path) -> AuditVerification:
    """Check the hash chain of an audit log and report the first tampered line.

    Parameters
    ----------
    path : str or Path
        The JSON-lines file.

    Returns
    -------
    AuditVerification
        ``ok`` and the number of lines, or the first bad line and why.
    """
    head, count = GENESIS, 0
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            count = number
            problem = _line_problem(raw, number, head)
            if problem is not None:
                return AuditVerification(
                    False, count, head, number, f"line {number}: {problem}"
                )
            head = json.loads(raw)["hash"]
    return AuditVerification(True, count, head, None, f"{count} lines verified")

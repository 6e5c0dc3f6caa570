"""Append-only, hash-chained and signed JSON-lines audit log, anchored in the registry.

Every line is one JSON object with the event's fields plus ``seq`` (0, 1, ...),
``time`` (UTC, ISO 8601), ``prev`` (the previous line's ``hash``; 64 zeros for the
first line), ``hash`` (the SHA-256 of the line's canonical JSON without ``hash`` and
``sig``: keys sorted, no spaces) and ``sig``, the server key's Ed25519 signature of
``hash`` (:mod:`.integrity`). A chain alone (Haber and Stornetta, "How to
time-stamp a digital document", J. Cryptology 1991) shows a change only to someone
who did not recompute it; the signature makes a re-chained, inserted or appended
line fail without the private key.

What a signature cannot show, the log's shape and the registry do:

- the first line is the run's ``run-start`` (an emptied log or a cut-off head fail);
- a finished run's log ends with its ``run-end`` line, and nothing follows it;
- the registry records the head of the chain (the hash and number of the latest
  line) with every model version and when the run finishes, so a log cut back to
  an earlier line, or swapped for another run's log, no longer matches the registry.

:func:`verify_audit_log` reports ``ok``, ``incomplete`` (every line verifies but the
run never wrote its ``run-end``: the ServerApp stopped, and the registry agrees) or
``tampered`` with the first line that fails and why.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_medimg.core.chain import GENESIS, canonical_json, chained_entry, line_hash

from .integrity import ServerKey, VerifyKey

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditVerification",
    "line_hash",
    "verify_audit_log",
]

#: The events that open and close a run's log.
RUN_START, RUN_END = "run-start", "run-end"


class AuditLog:
    """Append signed events to a run's hash-chained audit log.

    Opening an existing file continues its chain, after checking that every line
    verifies with ``key``.

    Parameters
    ----------
    path : str or Path
        The JSON-lines file (created with its folder if missing).
    key : ServerKey
        The server key that signs every line.

    Raises
    ------
    ValueError
        If an existing file does not verify (the message names the line).
    """

    def __init__(self, path: str | Path, key: ServerKey) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head = GENESIS
        self.seq = 0
        if self.path.exists() and self.path.stat().st_size > 0:
            check = verify_audit_log(self.path, key, anchors=False)
            if check.status == "tampered":
                raise ValueError(f"Audit log {self.path} is corrupt: {check.message}")
            self.head, self.seq = check.head, check.num_lines

    def append(self, event: str, **fields: Any) -> str:
        """Append one event; return its hash (the new head of the chain).

        A line that does not fit (a full disk) is cut off again, so the log stays
        verifiable, and the ``OSError`` is raised naming the file.
        """
        entry = chained_entry(event, fields, self.seq, self.head)
        entry["sig"] = self.key.sign(entry["hash"].encode())
        line = canonical_json(entry) + b"\n"
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(handle).st_size
            try:
                written = os.write(handle, line)
                if written != len(line):
                    raise OSError(f"wrote {written} of {len(line)} bytes")
            except OSError as err:
                os.ftruncate(handle, size)
                raise OSError(
                    err.errno, f"Cannot append to the audit log: {err}", str(self.path)
                ) from None
        finally:
            os.close(handle)
        self.head, self.seq = entry["hash"], self.seq + 1
        return self.head


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :func:`verify_audit_log`.

    Attributes
    ----------
    status : str
        ``"ok"``, ``"incomplete"`` (authentic, but the run never ended) or
        ``"tampered"``.
    num_lines : int
        Lines read (up to and including the first bad one).
    head : str
        Hash of the last good line.
    bad_line : Optional[int]
        1-based number of the first line that fails, if any.
    message : str
        What was found.
    """

    status: str
    num_lines: int
    head: str
    bad_line: int | None
    message: str

    @property
    def ok(self) -> bool:
        """Whether the log is complete and every line verifies."""
        return self.status == "ok"


def _line_problem(
    raw: bytes, number: int, head: str, key: VerifyKey
) -> tuple[str | None, dict[str, Any]]:
    """Return why line ``number`` does not continue the chain at ``head``."""
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"not valid JSON ({err})", {}
    if not isinstance(entry, dict) or "hash" not in entry or "sig" not in entry:
        return "not a signed audit entry (no 'hash' or 'sig')", {}
    if entry["hash"] != line_hash(entry) or raw.rstrip(b"\n") != canonical_json(entry):
        return "content does not match its hash (the line was changed)", entry
    if entry.get("prev") != head:
        return (
            "'prev' does not match the previous line's hash (a line before it was "
            "removed, inserted or moved)"
        ), entry
    if entry.get("seq") != number - 1:
        return f"seq is {entry.get('seq')}, expected {number - 1}", entry
    if not isinstance(entry["sig"], str) or not key.verify(
        entry["hash"].encode(), entry["sig"]
    ):
        return (
            f"signature does not verify with the server key {key.fingerprint} "
            f"({key.source}): the line was forged or re-chained"
        ), entry
    return None, entry


def _registry_anchor(start: dict[str, Any], key: VerifyKey) -> tuple[dict, str]:
    """Return the registry's latest anchor of this run's log and the registry file.

    The anchor is ``{"lines": n, "head": hash, "finished": bool}`` (empty if the run
    has no registry, or its registry is not on this machine).

    Raises
    ------
    ValueError
        If the registry's record of the run does not verify.
    """
    from .registry import DB_NAME, ModelRegistry, RegistryError  # the registry's API

    folder, run = start.get("registry"), start.get("registry_run")
    if not isinstance(folder, str) or not isinstance(run, int):
        return {}, ""
    database = Path(folder) / DB_NAME
    if not database.is_file():
        return {}, str(database)
    try:
        registry = ModelRegistry(folder, key, read_only=True)
    except (RegistryError, sqlite3.Error) as err:
        raise ValueError(str(err)) from None
    try:
        return registry.audit_anchor(run), str(database)
    except RegistryError as err:
        raise ValueError(str(err)) from None
    finally:
        registry.close()


def _tampered(
    count: int, head: str, line: int | None, message: str
) -> AuditVerification:
    return AuditVerification("tampered", count, head, line, message)


def verify_audit_log(
    path: str | Path, key: VerifyKey, *, anchors: bool = True
) -> AuditVerification:
    """Check a run's audit log: chain, signatures, shape and the registry's anchor.

    Parameters
    ----------
    path : str or Path
        The JSON-lines file.
    key : VerifyKey
        The server's public key (or the private key itself).
    anchors : bool
        Compare the end of the log with the head the run's registry recorded (the
        registry named in the ``run-start`` line, when it is on this machine).

    Returns
    -------
    AuditVerification
        ``ok``, ``incomplete`` or ``tampered`` with the first bad line and why.
    """
    head, count, events, hashes = GENESIS, 0, [], []
    start: dict[str, Any] = {}
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            count = number
            problem, entry = _line_problem(raw, number, head, key)
            if problem is None and number == 1 and entry.get("event") != RUN_START:
                problem = f"the first line is {entry.get('event')!r}, not {RUN_START}"
            if problem is None and events and events[-1] == RUN_END:
                problem = f"a line after the {RUN_END} line (appended)"
            if problem is not None:
                return _tampered(count, head, number, f"line {number}: {problem}")
            start = start or entry
            head = entry["hash"]
            events.append(entry.get("event"))
            hashes.append(head)
    if count == 0:
        return _tampered(0, head, None, f"the log is empty (no {RUN_START} line)")
    anchor, database = {}, ""
    if anchors:
        try:
            anchor, database = _registry_anchor(start, key)
        except ValueError as err:
            return _tampered(count, head, None, f"the registry refuses: {err}")
    found = f"{count} lines verified"
    if anchor:
        lines, anchored = anchor["lines"], anchor["head"]
        if lines > count:
            return _tampered(
                count,
                head,
                None,
                f"{found}, but the registry ({database}) records {lines} lines: "
                "the log was truncated",
            )
        if lines and hashes[lines - 1] != anchored:
            return _tampered(
                count,
                head,
                lines,
                f"line {lines} is not the one the registry ({database}) records "
                f"(head {anchored[:16]}): the log was replaced",
            )
        if anchor["finished"] and (lines != count or events[-1] != RUN_END):
            return _tampered(
                count,
                head,
                None,
                f"{found}, but the registry records the run's end at line {lines}",
            )
        found += f", head matches the registry ({database}, line {lines})"
    elif anchors and database:
        found += f"; no registry at {database} to compare the head with"
    if events[-1] != RUN_END:
        return AuditVerification(
            "incomplete",
            count,
            head,
            None,
            f"{found}; no {RUN_END} line: the run stopped after line {count} "
            "(the ServerApp was ended, or resumed elsewhere)",
        )
    return AuditVerification("ok", count, head, None, found)

"""The site's own audit log: what the site approved, revoked, admitted and refused.

A hash-chained JSON-lines file, ``<state-dir>/site-audit.jsonl``, chained as the
server's audit log is (:mod:`flower_medimg.core.chain`): every line has ``seq``,
``time`` (UTC, ISO 8601), ``event``, ``prev`` and ``hash``. The site keeps it for
itself; no key is involved, so it shows a change to anyone who did not recompute
the chain, and :func:`verify_chain` names the first line that breaks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flower_medimg.core.chain import GENESIS, canonical_json, chained_entry, line_hash

__all__ = ["SITE_AUDIT_LOG", "ChainedLog", "site_audit_log", "verify_chain"]

#: File name in the site's ``state-dir``.
SITE_AUDIT_LOG = "site-audit.jsonl"


def verify_chain(path: str | Path) -> tuple[str | None, str, int]:
    """Check the chain of a site's chained log (its audit log or privacy ledger).

    Parameters
    ----------
    path : str or Path
        The JSON-lines file (a missing file is an empty log).

    Returns
    -------
    tuple
        ``(problem, head, num_lines)``: ``problem`` is ``None`` or names the first
        line that breaks the chain; ``head`` is the last good line's hash.
    """
    head, seq = GENESIS, 0
    path = Path(path)
    if not path.exists():
        return None, head, 0
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(raw)
        except ValueError:
            return f"line {number}: not JSON", head, seq
        if not isinstance(entry, dict):
            return f"line {number}: not a JSON object", head, seq
        if entry.get("prev") != head or entry.get("seq") != seq:
            return f"line {number}: does not follow line {number - 1}", head, seq
        if entry.get("hash") != line_hash(entry):
            return f"line {number}: its hash does not match its content", head, seq
        head, seq = entry["hash"], seq + 1
    return None, head, seq


class ChainedLog:
    """Append events to a hash-chained JSON-lines file of the site.

    Parameters
    ----------
    path : str or Path
        The file (created 0600 on the first event).

    Raises
    ------
    ValueError
        If the existing file's chain is broken (the message names the line): the
        site's record is not extended past a tampered line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        problem, self.head, self.seq = verify_chain(self.path)
        if problem:
            raise ValueError(f"{self.path} is broken: {problem}")

    def entries(self) -> list[dict[str, Any]]:
        """Return every event, oldest first (the chain was checked on opening)."""
        if not self.path.exists():
            return []
        return [json.loads(raw) for raw in self.path.read_bytes().splitlines()]

    def append(self, event: str, **fields: Any) -> str:
        """Append one event; return its hash (the new head of the chain)."""
        entry = chained_entry(event, fields, self.seq, self.head)
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(handle, canonical_json(entry) + b"\n")
        finally:
            os.close(handle)
        self.head, self.seq = entry["hash"], self.seq + 1
        return self.head


def site_audit_log(state_dir: str | Path) -> ChainedLog:
    """Open the audit log of the site whose state folder is ``state_dir``."""
    return ChainedLog(Path(state_dir) / SITE_AUDIT_LOG)

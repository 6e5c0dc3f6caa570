"""The apps a site approved, by the SHA-256 of their FAB (Flower App Bundle).

Flower identifies the code of a run by its FAB's hash (``Fab.hash_str``, the SHA-256
of the FAB's bytes); ``flwr build`` and ``flwr run`` build a FAB deterministically
from an app folder, so one changed byte is a different hash. The site's list is
``<state-dir>/approvals.json``; the warm site runtime reads it for every message and
runs a message only if its FAB's hash is on it (:mod:`flower_medimg.site.admission`).

``approve`` takes a FAB file, an app folder (built the way ``flwr run`` builds it) or
a hash; ``revoke`` takes a hash. Both land in the site's audit log.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flower_medimg.core.private_files import private_dir, write_private
from flower_medimg.site.audit import site_audit_log

__all__ = [
    "APPROVALS_FILE",
    "ApprovalError",
    "app_hash",
    "approve",
    "read_approvals",
    "revoke",
]

#: File name in the site's ``state-dir``.
APPROVALS_FILE = "approvals.json"
_HASH = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(ValueError):
    """An approval that cannot be made or read; the message names the culprit."""


def app_hash(target: str | Path) -> tuple[str, str]:
    """Return the FAB hash of a FAB file, an app folder or a hash, and a description.

    Parameters
    ----------
    target : str or Path
        A ``.fab`` file, a Flower app folder (with ``pyproject.toml``), or a
        64-digit hexadecimal SHA-256.

    Returns
    -------
    tuple of str
        ``(hash, what)`` where ``what`` says where the hash came from.

    Raises
    ------
    ApprovalError
        If ``target`` is none of these.
    """
    text = str(target)
    if _HASH.match(text.lower()) and not Path(text).exists():
        return text.lower(), "hash"
    path = Path(text).expanduser()
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        try:
            content = build_fab_from_disk(path.resolve())
        except Exception as err:  # noqa: BLE001 - Flower's own checks of the app
            raise ApprovalError(f"cannot build a FAB from {path}: {err}") from err
        return hashlib.sha256(content).hexdigest(), f"app folder {path.resolve()}"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest(), f"FAB file {path}"
    raise ApprovalError(
        f"{text!r} is neither a FAB file, an app folder nor a 64-digit SHA-256 hash"
    )


def read_approvals(state_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Return the site's approvals, ``{hash: {"source": ..., "approved": ...}}``.

    Raises
    ------
    ApprovalError
        If the file exists but is not a valid approvals file (the site then runs
        nothing until it is fixed).
    """
    path = Path(state_dir) / APPROVALS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ApprovalError(f"approvals file {path} cannot be read: {err}") from err
    if not isinstance(raw, dict) or not all(
        isinstance(key, str) and _HASH.match(key) and isinstance(value, dict)
        for key, value in raw.items()
    ):
        raise ApprovalError(
            f"approvals file {path}: expected {{<sha256>: {{...}}}} entries"
        )
    return raw


def _write(state_dir: Path, approvals: dict[str, dict[str, Any]]) -> None:
    private_dir(state_dir)
    content = json.dumps(approvals, indent=2, sort_keys=True) + "\n"
    write_private(state_dir / APPROVALS_FILE, content.encode())


def approve(state_dir: str | Path, target: str | Path, note: str = "") -> str:
    """Approve an app at the site; return its hash.

    Parameters
    ----------
    state_dir : str or Path
        The site's state folder.
    target : str or Path
        What :func:`app_hash` accepts.
    note : str
        Free text kept with the approval (who, why).
    """
    state_dir = Path(state_dir)
    digest, source = app_hash(target)
    approvals = read_approvals(state_dir)
    approvals[digest] = {
        "source": source,
        "note": note,
        "approved": datetime.now(UTC).isoformat(),
    }
    _write(state_dir, approvals)
    site_audit_log(state_dir).append(
        "approve", fab_hash=digest, source=source, note=note
    )
    return digest


def revoke(state_dir: str | Path, digest: str) -> bool:
    """Withdraw an approval; return whether the hash was approved."""
    state_dir = Path(state_dir)
    digest = digest.lower()
    approvals = read_approvals(state_dir)
    found = approvals.pop(digest, None) is not None
    _write(state_dir, approvals)
    site_audit_log(state_dir).append("revoke", fab_hash=digest, was_approved=found)
    return found

"""Files only their owner may read: keys, certificates' keys, site approvals.

Threat model promise 8: a private key is created ``0o600`` from its first byte, never
written world-readable and ``chmod``-ed afterwards (a window in which another local
user could read it), and private folders are ``0o700``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "private_dir", "write_private"]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) and make it ``0o700``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def write_private(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` as a ``0o600`` file, atomically.

    The bytes go to a new temporary file in the same folder, opened with
    ``O_CREAT | O_EXCL`` and mode ``0o600`` (so it is never readable by others,
    whatever the umask), which then replaces ``path``: a reader sees the old file or
    the complete new one.

    Parameters
    ----------
    path : str or Path
        Destination; its folder must exist.
    data : bytes
        The content.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path

"""How long a message waited before its ClientApp could start work.

The site runtime (:mod:`flower_medimg.site`) puts the moment it received a message
in the environment of the process that runs it; without it (Flower's own
per-message ``flwr-clientapp`` process) the process's own start time is used. A
ClientApp reports the difference at the start of its work as ``startup-s``: the
cost of imports, app loading, data and model set-up per message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["MESSAGE_RECEIVED_AT", "received_at", "startup_seconds"]

#: Environment variable: wall-clock time (``time.time()``) the message was received.
MESSAGE_RECEIVED_AT = "FLOWER_MEDIMG_MESSAGE_RECEIVED_AT"


def _process_start_time() -> float | None:
    """Wall-clock start time of this process (Linux ``/proc``), else ``None``."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        now = time.time()
    except (OSError, IndexError, ValueError):
        return None
    # field 22 of /proc/<pid>/stat (index 19 after the command name): start time
    # in clock ticks since boot
    started_after_boot = float(fields[19]) / os.sysconf("SC_CLK_TCK")
    return now - (uptime - started_after_boot)


def received_at() -> float | None:
    """When the current message reached the site (see the module docstring)."""
    value = os.environ.get(MESSAGE_RECEIVED_AT)
    if value is None:
        return _process_start_time()
    try:
        return float(value)
    except ValueError:
        return None


def startup_seconds() -> float | None:
    """Seconds since the current message reached the site, or ``None``."""
    start = received_at()
    return None if start is None else max(0.0, time.time() - start)

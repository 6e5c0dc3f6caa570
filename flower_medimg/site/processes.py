"""Start, find and stop the background processes of a site or a local federation.

Every process is started in its own session (so a Ctrl-C in the terminal that ran
``flower-medimg federation up`` does not reach it) with its output in a log file.
What is needed to stop it again is kept in a :class:`ProcessRecord`: its PID and the
exact command line. Before signalling a PID, :func:`stop_process` checks that the
process with that PID still runs that command line, so a PID that the system has
since given to another program is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessRecord",
    "command_line",
    "free_port",
    "is_running",
    "start_process",
    "stop_process",
    "tool",
    "wait_for_port",
]


@dataclass(frozen=True)
class ProcessRecord:
    """A process started by the launcher.

    Attributes
    ----------
    name : str
        Role in the federation, e.g. ``superlink`` or ``supernode-site-0``.
    pid : int
        Its process id.
    argv : list of str
        The command line it was started with.
    log : str
        The file its standard output and error go to.
    """

    name: str
    pid: int
    argv: list[str]
    log: str

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """Read a record written by :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            argv=[str(a) for a in data["argv"]],
            log=str(data["log"]),
        )


def tool(name: str) -> str:
    """Return the path of a console script installed next to this Python.

    Falls back to the bare name (looked up on ``PATH``) when it is not there.
    """
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_process(
    name: str,
    argv: Sequence[str],
    log: str | Path,
    env: Mapping[str, str],
    cwd: str | Path | None = None,
) -> tuple[ProcessRecord, subprocess.Popen]:
    """Start ``argv`` in the background, writing its output to ``log``.

    Parameters
    ----------
    name : str
        Role of the process (recorded, used in messages).
    argv : Sequence[str]
        Command line; ``argv[0]`` should be an absolute path.
    log : str or Path
        Log file (appended to).
    env : Mapping[str, str]
        The complete environment of the process.
    cwd : str or Path, optional
        Working directory.

    Returns
    -------
    tuple
        The record to keep, and the ``Popen`` handle (useful to reap the process
        when the caller lives as long as it does).
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        proc = subprocess.Popen(  # noqa: S603 - argv built by the launcher
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ProcessRecord(name, proc.pid, list(argv), str(log)), proc


def command_line(pid: int) -> list[str] | None:
    """Return the command line of a live process, or ``None`` if there is none.

    A zombie (exited, not yet reaped) or exiting process counts as not running.
    """
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        # an exiting process (or a kernel thread) has an empty command line
        parts = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
        return parts or None
    if sys.platform.startswith("linux"):
        return None
    found = subprocess.run(  # macOS and other systems without /proc
        ["ps", "-o", "stat=,command=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    line = found.stdout.strip()
    if found.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split()[1:]


def _matches(record: ProcessRecord, cmdline: Sequence[str]) -> bool:
    """Whether ``cmdline`` is the command ``record`` was started with.

    A console script runs as ``python <script> args...``, so the recorded program
    may appear as the first or second word; the arguments must follow it exactly.
    nginx rewrites its command line into one title that ends with it.
    """
    program, args = record.argv[0], record.argv[1:]
    if len(cmdline) == 1 and cmdline[0].endswith(" " + " ".join(record.argv)):
        return True  # a title set by the program: "nginx: master process <argv>"
    for start in (0, 1):
        if len(cmdline) < start + 1 + len(args):
            continue
        word = cmdline[start]
        same_program = word == program or Path(word).name == Path(program).name
        if same_program and list(cmdline[start + 1 :]) == args:
            return True
    return False


def is_running(record: ProcessRecord) -> bool:
    """Whether the recorded process still runs (same PID, same command line).

    An exited child of this process is reaped here, so that Flower's helper
    processes, which watch their parent's PID, see it gone.
    """
    _reap(record.pid)
    cmdline = command_line(record.pid)
    return cmdline is not None and _matches(record, cmdline)


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is a child of this process."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_process(record: ProcessRecord, grace: float = 10.0) -> str:
    """Stop a recorded process: SIGTERM, then SIGKILL after ``grace`` seconds.

    Parameters
    ----------
    record : ProcessRecord
        The process to stop.
    grace : float, optional
        Seconds to wait for a clean exit after SIGTERM.

    Returns
    -------
    str
        What happened: ``"not running"``, ``"pid reused"`` (nothing was signalled),
        ``"terminated"`` or ``"killed"``.
    """
    _reap(record.pid)
    cmdline = command_line(record.pid)
    if cmdline is None:
        return "not running"
    if not _matches(record, cmdline):
        return "pid reused"
    _signal(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not is_running(record):
            return "terminated"
        time.sleep(0.1)
    if is_running(record):
        _signal(record.pid, signal.SIGKILL)
        for _ in range(50):
            if not is_running(record):
                break
            time.sleep(0.1)
    return "killed"


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    record: ProcessRecord | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Parameters
    ----------
    host, port
        The address to probe.
    timeout : float
        Seconds to wait at most.
    record : ProcessRecord, optional
        The process that should open the port; if it exits first, give up at once.

    Raises
    ------
    RuntimeError
        If the port does not open in time or the process exits; the message names
        the process and its log file.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
            return
        if record is not None and not is_running(record):
            raise RuntimeError(
                f"{record.name} exited before listening on {host}:{port}; "
                f"see {record.log}"
            )
        time.sleep(0.2)
    where = f"; see {record.log}" if record is not None else ""
    raise RuntimeError(f"Nothing listens on {host}:{port} after {timeout:.0f} s{where}")

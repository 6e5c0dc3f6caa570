"""The site runtime's two processes: a supervisor and the warm worker it restarts.

``python -m flower_medimg.site.supervisor supervise ...`` starts the worker
(``... work ...``) and starts it again whenever it dies (1 s, doubling to 30 s
while it keeps dying within a minute of its start). On SIGTERM or SIGINT the
supervisor stops the worker (SIGTERM, then SIGKILL after a grace period), which
stops the message processes it forked. ``<state-dir>/site-runtime/runtime.json``
names the PIDs and counts the restarts; ``flower-medimg site status`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from flower_medimg.site.runtime import RUNTIME_FOLDER, RUNTIME_STATE, read_runtime_state

__all__ = ["main"]

_FAST_FAILURE_S = 60.0
_MAX_DELAY_S = 30.0
_MODULE = "flower_medimg.site.supervisor"


def _write_state(state_dir: Path, **values: object) -> None:
    folder = state_dir / RUNTIME_FOLDER
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / RUNTIME_STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**read_runtime_state(state_dir), **values}))
    tmp.replace(path)


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _say(text: str) -> None:
    print(f"[site-runtime {os.getpid()}] {text}", flush=True)


def supervise(args: argparse.Namespace, worker_argv: list[str]) -> int:
    """Keep one worker running until SIGTERM/SIGINT; return the exit status."""
    state_dir = Path(args.state_dir)
    stop = _stop_event()
    restarts, delay = 0, 1.0
    _write_state(state_dir, supervisor=os.getpid(), restarts=0, worker=None)
    worker: subprocess.Popen | None = None
    while not stop.is_set():
        worker = subprocess.Popen(worker_argv)  # noqa: S603 - our own command
        started = time.monotonic()
        _write_state(state_dir, worker=worker.pid, restarts=restarts)
        while worker.poll() is None and not stop.is_set():
            stop.wait(0.2)
        if stop.is_set():
            break
        quick = time.monotonic() - started < _FAST_FAILURE_S
        delay = min(2 * delay, _MAX_DELAY_S) if quick else 1.0
        restarts += 1
        _say(
            f"worker {worker.pid} exited ({worker.returncode}); restart {restarts} "
            f"in {delay:.0f} s"
        )
        stop.wait(delay)
    if worker is not None and worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(args.grace)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    _write_state(state_dir, worker=None, supervisor=None)
    _say("stopped")
    return 0


def work(args: argparse.Namespace) -> int:
    """Warm up, then serve the SuperNode's ClientApp tasks until told to stop."""
    from flwr.supercore.app_utils import start_parent_process_monitor

    from flower_medimg.site.runtime import SiteRuntime, warm_up

    secret = Path(args.secret_file).read_bytes() if args.secret_file else None
    runtime = SiteRuntime(
        args.runtime_api_address,
        Path(args.state_dir),
        superexec_secret=secret,
        poll_interval=args.poll_interval,
        threads=args.threads,
        policy=Path(args.policy) if args.policy else None,
    )
    stop = _stop_event()
    threading.Thread(
        target=lambda: (stop.wait(), runtime.stopping.set()), daemon=True
    ).start()
    if args.parent_pid:
        start_parent_process_monitor(args.parent_pid)
    _say(f"warm-up {warm_up():.2f} s")
    try:
        runtime.serve()
    finally:
        stop.set()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("supervise", "work"))
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--secret-file", default=None)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--policy", default=None)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--parent-pid", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the supervisor or the worker (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.mode == "work":
        return work(args)
    worker_argv = [sys.executable, "-m", _MODULE, "work", *argv[1:]]
    worker_argv += ["--parent-pid", str(os.getpid())]
    return supervise(args, worker_argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``flower-medimg site start|stop|status``: a hospital's SuperNode and its runtime.

:func:`start_site` starts, from the site's own :mod:`configuration file
<flower_medimg.site.config>`:

* with ``runtime = "warm"``: Flower's SuperNode with ``--isolation process`` and
  a SuperExec authentication secret (only the site runtime can take its tasks),
  and the site runtime's supervisor (:mod:`flower_medimg.site.supervisor`), which
  keeps one warm worker (:class:`~flower_medimg.site.runtime.SiteRuntime`) alive;
* with ``runtime = "flower"``: Flower's SuperNode with ``--isolation subprocess``
  (a fresh ``flwr-clientapp`` process per message).

The processes, their command lines and logs are recorded in
``<state-dir>/site.json``; :func:`stop_site` stops exactly those (and the worker
and message processes the supervisor started, by the PIDs it recorded), checking
each PID's command line first.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from flwr.common.constant import FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
from flwr.supercore.constant import FLWR_DISABLE_UPDATE_CHECK

from flower_medimg.core.private_files import write_private
from flower_medimg.site.config import SiteConfig, load_site_config
from flower_medimg.site.policy import load_policy
from flower_medimg.site.processes import (
    ProcessRecord,
    command_line,
    is_running,
    start_process,
    stop_process,
    tool,
    wait_for_port,
)
from flower_medimg.site.runtime import MESSAGES_LOG, RUNTIME_FOLDER, read_runtime_state

__all__ = [
    "SITE_STATE",
    "site_processes",
    "site_status",
    "start_site",
    "stop_site",
    "supernode_command",
]

#: In the site's ``state-dir``: what :func:`start_site` started.
SITE_STATE = "site.json"
_SECRET_FILE = "superexec.secret"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _node_config_text(config: SiteConfig) -> str:
    parts = []
    for key, value in config.full_node_config().items():
        text = _toml_string(value) if isinstance(value, str) else json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(config: SiteConfig, secret_file: Path | None = None) -> list[str]:
    """Return the ``flower-supernode`` command line of a site.

    Parameters
    ----------
    config : SiteConfig
        The site.
    secret_file : Path, optional
        SuperExec authentication secret (warm runtime only).
    """
    argv = [tool("flower-supernode"), "--superlink", config.superlink]
    if config.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(config.root_certificates)]
        argv += ["--auth-supernode-private-key", str(config.auth_private_key)]
    argv += ["--node-config", _node_config_text(config)]
    argv += ["--host", "127.0.0.1", "--port", str(config.runtime_api_port)]
    if config.runtime == "warm":
        argv += ["--isolation", "process"]
        if secret_file is not None:
            argv += ["--superexec-auth-secret-file", str(secret_file)]
    else:
        argv += ["--isolation", "subprocess"]
    return argv


def _runtime_command(config: SiteConfig, secret_file: Path) -> list[str]:
    argv = [sys.executable, "-m", "flower_medimg.site.supervisor", "supervise"]
    argv += ["--runtime-api-address", config.runtime_api_address]
    argv += ["--state-dir", str(config.state_dir)]
    argv += ["--secret-file", str(secret_file)]
    argv += ["--poll-interval", str(config.poll_interval)]
    if config.threads:
        argv += ["--threads", str(config.threads)]
    if config.policy:
        argv += ["--policy", str(config.policy)]
    return argv


def _env(config: SiteConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(config.state_dir / "flwr-home")
    env[FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION] = "1"
    env.setdefault(FLWR_DISABLE_UPDATE_CHECK, "1")
    if config.threads:  # Flower's per-message processes read it as torch does
        env["OMP_NUM_THREADS"] = str(config.threads)
    return env


def _write_secret(path: Path) -> None:
    write_private(path, secrets.token_bytes(32))


def site_processes(state_dir: str | Path) -> list[ProcessRecord]:
    """Return the processes :func:`start_site` recorded in ``state_dir``, in order."""
    path = Path(state_dir) / SITE_STATE
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [ProcessRecord.from_dict(p) for p in data["processes"]]


def start_site(
    config: SiteConfig | str | Path, *, timeout: float = 60.0
) -> list[ProcessRecord]:
    """Start a site's SuperNode (and warm runtime); see the module docstring.

    Parameters
    ----------
    config : SiteConfig or path
        The site's configuration (or its file).
    timeout : float
        Seconds to wait for the SuperNode's Runtime API to listen.

    Returns
    -------
    list of ProcessRecord
        The processes started, SuperNode first.

    Raises
    ------
    RuntimeError
        If the site already runs, or the SuperNode exits before listening
        (whatever was started is stopped again).
    PolicyError
        If the site's policy file cannot be used (nothing is started).
    """
    if not isinstance(config, SiteConfig):
        config = load_site_config(config)
    load_policy(config.policy)  # a broken policy stops the start, not each message
    state = config.state_dir
    if any(is_running(p) for p in site_processes(state)):
        raise RuntimeError(
            f"site {config.name} already runs (see {state / SITE_STATE}); "
            f"stop it first: flower-medimg site stop --config {config.path}"
        )
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    logs = state / "logs"
    secret = state / _SECRET_FILE
    records: list[ProcessRecord] = []

    def save() -> None:
        (state / SITE_STATE).write_text(
            json.dumps(
                {
                    "config": str(config.path),
                    "runtime": config.runtime,
                    "processes": [r.to_dict() for r in records],
                },
                indent=2,
            )
        )

    if config.runtime == "warm":
        _write_secret(secret)
    supernode, _ = start_process(
        "supernode",
        supernode_command(config, secret if config.runtime == "warm" else None),
        logs / "supernode.log",
        _env(config),
        cwd=state,
    )
    records.append(supernode)
    save()
    try:
        wait_for_port("127.0.0.1", config.runtime_api_port, timeout, supernode)
        if config.runtime == "warm":
            runtime, _ = start_process(
                "site-runtime",
                _runtime_command(config, secret),
                logs / "site-runtime.log",
                _env(config),
                cwd=state,
            )
            records.append(runtime)
            save()
    except BaseException:
        stop_site(state)
        raise
    return records


def stop_site(state_dir: str | Path, grace: float = 10.0) -> dict[str, str]:
    """Stop every process a site started: runtime first, SuperNode last.

    The supervisor stops its worker and the worker its message processes; any of
    those still alive afterwards (their PIDs are in ``runtime.json`` and
    ``messages.jsonl``) is killed.

    Returns
    -------
    dict
        ``"<name> (pid N)"`` -> what happened (see
        :func:`~flower_medimg.site.processes.stop_process`).
    """
    state_dir = Path(state_dir)
    runtime = read_runtime_state(state_dir)
    outcome = {
        f"{r.name} (pid {r.pid})": stop_process(r, grace)
        for r in reversed(site_processes(state_dir))
    }
    for pid in _runtime_pids(state_dir, runtime):
        if command_line(pid) is not None and _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
            outcome[f"leftover (pid {pid})"] = "killed"
    return outcome


def _is_ours(pid: int) -> bool:
    cmdline = command_line(pid) or []
    return any("flower_medimg.site.supervisor" in part for part in cmdline)


def _runtime_pids(state_dir: Path, runtime: dict) -> list[int]:
    pids = [runtime[k] for k in ("supervisor", "worker") if runtime.get(k)]
    log = state_dir / RUNTIME_FOLDER / MESSAGES_LOG
    if log.is_file():
        pids += [json.loads(line)["pid"] for line in log.read_text().splitlines()]
    return [int(p) for p in pids]


def _median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def site_status(state_dir: str | Path) -> dict[str, Any]:
    """Describe a site: its processes, restarts and the messages it ran.

    Returns
    -------
    dict
        ``processes`` (name -> state, PID, log), ``runtime`` (supervisor and
        worker PIDs, restarts) and ``messages`` (count, failures, median
        seconds to fetch a message and to finish it).
    """
    state_dir = Path(state_dir)
    log = state_dir / RUNTIME_FOLDER / MESSAGES_LOG
    records = (
        [json.loads(line) for line in log.read_text().splitlines()]
        if log.is_file()
        else []
    )
    failed = [r for r in records if r.get("exit") != "ok"]
    return {
        "processes": {
            p.name: {
                "state": "running" if is_running(p) else "stopped",
                "pid": p.pid,
                "log": p.log,
            }
            for p in site_processes(state_dir)
        },
        "runtime": read_runtime_state(state_dir),
        "messages": {
            "count": len(records),
            "failed": len(failed),
            "median-fetch-s": _median(records, "fetch_s"),
            "median-duration-s": _median(records, "duration_s"),
        },
    }

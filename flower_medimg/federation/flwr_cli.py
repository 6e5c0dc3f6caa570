"""Talk to a SuperLink the way a user does: Flower's config file and ``flwr`` CLI.

``flwr`` finds SuperLinks through named connections in ``$FLWR_HOME/config.toml``
(``~/.flwr/config.toml`` by default)::

    [superlink.medimg-local]
    address = "127.0.0.1:41234"
    root-certificates = "/abs/path/federation/tls/ca.crt"

after which ``flwr run . medimg-local --stream`` submits a run to it and
``flwr supernode register site-0.pub medimg-local`` registers a hospital's key.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML, FLOWER_CONFIG_FILE
from flwr.supercore.utils import get_flwr_home

from flower_medimg.site.processes import tool

__all__ = [
    "flwr_env",
    "list_nodes",
    "read_connection",
    "register_node",
    "remove_connection",
    "resolve_flwr_home",
    "write_connection",
]


def resolve_flwr_home(flwr_home: str | Path | None = None) -> Path:
    """Return ``flwr_home`` or Flower's own choice (``$FLWR_HOME`` or ``~/.flwr``)."""
    return Path(flwr_home).expanduser().resolve() if flwr_home else get_flwr_home()


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Return this process's environment with ``FLWR_HOME`` set to ``flwr_home``."""
    return {**os.environ, "FLWR_HOME": str(flwr_home)}


def _config_path(flwr_home: Path) -> Path:
    return flwr_home / FLOWER_CONFIG_FILE


def _read(flwr_home: Path) -> dict[str, Any]:
    path = _config_path(flwr_home)
    text = path.read_text() if path.exists() else DEFAULT_FLOWER_CONFIG_TOML
    return tomllib.loads(text)


def _write(flwr_home: Path, config: dict[str, Any]) -> Path:
    path = _config_path(flwr_home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def write_connection(
    name: str, address: str, root_certificates: Path | None, flwr_home: Path
) -> Path:
    """Add (or replace) the SuperLink connection ``name``; return the config path.

    With ``root_certificates`` the connection uses TLS verified by them; without,
    it is plain HTTP (``insecure = true``), which is meant only for a loopback
    address such as the operator gateway's
    (:mod:`flower_medimg.federation.control_plane`). Other connections and the
    default choice are left as they are; a missing file starts from Flower's
    default content.
    """
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    config = _read(flwr_home)
    config.setdefault("superlink", {})[name] = entry
    return _write(flwr_home, config)


def read_connection(name: str, flwr_home: Path) -> dict[str, Any] | None:
    """Return the connection ``name`` from the config file, or ``None``."""
    if not _config_path(flwr_home).exists():
        return None
    entry = _read(flwr_home).get("superlink", {}).get(name)
    return entry if isinstance(entry, dict) else None


def remove_connection(name: str, address: str, flwr_home: Path) -> bool:
    """Remove the connection ``name`` if it still points at ``address``.

    Returns whether it was removed (a connection the user has since changed is kept).
    """
    entry = read_connection(name, flwr_home)
    if entry is None or entry.get("address") != address:
        return False
    config = _read(flwr_home)
    del config["superlink"][name]
    if config["superlink"].get("default") == name:
        del config["superlink"]["default"]
    _write(flwr_home, config)
    return True


def _run_flwr(args: Sequence[str], flwr_home: Path, timeout: float = 60.0) -> Any:
    """Run ``flwr <args> --format json`` and return the JSON it prints."""
    proc = subprocess.run(
        [tool("flwr"), *args, "--format", "json"],
        env=flwr_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    start = proc.stdout.find("{")
    start_list = proc.stdout.find("[")
    if start < 0 or (0 <= start_list < start):
        start = start_list
    try:
        payload = json.loads(proc.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if proc.returncode != 0 or payload is None:
        raise RuntimeError(
            f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
        )
    return payload


def register_node(
    public_key: Path, connection: str, flwr_home: Path, name: str | None = None
) -> int:
    """Register a SuperNode's public key with the SuperLink; return its node id.

    Runs ``flwr supernode register <public_key> <connection> [--name <name>]``.
    """
    args = ["supernode", "register", str(public_key), connection]
    if name:
        args += ["--name", name]
    payload = _run_flwr(args, flwr_home)
    if not payload.get("success"):
        raise RuntimeError(f"Registering {public_key} failed: {payload}")
    return int(payload["node-id"])


def list_nodes(connection: str, flwr_home: Path) -> list[dict[str, Any]]:
    """Return ``flwr supernode ls <connection>``: one dict per SuperNode.

    Each dict has ``node-id`` (an int here) and ``status`` (e.g. ``"online"``).
    """
    payload = _run_flwr(["supernode", "ls", connection], flwr_home)
    nodes = payload.get("nodes", []) if isinstance(payload, dict) else payload
    return [{**node, "node-id": int(node["node-id"])} for node in nodes]

"""The site's own configuration file (TOML), read and checked before anything starts.

A hospital keeps one file, e.g. ``site.toml``::

    [site]
    name = "site-a"                       # its SuperNode's name in logs
    superlink = "fl.example.org:9092"     # the Fleet API of the coordinating centre
    root-certificates = "ca.crt"          # the federation's CA certificate
    auth-private-key = "site-a.key"       # its SuperNode authentication key
    data-dir = "/data/site-a"             # the only folder its ClientApp reads
    state-dir = "/var/lib/medimg/site-a"  # state, caches, logs
    runtime = "warm"                      # "warm" (flower-medimg's site runtime)
                                          # or "flower" (a process per message)
    runtime-api-port = 9094               # 127.0.0.1 port, SuperNode <-> runtime
    policy = "policy.toml"                # the site's policy (warm runtime only)

    [site.node-config]                    # more node_config entries, e.g.
    datalist = "dataset.json"
    dp-max-epsilon = 8.0

Relative paths are relative to the file's folder. An unknown key, a missing one or
a value of the wrong type is an error that names the key and the file.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RUNTIMES",
    "SiteConfig",
    "SiteConfigError",
    "load_site_config",
    "write_site_config",
]

#: ``runtime`` values: the warm site runtime, or Flower's process per message.
RUNTIMES = ("warm", "flower")
_REQUIRED = ("name", "superlink", "data-dir", "state-dir")
_PATHS = ("root-certificates", "auth-private-key", "data-dir", "state-dir", "policy")
_OPTIONAL: dict[str, Any] = {
    "root-certificates": None,
    "auth-private-key": None,
    "policy": None,
    "runtime": "warm",
    "runtime-api-port": 9094,
    "insecure": False,
    "poll-interval": 0.05,
    "threads": 0,
    "node-config": {},
}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "superlink": (str,),
    "root-certificates": (str,),
    "auth-private-key": (str,),
    "policy": (str,),
    "data-dir": (str,),
    "state-dir": (str,),
    "runtime": (str,),
    "runtime-api-port": (int,),
    "insecure": (bool,),
    "poll-interval": (int, float),
    "threads": (int,),
    "node-config": (dict,),
}
_NODE_CONFIG_TYPES = (str, int, float, bool)


class SiteConfigError(ValueError):
    """A site configuration file that cannot be used; the message says why."""


@dataclass(frozen=True)
class SiteConfig:
    """A site's configuration (see the module docstring for the keys).

    Attributes
    ----------
    path : Path
        The file it was read from.
    name, superlink : str
        Site name, SuperLink Fleet API address.
    data_dir, state_dir : Path
        Its data folder and state folder.
    root_certificates, auth_private_key : Path or None
        TLS root certificate and authentication key (both required unless
        ``insecure``).
    policy : Path or None
        The site's policy file (:mod:`flower_medimg.site.policy`).
    runtime : str
        ``"warm"`` or ``"flower"``.
    runtime_api_port : int
        Port of the SuperNode's Runtime API on 127.0.0.1.
    insecure : bool
        Connect without TLS (tests and local trials only).
    poll_interval : float
        Seconds between the warm runtime's task polls.
    threads : int
        Torch threads per message (0: all cores).
    node_config : dict
        More ``node_config`` entries.
    """

    path: Path
    name: str
    superlink: str
    data_dir: Path
    state_dir: Path
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    policy: Path | None = None
    runtime: str = "warm"
    runtime_api_port: int = 9094
    insecure: bool = False
    poll_interval: float = 0.05
    threads: int = 0
    node_config: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime_api_address(self) -> str:
        """``127.0.0.1:<runtime-api-port>``."""
        return f"127.0.0.1:{self.runtime_api_port}"

    def full_node_config(self) -> dict[str, Any]:
        """Return the SuperNode's ``node_config``: data-dir, state-dir, the extras."""
        return {
            "data-dir": str(self.data_dir),
            "state-dir": str(self.state_dir),
            **self.node_config,
        }


def _fail(path: Path, text: str) -> SiteConfigError:
    return SiteConfigError(f"site config {path}: {text}")


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site configuration file.

    Parameters
    ----------
    path : str or Path
        The TOML file.

    Returns
    -------
    SiteConfig
        The checked configuration, paths made absolute.

    Raises
    ------
    SiteConfigError
        If the file is missing or not TOML, has no ``[site]`` table, an unknown,
        missing or mistyped key, or a bad value; the message names the key.
    """
    path = Path(path).expanduser().resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise _fail(path, f"cannot read it: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise _fail(path, f"not valid TOML: {err}") from err
    table = raw.get("site")
    if not isinstance(table, dict):
        raise _fail(path, "needs a [site] table")
    unknown = sorted(set(raw) - {"site"}) + sorted(set(table) - set(_TYPES))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; known: {sorted(_TYPES)}")
    missing = [key for key in _REQUIRED if key not in table]
    if missing:
        raise _fail(path, f"missing key(s) {missing}")
    values = {**_OPTIONAL, **table}
    for key, value in values.items():
        if value is None:
            continue
        if not isinstance(value, _TYPES[key]) or (
            isinstance(value, bool) and bool not in _TYPES[key]
        ):
            kinds = "/".join(t.__name__ for t in _TYPES[key])
            raise _fail(path, f"'{key}' must be {kinds}, got {value!r}")
    if values["runtime"] not in RUNTIMES:
        raise _fail(
            path, f"'runtime' must be one of {RUNTIMES}, got {values['runtime']!r}"
        )
    if not 0 < values["runtime-api-port"] < 65536:
        raise _fail(path, f"'runtime-api-port' {values['runtime-api-port']} is no port")
    if not 0.01 <= values["poll-interval"] <= 60:
        raise _fail(path, "'poll-interval' must be between 0.01 and 60 seconds")
    if values["policy"] is not None and values["runtime"] != "warm":
        raise _fail(path, "'policy' needs runtime = \"warm\" (the runtime enforces it)")
    if values["threads"] < 0:
        raise _fail(path, "'threads' must be >= 0")
    for key, value in values["node-config"].items():
        if key in ("data-dir", "state-dir"):
            raise _fail(path, f"node-config '{key}' is set in [site], not here")
        if not isinstance(value, _NODE_CONFIG_TYPES):
            raise _fail(path, f"node-config '{key}' must be a string or number")
    if not values["insecure"]:
        absent = [k for k in ("root-certificates", "auth-private-key") if not values[k]]
        if absent:
            raise _fail(path, f"{absent} required (or insecure = true, tests only)")
    for key in _PATHS:
        if values[key] is not None:
            values[key] = (path.parent / Path(values[key]).expanduser()).resolve()
    return SiteConfig(
        path=path,
        **{key.replace("-", "_"): value for key, value in values.items()},
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_site_config(
    path: str | Path, node_config: dict[str, Any] | None = None, **values: Any
) -> SiteConfig:
    """Write a site configuration file and return it, read back and checked.

    Parameters
    ----------
    path : str or Path
        The TOML file to write.
    node_config : dict, optional
        ``[site.node-config]`` entries.
    **values
        ``[site]`` keys with ``_`` for ``-`` (``data_dir=...``).

    Returns
    -------
    SiteConfig
        What :func:`load_site_config` reads from the new file.
    """
    path = Path(path)
    lines = ["[site]"]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    if node_config:
        lines.append("")
        lines.append("[site.node-config]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in node_config.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return load_site_config(path)

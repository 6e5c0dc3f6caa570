"""Bring a secure Flower federation up on this machine, and down again.

:func:`up` performs, on one machine and on 127.0.0.1, the steps that
``docs/deployment.md`` spreads over a coordinating centre and its hospitals:

1. TLS: a certificate authority and a SuperLink certificate (``tls/``);
2. one authentication key pair per site (``keys/``);
3. synthetic site folders (``data/site-<k>/`` with ``dataset.json``);
4. a SuperLink with TLS and SuperNode authentication (``--enable-supernode-auth``)
   on a loopback port, behind the closed control plane
   (:mod:`flower_medimg.federation.control_plane`): an nginx front on the address
   hospitals reach, which forwards the Fleet API to everyone and the Control API only
   to the operator's certificate, and an operator gateway that presents it;
5. a ``flwr`` connection to the operator gateway in ``$FLWR_HOME/config.toml`` and
   the registration of every site's public key (``flwr supernode register``);
6. one SuperNode per site, each given its TLS root certificate, its private key and
   ``--node-config 'data-dir="..." state-dir="..."'``.

Everything lives in one folder, described by ``federation.json``: the processes
(PID and command line), their logs (``logs/``), ports and sites. :func:`down` stops
exactly those processes. The processes run with
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` so the ServerApp and ClientApps
use the environment ``flower-medimg`` is installed in.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.common.constant import FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
from flwr.supercore.constant import FLWR_DISABLE_UPDATE_CHECK

from flower_medimg.core.settings import resolve_settings
from flower_medimg.data.datasets import synthetic_settings
from flower_medimg.data.site_folder import write_synthetic_sites
from flower_medimg.federation.certificates import TlsFiles, write_tls_files
from flower_medimg.federation.control_plane import (
    ProxyTls,
    front_config,
    gateway_config,
    start_proxy,
)
from flower_medimg.federation.flwr_cli import (
    list_nodes,
    register_node,
    remove_connection,
    resolve_flwr_home,
    write_connection,
)
from flower_medimg.federation.keys import write_node_keys
from flower_medimg.site.approvals import approve as approve_app
from flower_medimg.site.config import write_site_config
from flower_medimg.site.processes import (
    ProcessRecord,
    free_port,
    is_running,
    start_process,
    stop_process,
    tool,
    wait_for_port,
)
from flower_medimg.site.service import start_site, stop_site

__all__ = [
    "STATE_FILE",
    "Federation",
    "Site",
    "add_site",
    "down",
    "runtime_env",
    "start_supernode",
    "status",
    "supernode_argv",
    "up",
    "wait_for_nodes",
]

#: The file in the federation folder that describes it.
STATE_FILE = "federation.json"
HOST = "127.0.0.1"
#: Where the SuperLink and the operator gateway listen: never another interface.
LOOPBACK = "127.0.0.1"


@dataclass
class Site:
    """One hospital of the federation.

    Attributes
    ----------
    name : str
        Site name, e.g. ``site-0``; also the SuperNode's registered name.
    data_dir : str
        The site folder its ClientApp reads (``node_config["data-dir"]``).
    state_dir : str
        Where the site keeps state between rounds (``node_config["state-dir"]``).
    private_key, public_key : str
        Its authentication key pair.
    port : int
        Port of its SuperNode's local Runtime API (ClientApp <-> SuperNode).
    node_id : int or None
        The node id the SuperLink gave its key at registration.
    config : str or None
        Its site configuration file (``flower-medimg site``), if it runs as a site.
    """

    name: str
    data_dir: str
    state_dir: str
    private_key: str
    public_key: str
    port: int
    node_id: int | None = None
    config: str | None = None


@dataclass
class Federation:
    """A local federation: what :func:`up` started and where its files are.

    Attributes
    ----------
    folder : str
        The working folder.
    connection : str
        Name of the ``flwr`` SuperLink connection (``flwr run . <connection>``).
    address : str
        ``host:port`` hospitals reach: the front proxy, which serves them the
        Fleet API only.
    flwr_home : str
        The ``FLWR_HOME`` whose ``config.toml`` holds the connection.
    tls : dict
        Paths of the TLS files (see :class:`TlsFiles`).
    task : str
        Task of the synthetic site data.
    sites : list of Site
        The sites.
    superlink_address : str
        The SuperLink's own loopback ``host:port`` (all its APIs; the front
        proxies forward to it).
    control_address : str
        The operator gateway's loopback ``host:port``, where the ``flwr``
        connection points (the Control API, with the operator certificate).
    processes : list of ProcessRecord
        Started processes, in start order.
    """

    folder: str
    connection: str
    address: str
    flwr_home: str
    tls: dict[str, str]
    task: str
    superlink_address: str = ""
    control_address: str = ""
    sites: list[Site] = field(default_factory=list)
    processes: list[ProcessRecord] = field(default_factory=list)

    @property
    def ca_cert(self) -> str:
        """Path of the CA certificate (the TLS root for SuperNodes and ``flwr``)."""
        return self.tls["ca_cert"]

    def site(self, name: str) -> Site:
        """Return the site called ``name``."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"No site {name!r}; sites: {[s.name for s in self.sites]}")

    def process(self, name: str) -> ProcessRecord:
        """Return the most recent process record called ``name``."""
        for record in reversed(self.processes):
            if record.name == name:
                return record
        raise KeyError(f"No process {name!r} in {self.folder}/{STATE_FILE}")

    def save(self) -> Path:
        """Write ``federation.json``; return its path."""
        data = asdict(self)
        data["processes"] = [p.to_dict() for p in self.processes]
        path = Path(self.folder) / STATE_FILE
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Federation:
        """Read the federation described by ``folder/federation.json``.

        Raises
        ------
        FileNotFoundError
            If the folder holds no ``federation.json``.
        """
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No federation in {folder}: {path} is missing.")
        data = json.loads(path.read_text())
        data["sites"] = [Site(**s) for s in data["sites"]]
        data["processes"] = [ProcessRecord.from_dict(p) for p in data["processes"]]
        return cls(**data)


def runtime_env(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a SuperLink or SuperNode process.

    ``FLWR_HOME`` is a folder of its own (as if it ran on its own host), runtime
    dependency installation is off (use this environment instead of a fresh virtual
    environment per run) and Flower's update check is off.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(home)
    env[FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION] = "1"
    env.setdefault(FLWR_DISABLE_UPDATE_CHECK, "1")
    return env


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def supernode_argv(
    federation: Federation,
    site: Site,
    *,
    private_key: str | None = None,
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """Return the ``flower-supernode`` command line of ``site``.

    Parameters
    ----------
    federation : Federation
        The federation to join.
    site : Site
        The site (its data folder, state folder, key and Runtime API port).
    private_key : str, optional
        Use this key instead of the site's (tests: an unregistered key).
    insecure : bool, optional
        Connect without TLS (and without authentication), which a TLS SuperLink
        refuses; for tests only.
    max_retries : int, optional
        Give up after this many failed connection attempts.
    """
    node_config = (
        f"data-dir={_toml_string(site.data_dir)} "
        f"state-dir={_toml_string(site.state_dir)}"
    )
    argv = [tool("flower-supernode"), "--superlink", federation.address]
    if insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", federation.ca_cert]
        argv += ["--auth-supernode-private-key", private_key or site.private_key]
    argv += ["--node-config", node_config]
    argv += ["--host", HOST, "--port", str(site.port), "--isolation", "subprocess"]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    return argv


def _superlink_argv(tls: TlsFiles, address: str) -> list[str]:
    host, port = address.rsplit(":", 1)
    return [
        tool("flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        port,
        "--isolation",
        "subprocess",
    ]


def _start_control_plane(federation: Federation, tls: TlsFiles, timeout: float) -> None:
    """Start the front proxy and the operator gateway; record both."""
    folder = Path(federation.folder) / "control-plane"
    env = runtime_env(Path(federation.folder) / "homes" / "proxy")
    front_tls = ProxyTls(str(tls.ca_cert), str(tls.server_cert), str(tls.server_key))
    front = start_proxy(
        "proxy",
        folder / "front",
        front_config(
            folder / "front",
            federation.address,
            federation.superlink_address,
            front_tls,
        ),
        federation.address,
        env,
        timeout,
    )
    federation.processes.append(front)
    federation.save()
    gateway_tls = replace(
        front_tls, cert=str(tls.operator_cert), key=str(tls.operator_key)
    )
    gateway = start_proxy(
        "operator-gateway",
        folder / "operator-gateway",
        gateway_config(
            folder / "operator-gateway",
            federation.control_address,
            federation.address,
            gateway_tls,
        ),
        federation.control_address,
        env,
        timeout,
    )
    federation.processes.append(gateway)
    federation.save()


def _start(
    federation: Federation, name: str, argv: list[str], cwd: str | None = None
) -> ProcessRecord:
    folder = Path(federation.folder)
    record, _ = start_process(
        name,
        argv,
        folder / "logs" / f"{name}.log",
        runtime_env(folder / "homes" / name),
        cwd=cwd or str(folder),
    )
    federation.processes.append(record)
    federation.save()
    return record


def start_supernode(
    federation: Federation, site: Site, name: str | None = None, **argv_options: Any
) -> ProcessRecord:
    """Start a SuperNode for ``site`` and record it; see :func:`supernode_argv`."""
    Path(site.state_dir).mkdir(parents=True, exist_ok=True)
    argv = supernode_argv(federation, site, **argv_options)
    return _start(federation, name or f"supernode-{site.name}", argv)


def add_site(
    federation: Federation,
    name: str,
    data_dir: str | Path,
    *,
    register: bool = True,
    start: bool = True,
    port: int | None = None,
    runtime: str = "warm",
    approve: Sequence[str | Path] = (),
    threads: int = 0,
) -> Site:
    """Add a site: make its key pair, register it, start it.

    The site is started as a hospital would (``flower-medimg site start``): its
    configuration file ``sites/<name>.toml`` names the SuperLink, the CA
    certificate, its key and folders.

    Parameters
    ----------
    federation : Federation
        A running federation.
    name : str
        Site name (unique in the federation).
    data_dir : str or Path
        Its site folder.
    register : bool, optional
        Register the public key with the SuperLink (a SuperNode whose key is not
        registered is refused).
    start : bool, optional
        Start the site (its SuperNode and runtime).
    port : int, optional
        Port of the SuperNode's Runtime API; a free one by default.
    runtime : {"warm", "flower"}
        The warm site runtime, or Flower's process per message.
    approve : Sequence of str or Path
        Apps the site approves before it starts (FAB files, app folders or
        hashes, :func:`flower_medimg.site.approvals.approve`); the warm runtime
        refuses every other app.
    threads : int, optional
        Torch threads of each of its message processes (``threads`` in the site
        file; 0: all cores).

    Returns
    -------
    Site
        The new site (also saved in ``federation.json``); ``node_id`` is set if it
        was registered.
    """
    folder = Path(federation.folder)
    keys = write_node_keys(folder / "keys", name)
    site = Site(
        name=name,
        data_dir=str(Path(data_dir).expanduser().resolve()),
        state_dir=str(folder / "state" / name),
        private_key=str(keys.private_key),
        public_key=str(keys.public_key),
        port=port or free_port(HOST),
    )
    config = write_site_config(
        folder / "sites" / f"{name}.toml",
        name=name,
        superlink=federation.address,
        root_certificates=federation.ca_cert,
        auth_private_key=site.private_key,
        data_dir=site.data_dir,
        state_dir=site.state_dir,
        runtime=runtime,
        runtime_api_port=site.port,
        threads=threads,
    )
    site.config = str(config.path)
    for target in approve:
        approve_app(site.state_dir, target, note="federation up")
    if register:
        site.node_id = register_node(
            keys.public_key, federation.connection, Path(federation.flwr_home), name
        )
    federation.sites.append(site)
    federation.save()
    if start:
        for record in start_site(config):
            federation.processes.append(replace(record, name=f"{record.name}-{name}"))
        federation.save()
    return site


def wait_for_nodes(
    federation: Federation, node_ids: Sequence[int], timeout: float = 90.0
) -> None:
    """Wait until every node in ``node_ids`` is online at the SuperLink.

    Raises
    ------
    RuntimeError
        If some are still not online after ``timeout`` seconds; the message names
        them and their logs.
    """
    wanted = set(node_ids)
    deadline = time.monotonic() + timeout
    online: set[int] = set()
    while time.monotonic() < deadline:
        nodes = list_nodes(federation.connection, Path(federation.flwr_home))
        online = {n["node-id"] for n in nodes if n.get("status") == "online"}
        if wanted <= online:
            return
        time.sleep(1.0)
    missing = [s for s in federation.sites if s.node_id in wanted - online]
    logs = ", ".join(
        f"{s.name} ({federation.folder}/logs/supernode-{s.name}.log)" for s in missing
    )
    raise RuntimeError(f"SuperNodes not online after {timeout:.0f} s: {logs}")


def _ports(ports: Sequence[int] | None, num_sites: int) -> list[int]:
    if not ports:
        return [free_port(HOST) for _ in range(num_sites + 1)]
    if len(ports) != num_sites + 1:
        raise ValueError(
            f"--ports needs {num_sites + 1} ports (the SuperLink's, then one per "
            f"site's SuperNode), got {len(ports)}: {list(ports)}"
        )
    return list(ports)


def up(
    folder: str | Path = "federation",
    num_sites: int = 3,
    *,
    task: str = "segmentation",
    connection: str = "medimg-local",
    ports: Sequence[int] | None = None,
    flwr_home: str | Path | None = None,
    data_options: Mapping[str, Any] | None = None,
    timeout: float = 90.0,
    runtime: str = "warm",
    approve: Sequence[str | Path] = (),
    threads: int | None = None,
) -> Federation:
    """Create and start a secure federation of ``num_sites`` sites on 127.0.0.1.

    Parameters
    ----------
    folder : str or Path
        Working folder (created); it must not hold a running federation.
    num_sites : int
        Number of hospitals (SuperNodes).
    task : str
        Task of the synthetic site data (``segmentation`` or ``classification``).
    connection : str
        Name of the ``flwr`` connection to write (``flwr run . <connection>``).
    ports : Sequence[int], optional
        The port hospitals reach (the front proxy's), then one Runtime API port
        per SuperNode; free ports by default. The SuperLink and the operator
        gateway take free loopback ports.
    flwr_home : str or Path, optional
        ``FLWR_HOME`` whose ``config.toml`` gets the connection; Flower's default
        (``$FLWR_HOME`` or ``~/.flwr``) if not given.
    data_options : Mapping, optional
        Keyword arguments of
        :func:`flower_medimg.data.synthetic.synthetic_site` (``image_size``,
        ``samples_per_site``, ``spatial_dims``, ``seed``, ...). The others are the
        run-config defaults, so with the same settings the folders hold the sites
        that simulation generates in memory.
    timeout : float
        Seconds to wait for the SuperLink to listen and the SuperNodes to connect.
    runtime : {"warm", "flower"}
        How the sites run their ClientApp messages: the warm site runtime
        (:mod:`flower_medimg.site`) or Flower's fresh process per message.
    approve : Sequence of str or Path
        Apps every site approves (see :func:`add_site`), e.g. the project folder
        that ``flwr run .`` submits.
    threads : int, optional
        Torch threads per site message. By default the sites split this
        machine's cores (``cpu_count // num_sites``, at least 1): three sites
        that each start a thread per core would run three times as many threads
        as cores, and torch's spinning threads then slow every site down.

    Returns
    -------
    Federation
        The running federation (also saved as ``folder/federation.json``).

    Raises
    ------
    RuntimeError
        If the folder already holds a running federation, or a process fails to
        start (whatever was started is stopped again; the logs stay).
    FileNotFoundError
        If nginx is not installed (the closed control plane needs it).
    """
    folder = Path(folder).expanduser().resolve()
    if (folder / STATE_FILE).exists():
        previous = Federation.load(folder)
        if any(is_running(p) for p in previous.processes):
            raise RuntimeError(
                f"A federation is already running in {folder}; "
                f"run `flower-medimg federation down --dir {folder}` first."
            )
    folder.mkdir(parents=True, exist_ok=True)
    port_list = _ports(ports, num_sites)
    home = resolve_flwr_home(flwr_home)

    tls = write_tls_files(folder / "tls")
    federation = Federation(
        folder=str(folder),
        connection=connection,
        address=f"{HOST}:{port_list[0]}",
        flwr_home=str(home),
        tls={k: str(v) for k, v in asdict(tls).items()},
        task=task,
        superlink_address=f"{LOOPBACK}:{free_port(LOOPBACK)}",
        control_address=f"{LOOPBACK}:{free_port(LOOPBACK)}",
    )
    federation.save()
    site_options = {
        **synthetic_settings(resolve_settings()),
        **dict(data_options or {}),
    }
    data_dirs = write_synthetic_sites(folder / "data", task, num_sites, **site_options)
    try:
        superlink = _start(
            federation,
            "superlink",
            _superlink_argv(tls, federation.superlink_address),
            cwd=os.getcwd(),
        )
        host, port = federation.superlink_address.rsplit(":", 1)
        wait_for_port(host, int(port), timeout, superlink)
        _start_control_plane(federation, tls, timeout)
        write_connection(connection, federation.control_address, None, home)
        for k, data_dir in enumerate(data_dirs):
            add_site(
                federation,
                f"site-{k}",
                data_dir,
                port=port_list[k + 1],
                runtime=runtime,
                approve=approve,
                threads=threads or max(1, (os.cpu_count() or 1) // num_sites),
            )
        wait_for_nodes(
            federation, [s.node_id for s in federation.sites if s.node_id], timeout
        )
    except BaseException:
        down(folder)
        raise
    return federation


def down(folder: str | Path = "federation", grace: float = 10.0) -> dict[str, str]:
    """Stop every process the federation in ``folder`` started.

    Sites go first (:func:`flower_medimg.site.service.stop_site`: runtime, then
    SuperNode), the SuperLink last; each process gets SIGTERM, then SIGKILL after
    ``grace`` seconds, and only if its PID still runs the recorded command line.
    The ``flwr`` connection is removed if it still points at this SuperLink. Files
    and logs stay in ``folder``.

    Returns
    -------
    dict
        Process name -> what happened (see
        :func:`flower_medimg.site.processes.stop_process`).
    """
    federation = Federation.load(folder)
    outcome = {}
    for site in reversed(federation.sites):
        if site.config is not None:
            for name, what in stop_site(site.state_dir, grace).items():
                outcome[f"{site.name}: {name}"] = what
    for record in reversed(federation.processes):
        outcome[f"{record.name} (pid {record.pid})"] = stop_process(record, grace)
    remove_connection(
        federation.connection, federation.control_address, Path(federation.flwr_home)
    )
    return outcome


def _superlink_view(federation: Federation) -> dict[int, str]:
    """Node id -> status (``online``, ``offline``, ...) as the SuperLink sees it."""
    try:
        superlink = federation.process("superlink")
    except KeyError:  # `up` failed before starting it
        return {}
    if not is_running(superlink):
        return {}
    try:
        nodes = list_nodes(federation.connection, Path(federation.flwr_home))
    except (RuntimeError, OSError):
        return {}
    return {n["node-id"]: str(n.get("status", "unknown")) for n in nodes}


def status(folder: str | Path = "federation") -> dict[str, Any]:
    """Describe the federation in ``folder``: address, sites, processes.

    Returns
    -------
    dict
        ``address``, ``connection``, ``flwr-home``; ``sites``: per site name its
        node id, data folder and ``status`` at the SuperLink (``online``,
        ``offline``, ``unregistered`` or ``unknown`` when the SuperLink is down),
        so a site that dropped out is named here; ``processes``: per process
        ``running``/``stopped``, PID and log.
    """
    federation = Federation.load(folder)
    view = _superlink_view(federation)
    sites = {}
    for site in federation.sites:
        if site.node_id is None:
            state = "unregistered"
        else:
            state = view.get(site.node_id, "unknown")
        sites[site.name] = {
            "node-id": site.node_id,
            "status": state,
            "data-dir": site.data_dir,
        }
    return {
        "address": federation.address,
        "superlink-address": federation.superlink_address,
        "control-address": federation.control_address,
        "connection": federation.connection,
        "flwr-home": federation.flwr_home,
        "sites": sites,
        "processes": {
            p.name: {
                "state": "running" if is_running(p) else "stopped",
                "pid": p.pid,
                "log": p.log,
            }
            for p in federation.processes
        },
    }

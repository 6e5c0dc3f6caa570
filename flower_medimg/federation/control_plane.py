"""A closed control plane: hospitals reach the Fleet API, only the operator the rest.

Flower 1.42 serves the Fleet API (``/v1/fleet/*``, which SuperNodes use), the Control
API (``/v1/control/*``: register or unregister SuperNode keys, submit, list and stop
runs) and the Runtime API (``/v1/runtime/*``, the ServerApp's) on one HTTPS port, and
the open-source Control API has no login: whoever reaches the port can register a node
of its own and run code at every site (threat model, promise 8). So the SuperLink
listens on loopback only, and two nginx reverse proxies stand around it:

- the **front** (:func:`front_config`), on the address hospitals reach: TLS with the
  SuperLink's certificate; ``/v1/fleet/*`` is forwarded for everyone (a SuperNode
  still authenticates with its registered key), ``/v1/control/*`` only for a client
  that presents a certificate signed by the federation CA for client authentication
  (mutual TLS: the operator's ``operator.crt``), everything else is refused (403).
  Its access log names the client certificate of every request.
- the **operator gateway** (:func:`gateway_config`), on the operator's own machine:
  it listens on its loopback, and forwards ``/v1/control/*`` to the front presenting
  the operator certificate, because the ``flwr`` CLI cannot present one itself. The
  operator's ``flwr`` connection points at it.

Both are started and stopped by PID (:func:`start_proxy`); their configuration,
``pid`` and temporary files stay in one folder per proxy.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flower_medimg.core.private_files import private_dir
from flower_medimg.site.processes import (
    ProcessRecord,
    start_process,
    wait_for_port,
)

__all__ = [
    "CONTROL_PREFIX",
    "FLEET_PREFIX",
    "ProxyTls",
    "find_nginx",
    "front_config",
    "gateway_config",
    "start_proxy",
]

FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
#: nginx name of the one server a proxy forwards to.
UPSTREAM = "medimg_upstream"

_NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx")


@dataclass(frozen=True)
class ProxyTls:
    """TLS files a proxy uses.

    Attributes
    ----------
    ca_cert : str
        The federation CA: verifies the SuperLink, and the front's clients.
    cert, key : str
        The proxy's own certificate and key: the SuperLink's for the front (the
        name hospitals already verify), the operator's for the gateway.
    server_name : str
        A DNS name in the SuperLink certificate, checked on the upstream connection.
    """

    ca_cert: str
    cert: str
    key: str
    server_name: str = "localhost"


def find_nginx() -> str:
    """Return the path of the ``nginx`` binary.

    Raises
    ------
    FileNotFoundError
        If none is installed; the message says how to install it.
    """
    for candidate in _NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError(
        "nginx is not installed: the closed control plane runs the SuperLink "
        "behind it (Debian/Ubuntu: `apt-get install nginx-light`)."
    )


def _http_block(folder: Path, name: str, upstream: str, servers: str) -> str:
    """Wrap ``servers`` in the nginx configuration every proxy here shares.

    The proxy keeps its TLS connections to ``upstream`` (``host:port``) open
    between requests: Flower moves every array of a model as its own request
    (hundreds per message), and a TLS handshake for each would cost more than
    the request.
    """
    tmp = folder / "tmp"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Written by flower-medimg ({name}): the closed control plane.
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} notice;
events {{
    worker_connections 512;
}}
http {{
    log_format medimg '$time_iso8601 $remote_addr "$request" $status '
                      'client_cert=$ssl_client_verify "$ssl_client_s_dn"';
    access_log {folder / "access.log"} medimg;
{temp_paths}
    default_type text/plain;
    server_tokens off;
    client_max_body_size 0;
    # Stream bodies both ways: Flower's log stream and large model updates.
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    upstream {UPSTREAM} {{
        server {upstream};
        keepalive 32;
    }}
{servers}
}}
"""


def _upstream(tls: ProxyTls) -> str:
    """Directives that forward to the upstream over verified, kept-alive TLS."""
    return f"""            proxy_pass https://{UPSTREAM};
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_ssl_session_reuse on;
            proxy_ssl_trusted_certificate {tls.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name {tls.server_name};
            proxy_ssl_server_name on;"""


def front_config(folder: str | Path, listen: str, superlink: str, tls: ProxyTls) -> str:
    """Return the nginx configuration of the front proxy.

    Parameters
    ----------
    folder : str or Path
        The proxy's folder (``pid``, logs, temporary files).
    listen : str
        ``host:port`` hospitals and the operator gateway reach.
    superlink : str
        The SuperLink's loopback ``host:port``.
    tls : ProxyTls
        The CA and the SuperLink's certificate and key.
    """
    folder = Path(folder)
    servers = f"""    server {{
        listen {listen} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        # A client certificate is asked for, not required: SuperNodes have none.
        ssl_client_certificate {tls.ca_cert};
        ssl_verify_client optional;
        location {FLEET_PREFIX} {{
{_upstream(tls)}
        }}
        location {CONTROL_PREFIX} {{
            if ($ssl_client_verify != SUCCESS) {{
                return 403 "The Control API needs the operator certificate.\\n";
            }}
{_upstream(tls)}
        }}
        location / {{
            return 403 "Only the Fleet API is served here.\\n";
        }}
    }}"""
    return _http_block(folder, "front", superlink, servers)


def gateway_config(folder: str | Path, listen: str, front: str, tls: ProxyTls) -> str:
    """Return the nginx configuration of the operator gateway.

    Parameters
    ----------
    folder : str or Path
        The gateway's folder.
    listen : str
        Loopback ``host:port`` the operator's ``flwr`` connection uses
        (``insecure = true``: plain HTTP that never leaves the machine).
    front : str
        ``host:port`` of the front proxy.
    tls : ProxyTls
        The CA and the operator's certificate and key.
    """
    folder = Path(folder)
    servers = f"""    server {{
        listen {listen};
        location {CONTROL_PREFIX} {{
{_upstream(tls)}
            proxy_ssl_certificate {tls.cert};
            proxy_ssl_certificate_key {tls.key};
        }}
        location / {{
            return 403 "The operator gateway forwards the Control API only.\\n";
        }}
    }}"""
    return _http_block(folder, "operator gateway", front, servers)


def start_proxy(
    name: str,
    folder: str | Path,
    config: str,
    listen: str,
    env: Mapping[str, str],
    timeout: float = 30.0,
) -> ProcessRecord:
    """Write ``config`` into ``folder`` and run nginx on it until stopped by PID.

    nginx checks the configuration first (``nginx -t``), so a bad one fails here
    with nginx's own message instead of in the background.

    Parameters
    ----------
    name : str
        Role of the process (``proxy``, ``operator-gateway``).
    folder : str or Path
        The proxy's folder (created ``0o700``); ``nginx.conf`` and ``nginx.log``
        are written there.
    config : str
        From :func:`front_config` or :func:`gateway_config`.
    listen : str
        The ``host:port`` it listens on; waited for.
    env : Mapping[str, str]
        Its environment.
    timeout : float
        Seconds to wait for it to listen.

    Returns
    -------
    ProcessRecord
        The nginx master process (it stops its worker when it gets SIGTERM).

    Raises
    ------
    FileNotFoundError
        If nginx is not installed.
    RuntimeError
        If the configuration is refused or nginx does not listen in time.
    """
    folder = private_dir(folder)
    private_dir(folder / "tmp")
    conf = folder / "nginx.conf"
    conf.write_text(config)
    argv = [find_nginx(), "-e", str(folder / "error.log"), "-p", str(folder)]
    argv += ["-c", str(conf)]
    _, proc = start_process(f"{name}-check", [*argv, "-t"], folder / "nginx.log", env)
    if proc.wait(timeout) != 0:
        log = (folder / "nginx.log").read_text(errors="replace").strip()
        raise RuntimeError(f"nginx refused {conf} ({name}): {log}")
    record, _ = start_process(name, argv, folder / "nginx.log", env)
    host, port = listen.rsplit(":", 1)
    wait_for_port(host, int(port), timeout, record)
    return record

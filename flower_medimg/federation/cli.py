"""``flower-medimg federation up|down|status|certs|keygen|proxy-config``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flower_medimg.data.synthetic import TASKS
from flower_medimg.federation.certificates import write_tls_files
from flower_medimg.federation.control_plane import (
    ProxyTls,
    front_config,
    gateway_config,
)
from flower_medimg.federation.keys import write_node_keys
from flower_medimg.federation.launcher import down, status, up

__all__ = ["add_federation_parser", "run_federation"]


def _port_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated port numbers, got {text!r}"
        ) from err


def add_federation_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``federation`` command and its subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "federation",
        help="run a secure federation (TLS + SuperNode authentication) locally",
        description="Bring a secure Flower federation up on 127.0.0.1, or down; "
        "make TLS certificates and SuperNode keys for a real deployment.",
    )
    commands = parser.add_subparsers(dest="federation_command", required=True)

    start = commands.add_parser(
        "up",
        help="start a SuperLink and one SuperNode per synthetic site",
        description="Create certificates, site keys and synthetic site folders in "
        "DIR, start a SuperLink with TLS and SuperNode authentication and one "
        "SuperNode per site, and add a `flwr` connection so that "
        "`flwr run . <name> --stream` submits runs to it.",
    )
    start.add_argument("--sites", type=int, default=3, help="number of sites")
    start.add_argument("--dir", default="federation", help="working folder")
    start.add_argument("--task", choices=TASKS, default="segmentation")
    start.add_argument(
        "--name", default="medimg-local", help="name of the flwr connection"
    )
    start.add_argument(
        "--ports",
        type=_port_list,
        default=None,
        help="comma-separated: the SuperLink's port, then one per SuperNode "
        "(default: free ports)",
    )
    start.add_argument("--samples-per-site", type=int, default=None)
    start.add_argument("--image-size", type=int, default=None)
    start.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None)
    start.add_argument("--seed", type=int, default=None)
    start.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for start-up"
    )
    start.add_argument(
        "--runtime",
        choices=("warm", "flower"),
        default="warm",
        help="warm: each site runs its messages in flower-medimg's warm site "
        "runtime (default); flower: a fresh flwr-clientapp process per message",
    )
    start.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per site message (default: the machine's cores "
        "split among the sites)",
    )
    start.add_argument(
        "--approve",
        action="append",
        default=None,
        metavar="APP",
        help="an app every site approves (app folder, FAB file or hash; "
        "repeatable; default: the current folder, the app `flwr run .` submits)",
    )

    stop = commands.add_parser("down", help="stop the processes `up` started")
    stop.add_argument("--dir", default="federation", help="working folder")
    stop.add_argument(
        "--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL"
    )

    show = commands.add_parser("status", help="show the federation's processes")
    show.add_argument("--dir", default="federation", help="working folder")

    certs = commands.add_parser(
        "certs",
        help="make a CA and a SuperLink certificate (coordinating centre)",
        description="Write ca.crt, ca.key, superlink.crt, superlink.key, "
        "operator.crt and operator.key to OUT.",
    )
    certs.add_argument("--out", required=True, help="destination folder")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or IP under which hospitals reach the SuperLink (repeatable)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days")

    keygen = commands.add_parser(
        "keygen",
        help="make a SuperNode authentication key pair (hospital)",
        description="Write NAME.key (keep it) and NAME.pub (send it) to OUT.",
    )
    keygen.add_argument("--out", required=True, help="destination folder")
    keygen.add_argument("--name", required=True, help="site name, e.g. site-a")

    proxy = commands.add_parser(
        "proxy-config",
        help="print the nginx configuration of the closed control plane",
        description="Print the nginx configuration of the front proxy (SuperLink "
        "host: Fleet API for everyone, Control API only with the operator "
        "certificate) or of the operator gateway (operator's machine: presents "
        "the operator certificate); run it with `nginx -p FOLDER -c FILE`.",
    )
    proxy.add_argument("role", choices=("front", "gateway"))
    proxy.add_argument("--tls", required=True, help="folder of `federation certs`")
    proxy.add_argument(
        "--listen", required=True, help="host:port to listen on (gateway: loopback)"
    )
    proxy.add_argument(
        "--upstream",
        required=True,
        help="front: the SuperLink's loopback host:port; gateway: the front's",
    )
    proxy.add_argument(
        "--folder", required=True, help="the proxy's folder (pid, logs, temp files)"
    )
    proxy.add_argument(
        "--server-name",
        default="localhost",
        help="a DNS name in superlink.crt, checked on the upstream connection",
    )


def _print(data: object) -> None:
    print(json.dumps(data, indent=2))


def run_federation(args: argparse.Namespace) -> int:
    """Run the ``federation`` subcommand parsed into ``args``; return exit status."""
    command = args.federation_command
    if command == "up":
        data_options = {
            key: value
            for key, value in (
                ("samples_per_site", args.samples_per_site),
                ("image_size", args.image_size),
                ("spatial_dims", args.spatial_dims),
                ("seed", args.seed),
            )
            if value is not None
        }
        federation = up(
            args.dir,
            args.sites,
            task=args.task,
            connection=args.name,
            ports=args.ports,
            data_options=data_options,
            timeout=args.timeout,
            runtime=args.runtime,
            approve=args.approve if args.approve is not None else ["."],
            threads=args.threads,
        )
        print(f"Federation up in {federation.folder}")
        print(f"  hospitals reach {federation.address} (Fleet API only)")
        print(f"  operator gateway {federation.control_address} (Control API)")
        for site in federation.sites:
            print(f"  {site.name}: node {site.node_id}, data {site.data_dir}")
        print(f"Submit a run:  flwr run . {federation.connection} --stream")
        print(f"Stop it:       flower-medimg federation down --dir {args.dir}")
        return 0
    if command == "proxy-config":
        tls = Path(args.tls).resolve()
        if args.role == "front":
            cert, key, make = "superlink.crt", "superlink.key", front_config
        else:
            cert, key, make = "operator.crt", "operator.key", gateway_config
        files = ProxyTls(
            str(tls / "ca.crt"), str(tls / cert), str(tls / key), args.server_name
        )
        print(make(Path(args.folder).resolve(), args.listen, args.upstream, files))
        return 0
    if command == "down":
        _print(down(args.dir, grace=args.grace))
        return 0
    if command == "status":
        _print(status(args.dir))
        return 0
    if command == "certs":
        files = write_tls_files(args.out, args.host, args.days)
        _print({k: str(v) for k, v in vars(files).items()})
        return 0
    if command == "keygen":
        keys = write_node_keys(Path(args.out), args.name)
        _print({k: str(v) for k, v in vars(keys).items()})
        return 0
    raise AssertionError(f"unhandled command {command!r}")

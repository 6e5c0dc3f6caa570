"""The ``flower-medimg`` command.

``flower-medimg data ...``
    Write synthetic site folders (same as ``python -m flower_medimg.data``).
``flower-medimg federation up|down|status``
    Run a secure federation (TLS, SuperNode authentication) on this machine.
``flower-medimg federation certs|keygen``
    Make the TLS certificates and SuperNode keys of a real deployment.
``flower-medimg site start|stop|status --config site.toml``
    Run a hospital's SuperNode and its warm site runtime from the site's own
    configuration file.
``flower-medimg he provision --out DIR``
    Write the CKKS contexts of homomorphic encryption: the sites' secret one and
    the server's public one.
``flower-medimg registry list|show|compare|export|verify``
    Inspect the model registry, export a version with its model card, check every
    record's signature and file.
``flower-medimg audit verify LOG``
    Verify a run's signed, hash-chained audit log against the registry's head;
    report the first tampered line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flower_medimg.federation.cli import add_federation_parser, run_federation
from flower_medimg.federation.he_cli import add_he_parser, run_he
from flower_medimg.lifecycle.cli import add_lifecycle_parsers, run_lifecycle_command
from flower_medimg.site.cli import add_site_parser, run_site

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``flower-medimg``."""
    parser = argparse.ArgumentParser(
        prog="flower-medimg",
        description="Federated medical imaging on Flower and MONAI.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "data",
        help="write synthetic site folders (see `flower-medimg data --help`)",
        add_help=False,
    )
    add_federation_parser(commands)
    add_site_parser(commands)
    add_he_parser(commands)
    add_lifecycle_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flower-medimg``.

    Parameters
    ----------
    argv : Sequence[str], optional
        Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns
    -------
    int
        Exit status.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "data":
        from flower_medimg.data.cli import main as data_main

        return data_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        if args.command in ("registry", "audit"):
            return run_lifecycle_command(args)
        if args.command == "site":
            return run_site(args)
        if args.command == "he":
            return run_he(args)
        return run_federation(args)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"flower-medimg: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

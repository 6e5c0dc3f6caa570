"""``flower-medimg site start|stop|status|approve|approvals|revoke|ledger``."""

from __future__ import annotations

import argparse
import json

from flower_medimg.site.approvals import approve, read_approvals, revoke
from flower_medimg.site.audit import SITE_AUDIT_LOG, verify_chain
from flower_medimg.site.config import load_site_config
from flower_medimg.site.ledger import PrivacyLedger
from flower_medimg.site.policy import load_policy
from flower_medimg.site.service import site_status, start_site, stop_site

__all__ = ["add_site_parser", "run_site"]

_COMMANDS = (
    ("start", "start the SuperNode (and the warm site runtime)"),
    ("stop", "stop every process `site start` started"),
    ("status", "show the site's processes and the messages it ran"),
    ("approve", "approve an app (app folder, FAB file or SHA-256 hash)"),
    ("approvals", "list the apps the site approved"),
    ("revoke", "withdraw the approval of an app (its hash)"),
    ("ledger", "print the site's privacy ledger, per study and in total"),
    ("audit", "check the site's audit log"),
)


def add_site_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``site`` command and its subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "site",
        help="run this hospital's SuperNode and warm site runtime",
        description="Start, stop or inspect a site, approve the apps it runs and "
        "read its privacy ledger, from its own configuration file (see "
        "docs/deployment.md).",
    )
    commands = parser.add_subparsers(dest="site_command", required=True)
    for name, text in _COMMANDS:
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", required=True, help="the site's TOML file")
        if name == "stop":
            command.add_argument(
                "--grace", type=float, default=10.0, help="seconds before SIGKILL"
            )
        if name in ("approve", "revoke"):
            command.add_argument("app", help="app folder, FAB file or hash")
        if name == "approve":
            command.add_argument("--note", default="", help="who approved it, why")


def run_site(args: argparse.Namespace) -> int:
    """Run the ``site`` subcommand parsed into ``args``; return the exit status."""
    config = load_site_config(args.config)
    command = args.site_command
    if command == "start":
        for record in start_site(config):
            print(f"{record.name}: pid {record.pid}, log {record.log}")
        print(f"Stop it: flower-medimg site stop --config {args.config}")
        return 0
    if command == "stop":
        print(json.dumps(stop_site(config.state_dir, args.grace), indent=2))
        return 0
    if command == "approve":
        print(f"approved {approve(config.state_dir, args.app, note=args.note)}")
        return 0
    if command == "revoke":
        found = revoke(config.state_dir, args.app)
        print(f"revoked {args.app}" if found else f"{args.app} was not approved")
        return 0 if found else 1
    if command == "approvals":
        print(json.dumps(read_approvals(config.state_dir), indent=2))
        return 0
    if command == "ledger":
        delta = load_policy(config.policy).delta
        summary = PrivacyLedger(config.state_dir).summary(delta)
        print(json.dumps(summary, indent=2))
        return 0
    if command == "audit":
        problem, head, lines = verify_chain(config.state_dir / SITE_AUDIT_LOG)
        print(f"BROKEN: {problem}" if problem else f"OK: {lines} lines, head {head}")
        return 1 if problem else 0
    print(json.dumps(site_status(config.state_dir), indent=2))
    return 0

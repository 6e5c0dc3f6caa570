"""``flower-medimg registry ...`` and ``flower-medimg audit verify``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .audit import verify_audit_log
from .registry import ModelRegistry

__all__ = ["add_lifecycle_parsers", "run_lifecycle_command"]


def add_lifecycle_parsers(commands: Any) -> None:
    """Add the ``registry`` and ``audit`` commands to ``flower-medimg``'s parser."""
    registry = commands.add_parser(
        "registry", help="list, show, compare and export registered global models"
    )
    registry.add_argument(
        "--path",
        default="registry",
        help="registry folder (the run config's registry.path; default: registry)",
    )
    actions = registry.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="one line per stored model version")
    listing.add_argument("--run", type=int, help="only this registry run")
    show = actions.add_parser("show", help="a version's full provenance as JSON")
    show.add_argument("version", type=int)
    compare = actions.add_parser("compare", help="metrics, config and weights of two")
    compare.add_argument("first", type=int)
    compare.add_argument("second", type=int)
    export = actions.add_parser(
        "export", help="write model.pt (MONAI state_dict) + model_card.json"
    )
    export.add_argument("version", type=int)
    export.add_argument("out_dir", help="folder to write")

    audit = commands.add_parser("audit", help="check a run's hash-chained audit log")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    verify = audit_actions.add_parser("verify", help="verify the hash chain")
    verify.add_argument("log", help="the run's audit.jsonl")


def _format_metric(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.4f}"


def _list(registry: ModelRegistry, run: int | None) -> None:
    runs = {r["id"]: r for r in registry.runs()}
    print(
        f"{'version':>7} {'run':>4} {'round':>5}  {'strategy':<14} {'status':<9} "
        f"{'marks':<10} {'evaluate/eval-loss':>18} {'central/dice':>12}  sha256"
    )
    for version in registry.versions(run):
        info = runs[version["run"]]
        last = registry.versions(version["run"])[-1]["id"] == version["id"]
        marks = ",".join(
            m
            for m, on in (
                ("best", info["best_version"] == version["id"]),
                ("last", last),
            )
            if on
        )
        print(
            f"{version['id']:>7} {version['run']:>4} {version['round']:>5}  "
            f"{info['strategy']:<14} {info['status']:<9} {marks or '-':<10} "
            f"{_format_metric(version['metrics'], 'evaluate/eval-loss'):>18} "
            f"{_format_metric(version['metrics'], 'central/dice'):>12}  "
            f"{version['sha256'][:16]}"
        )
    for info in runs.values():
        if info["stop_message"] and (run is None or run == info["id"]):
            print(f"run {info['id']} stopped: {info['stop_message']}")


def run_lifecycle_command(args: argparse.Namespace) -> int:
    """Run a ``registry`` or ``audit`` command; return the exit status."""
    if args.command == "audit":
        check = verify_audit_log(args.log)
        print(f"{args.log}: {'OK' if check.ok else 'TAMPERED'}: {check.message}")
        return 0 if check.ok else 2
    registry = ModelRegistry(args.path)
    try:
        if args.action == "list":
            _list(registry, args.run)
        elif args.action == "show":
            print(json.dumps(registry.version(args.version), indent=2))
        elif args.action == "compare":
            print(json.dumps(registry.compare(args.first, args.second), indent=2))
        else:
            out = registry.export(args.version, args.out_dir)
            print(f"exported version {args.version} to {out}")
    finally:
        registry.close()
    return 0

"""``flower-medimg registry ...`` and ``flower-medimg audit verify``.

Both read only, and check signatures with the server's public key: the ``--key``
given, else the key the ServerApp uses on this machine (``$FLOWER_MEDIMG_SERVER_KEY``
or ``~/.flower-medimg/server_ed25519.pem``; its ``.pub`` when present).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .audit import verify_audit_log
from .integrity import VerifyKey, key_path
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
    _add_key_argument(registry)
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
    export.add_argument(
        "--bundle",
        action="store_true",
        help="write a runnable MONAI bundle (task=bundle runs): the run's bundle, "
        "models/model.pt and the provenance in configs/metadata.json",
    )
    export.add_argument(
        "--bundle-root", help="with --bundle: the bundle folder (default: bundle.root)"
    )
    actions.add_parser(
        "verify", help="check every record's signature and every file's SHA-256"
    )

    audit = commands.add_parser("audit", help="check a run's signed audit log")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    verify = audit_actions.add_parser(
        "verify",
        help="check chain, signatures, run-start/run-end and the registry's head "
        "(exit 0 ok, 2 tampered, 3 incomplete)",
    )
    verify.add_argument("log", help="the run's audit.jsonl")
    _add_key_argument(verify)
    verify.add_argument(
        "--no-registry",
        action="store_true",
        help="do not compare the log's head with the registry named in its run-start",
    )


def _add_key_argument(parser: Any) -> None:
    parser.add_argument(
        "--key",
        default="",
        help="the server's public key (.pub) or key file (default: "
        "$FLOWER_MEDIMG_SERVER_KEY, else ~/.flower-medimg/server_ed25519.pem)",
    )


def _format_metric(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.4f}"


def _list(registry: ModelRegistry, run: int | None) -> None:
    runs = {r["id"]: r for r in registry.runs()}
    print(
        f"{'version':>7} {'run':>4} {'round':>5}  {'strategy':<14} {'status':<9} "
        f"{'marks':<10} {'evaluate/eval-loss':>18} {'central/dice':>12}  "
        f"{'signed':<6}  sha256"
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
        signed = (
            "ok"
            if registry.signature_ok("models", version)
            and registry.signature_ok("runs", info)
            else "BAD"
        )
        print(
            f"{version['id']:>7} {version['run']:>4} {version['round']:>5}  "
            f"{info['strategy']:<14} {info['status']:<9} {marks or '-':<10} "
            f"{_format_metric(version['metrics'], 'evaluate/eval-loss'):>18} "
            f"{_format_metric(version['metrics'], 'central/dice'):>12}  "
            f"{signed:<6}  {version['sha256'][:16]}"
        )
    for info in runs.values():
        if info["stop_message"] and (run is None or run == info["id"]):
            print(f"run {info['id']} stopped: {info['stop_message']}")


def run_lifecycle_command(args: argparse.Namespace) -> int:
    """Run a ``registry`` or ``audit`` command; return the exit status."""
    key = VerifyKey.load(args.key or key_path())
    if args.command == "audit":
        check = verify_audit_log(args.log, key, anchors=not args.no_registry)
        print(f"{args.log}: {check.status.upper()}: {check.message}")
        return {"ok": 0, "tampered": 2}.get(check.status, 3)
    registry = ModelRegistry(args.path, key, read_only=True)
    try:
        if args.action == "list":
            _list(registry, args.run)
        elif args.action == "show":
            print(json.dumps(registry.version(args.version), indent=2))
        elif args.action == "compare":
            print(json.dumps(registry.compare(args.first, args.second), indent=2))
        elif args.action == "verify":
            problems = registry.verify()
            for problem in problems:
                print(f"{registry.database}: {problem}")
            print(
                f"{registry.database}: "
                f"{'TAMPERED' if problems else 'OK'}: {len(problems)} problems"
            )
            return 2 if problems else 0
        elif args.bundle:
            from .bundle_export import export_bundle  # MONAI's bundle parser only here

            out = export_bundle(registry, args.version, args.out_dir, args.bundle_root)
            print(f"exported version {args.version} as a MONAI bundle to {out}")
        else:
            out = registry.export(args.version, args.out_dir)
            print(f"exported version {args.version} to {out}")
    finally:
        registry.close()
    return 0

"""``flower-medimg he provision``: the CKKS contexts of a federation (TenSEAL).

The coordinating centre runs it once per study: ``he-secret.ctx`` (with the
secret key) goes to every hospital, out of band, and is named by each site's
``node_config`` ``he-secret-context``; ``he-public.ctx`` (no secret key) goes to
the server, in the folder the run config's ``he.context-dir`` names. Whoever
provisions holds the secret key until the file is deleted: do it on a machine of
one of the hospitals, not on the server.
"""

from __future__ import annotations

import argparse

__all__ = ["add_he_parser", "run_he"]


def add_he_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``he provision`` to the ``flower-medimg`` command."""
    he = commands.add_parser("he", help="homomorphic encryption (CKKS) contexts")
    actions = he.add_subparsers(dest="action", required=True)
    provision = actions.add_parser(
        "provision",
        help="write he-secret.ctx (for the sites only) and he-public.ctx (for "
        "the server)",
    )
    provision.add_argument("--out", required=True, help="folder to write (0700)")
    provision.add_argument("--poly-modulus-degree", type=int, default=8192)


def run_he(args: argparse.Namespace) -> int:
    """Run ``flower-medimg he provision``."""
    from flower_medimg.core.homomorphic import provision_contexts

    secret, public = provision_contexts(
        args.out, poly_modulus_degree=args.poly_modulus_degree
    )
    print(f"secret context (give to every site, never to the server): {secret}")
    print(f"public context (for the server's he.context-dir): {public}")
    return 0

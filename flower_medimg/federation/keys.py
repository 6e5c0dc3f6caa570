"""SuperNode authentication keys: one elliptic-curve key pair per hospital.

Flower 1.42 authenticates a SuperNode by the key it signs its requests with. The
hospital keeps the private key and starts its SuperNode with
``flower-supernode --auth-supernode-private-key <site>.key``; the coordinating centre
registers the public key with ``flwr supernode register <site>.pub <connection>``
before the SuperNode connects. A SuperLink started with ``--enable-supernode-auth``
refuses any key it was not given this way.

Both files use the OpenSSH formats Flower reads (the same as
``ssh-keygen -t ecdsa -b 384 -N "" -f <site>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flower_medimg.core.private_files import private_dir, write_private

__all__ = ["NodeKeys", "write_node_keys"]


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one SuperNode's authentication key pair.

    Attributes
    ----------
    private_key : Path
        OpenSSH private key; stays at the hospital.
    public_key : Path
        OpenSSH public key (one line); sent to the coordinating centre.
    """

    private_key: Path
    public_key: Path


def write_node_keys(folder: str | Path, name: str) -> NodeKeys:
    """Write a new P-384 key pair as ``folder/<name>.key`` and ``folder/<name>.pub``.

    Parameters
    ----------
    folder : str or Path
        Destination folder (created if missing).
    name : str
        File stem, e.g. the site's name; also the public key's comment.

    Returns
    -------
    NodeKeys
        The paths of the two files. The private key is readable by its owner only.
    """
    folder = Path(folder)
    private_dir(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    keys = NodeKeys(folder / f"{name}.key", folder / f"{name}.pub")
    write_private(keys.private_key, private_pem)
    keys.public_key.write_bytes(public_line + f" {name}\n".encode())
    return keys

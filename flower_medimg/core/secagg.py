"""SecAgg+: what the server's wrapper and the sites' mod share (stages, keys, maths).

Papers: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, https://eprint.iacr.org/2017/281 ; Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (SecAgg+), CCS
2020, https://eprint.iacr.org/2020/704

Each site ``u`` sends ``y_u = q(w_u * delta_u) + PRG(b_u) + sum_v +-PRG(s_uv) mod R``:
its quantised, pre-weighted update, a self mask from a seed ``b_u`` and pairwise
masks agreed with each neighbour ``v`` (``+`` if ``u < v``, ``-`` otherwise), which
cancel in the sum. ``b_u`` and the mask key ``sk_u`` are Shamir-shared among the
neighbours (threshold ``t``); for a site whose masked input arrived the survivors
reveal shares of ``b_u``, for one that dropped after sharing, shares of ``sk_u``,
never both, so the server learns only the sum.

One round runs four exchanges: :data:`STAGE_SETUP` (key advertisement),
:data:`STAGE_SHARE_KEYS` (encrypted shares, routed by the server),
:data:`STAGE_COLLECT` (the train message: the site trains and replies masked) and
:data:`STAGE_UNMASK` (shares for the server to remove the masks).

The cryptographic primitives are Flower's (``flwr.common.secure_aggregation``:
ECDH + HKDF key agreement, Fernet encryption, Shamir sharing, stochastic
quantisation). The masks use numpy's PCG64 seeded with the whole 256-bit agreed key
(:func:`mask`): Flower's ``pseudo_rand_gen`` folds its seed to 32 bits, a space a
curious server could search.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

__all__ = [
    "CONFIG_CLIPPING_RANGE",
    "CONFIG_DROPPED",
    "CONFIG_MODULUS_BITS",
    "CONFIG_NEIGHBOURS",
    "CONFIG_QUANTIZATION_BITS",
    "CONFIG_STAGE",
    "CONFIG_SURVIVORS",
    "CONFIG_THRESHOLD",
    "CONFIG_WEIGHT",
    "CURVE",
    "KEY_CIPHERTEXT",
    "KEY_MASK_PUBLIC",
    "KEY_ENCRYPTION_PUBLIC",
    "KEY_SEED_SHARE",
    "KEY_SECRET_SHARE",
    "KEY_SEED_COMMITMENT",
    "METRIC_CLIPPED",
    "RECORD_SECAGG",
    "STAGES",
    "STAGE_COLLECT",
    "STAGE_SETUP",
    "STAGE_SHARE_KEYS",
    "STAGE_UNMASK",
    "add_mask",
    "agreed_key",
    "check_parameters",
    "dequantize_sum",
    "load_public_key",
    "mask",
    "masked_sum",
    "modulus_bits",
    "neighbours",
    "node_key",
    "pairwise_seed",
    "private_key_bytes",
    "private_key_from_bytes",
    "public_key_bytes",
    "quantize_update",
    "seed_commitment",
    "signed_pairwise",
    "wire_dtype",
]

# ---- the exchanges, in order ------------------------------------------------------
STAGE_SETUP = "setup"
STAGE_SHARE_KEYS = "share-keys"
STAGE_COLLECT = "collect"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_SETUP, STAGE_SHARE_KEYS, STAGE_COLLECT, STAGE_UNMASK)

#: ConfigRecord of the protocol in every SecAgg+ message and reply.
RECORD_SECAGG = "secagg"

# ---- keys the server sends --------------------------------------------------------
CONFIG_STAGE = "stage"
CONFIG_NEIGHBOURS = "neighbours"  # node ids the site shares with (itself excluded)
CONFIG_THRESHOLD = "threshold"  # t: shares needed to rebuild a secret
CONFIG_CLIPPING_RANGE = "clipping-range"  # c: w * delta is clipped to [-c, c]
CONFIG_QUANTIZATION_BITS = "quantization-bits"  # b: q(.) takes values in [0, 2^b - 1]
CONFIG_MODULUS_BITS = "modulus-bits"  # masked inputs live mod 2^m
CONFIG_WEIGHT = "weight"  # w_u: the site's share of the weighted mean
CONFIG_SURVIVORS = "survivors"  # sites whose masked input arrived
CONFIG_DROPPED = "dropped"  # sites that shared keys but sent no masked input

# ---- keys the sites send (per node: "<key>:<node id>") ----------------------------
KEY_MASK_PUBLIC = "mask-public-key"
KEY_ENCRYPTION_PUBLIC = "encryption-public-key"
KEY_CIPHERTEXT = "ciphertext"  # encrypted shares for one neighbour
#: SHA-256 of the site's mask seed: lets the server tell a wrong share from a right one
KEY_SEED_COMMITMENT = "seed-commitment"
KEY_SEED_SHARE = "seed-share"  # a share of a survivor's b
KEY_SECRET_SHARE = "secret-share"  # a share of a dropped site's sk
#: Fraction of the site's weighted update coordinates clipped to ``[-c, c]``.
METRIC_CLIPPED = "secagg-clipped"

#: The curve of both key agreements (Flower's ``generate_shared_key`` takes EC keys).
CURVE = ec.SECP256R1()
_SCALAR_BYTES = 32


def node_key(key: str, node_id: int) -> str:
    """Return the per-node key ``"<key>:<node id>"``."""
    return f"{key}:{int(node_id)}"


def seed_commitment(seed: bytes) -> bytes:
    """Return the SHA-256 of a mask seed (sent with the shares, checked on rebuild)."""
    return hashlib.sha256(seed).digest()


def check_parameters(
    num_shares: int, threshold: int, quantization_bits: int, clipping_range: float
) -> None:
    """Refuse protocol parameters that are insecure or cannot be computed.

    Parameters
    ----------
    num_shares : int
        Sites holding shares of one site's secrets (its neighbours and itself).
    threshold : int
        Shares needed to rebuild a secret; more than half of ``num_shares``, so
        that no two disjoint sets of sites can rebuild both of a site's secrets.
    quantization_bits : int
        Bits of one quantised value, in ``[2, 30]``.
    clipping_range : float
        Positive bound ``c``.

    Raises
    ------
    ValueError
        Naming the parameter and what is valid.
    """
    if num_shares < 2:
        raise ValueError(
            f"secagg needs at least 2 sites to share with, got {num_shares}"
        )
    if not 2 * threshold > num_shares or threshold > num_shares:
        raise ValueError(
            f"secagg threshold {threshold} must be more than half of the {num_shares} "
            "sites holding shares and at most all of them"
        )
    if not 2 <= quantization_bits <= 30:
        raise ValueError(
            f"secagg quantization bits must be in [2, 30], got {quantization_bits}"
        )
    if not (math.isfinite(clipping_range) and clipping_range > 0):
        raise ValueError(f"secagg clipping range must be > 0, got {clipping_range}")


def modulus_bits(quantization_bits: int, num_sites: int) -> int:
    """Bits of the modulus that holds the sum of ``num_sites`` quantised values."""
    return quantization_bits + max(1, math.ceil(math.log2(max(num_sites, 2))))


def wire_dtype(bits: int) -> np.dtype:
    """Return the smallest unsigned dtype that holds values mod ``2^bits``."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if bits <= 8 * np.dtype(dtype).itemsize:
            return np.dtype(dtype)
    raise ValueError(f"no dtype holds {bits} bits")


def neighbours(nodes: Sequence[int], num_shares: int) -> dict[int, list[int]]:
    """Return each node's neighbours on SecAgg+'s ring (the others when all share).

    The nodes are ordered by id; a node's neighbours are the ``num_shares - 1``
    nodes nearest to it on the ring (alternating after and before it), so the
    relation is symmetric when ``num_shares`` is odd or equals the node count.

    Parameters
    ----------
    nodes : Sequence[int]
        The round's node ids.
    num_shares : int
        Sites holding shares of one site's secrets, itself included
        (``>= len(nodes)``: every node shares with every other, Bonawitz's SecAgg).
    """
    ring = sorted(int(n) for n in nodes)
    count = len(ring)
    if num_shares >= count:
        return {node: [n for n in ring if n != node] for node in ring}
    half = (num_shares - 1) // 2
    result: dict[int, list[int]] = {}
    for position, node in enumerate(ring):
        near = {
            ring[(position + step) % count] for step in range(-half, half + 1) if step
        }
        result[node] = sorted(near)
    return result


# ---- keys ------------------------------------------------------------------------
def public_key_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the public key as an uncompressed X9.62 point."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """Load a peer's public key (``ValueError`` if not a point of :data:`CURVE`)."""
    if not isinstance(data, bytes):
        raise ValueError(f"a public key must be bytes, got {type(data).__name__}")
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)


def private_key_bytes(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the private scalar as 32 bytes (what is Shamir-shared)."""
    return private_key.private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")


def private_key_from_bytes(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Rebuild a private key from its 32-byte scalar; ``ValueError`` if invalid."""
    if len(data) != _SCALAR_BYTES:
        raise ValueError(f"a private key is {_SCALAR_BYTES} bytes, got {len(data)}")
    return ec.derive_private_key(int.from_bytes(data, "big"), CURVE)


def agreed_key(
    private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey
) -> bytes:
    """Return the key two sites agree on (Flower's ECDH + HKDF), for Fernet."""
    return generate_shared_key(private_key, public_key)


def pairwise_seed(
    private_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey
) -> bytes:
    """Return the 32-byte seed of the pairwise mask two sites agree on."""
    return base64.urlsafe_b64decode(agreed_key(private_key, public_key))


# ---- masks and quantisation --------------------------------------------------------
def mask(seed: bytes, shapes: Sequence[tuple[int, ...]], bits: int) -> list[np.ndarray]:
    """Pseudo-random integers in ``[0, 2^bits)`` for each shape, from a 32-byte seed.

    ``seed`` is a self-mask seed ``b_u`` or a :func:`pairwise_seed`; the generator
    is PCG64 seeded with all of its 256 bits.
    """
    generator = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(int.from_bytes(seed, "big")))
    )
    return [
        generator.integers(0, 1 << bits, size=shape, dtype=np.uint64)
        for shape in shapes
    ]


def add_mask(totals: list[np.ndarray], seed: bytes, sign: int, bits: int) -> None:
    """Add (``sign`` +1) or subtract (-1) the mask of ``seed``, in place, mod 2^bits.

    ``totals`` are ``uint64`` arrays; one mask is generated at a time, so masking
    with many neighbours needs the memory of one extra copy of the update.
    """
    wrap = np.uint64((1 << bits) - 1)
    values = mask(seed, [t.shape for t in totals], bits)
    for total, value in zip(totals, values, strict=True):
        (np.add if sign > 0 else np.subtract)(total, value, out=total)
        np.bitwise_and(total, wrap, out=total)


def quantize_update(
    arrays: Sequence[np.ndarray], clipping_range: float, bits: int
) -> tuple[list[np.ndarray], float]:
    """Clip to ``[-c, c]`` and stochastically round to ``[0, 2^bits - 1]`` (Flower's).

    Returns
    -------
    tuple[list[np.ndarray], float]
        The quantised arrays (``uint64``) and the fraction of values clipped.
    """
    flat = [np.asarray(a, dtype=np.float64) for a in arrays]
    total = sum(a.size for a in flat)
    clipped = sum(int(np.count_nonzero(np.abs(a) > clipping_range)) for a in flat)
    quantised = quantize(flat, clipping_range, (1 << bits) - 1)
    return [np.asarray(q, dtype=np.uint64) for q in quantised], clipped / max(total, 1)


def dequantize_sum(
    total: Sequence[np.ndarray], clipping_range: float, bits: int, count: int
) -> list[np.ndarray]:
    """Turn the sum of ``count`` quantised values back into the sum of the inputs.

    ``dequantize`` maps ``q`` to ``q * 2c / Q - c``; a sum of ``count`` values then
    carries ``count`` shifts of ``-c`` where ``dequantize`` removes one, so
    ``(count - 1) * c`` is taken off.
    """
    values = dequantize(
        [np.asarray(t, dtype=np.float64) for t in total],
        clipping_range,
        (1 << bits) - 1,
    )
    return [v - (count - 1) * clipping_range for v in values]


def signed_pairwise(node: int, other: int) -> int:
    """+1 if ``node`` adds the pair's mask, -1 if it subtracts it."""
    return 1 if node < other else -1


def masked_sum(
    arrays: Mapping[int, Sequence[np.ndarray]], bits: int
) -> list[np.ndarray]:
    """Sum the nodes' masked inputs mod ``2^bits``."""
    modulus_mask = np.uint64((1 << bits) - 1)
    total: list[np.ndarray] | None = None
    for values in arrays.values():
        if total is None:
            total = [np.asarray(v, dtype=np.uint64).copy() for v in values]
        else:
            for acc, value in zip(total, values, strict=True):
                np.add(acc, np.asarray(value, dtype=np.uint64), out=acc)
                np.bitwise_and(acc, modulus_mask, out=acc)
    if total is None:
        raise ValueError("no masked input to sum")
    return total

"""CKKS homomorphic encryption of model arrays: what the sites and the server share.

Papers: HEFL, homomorphically-encrypted federated learning (Zhang et al., review
ref. 25); CKKS approximate homomorphic encryption (Cheon, Kim, Kim & Song,
ASIACRYPT 2017, https://eprint.iacr.org/2016/421); TenSEAL (Benaissa et al. 2021,
https://arxiv.org/abs/2104.03152), whose public API is used here.

One CKKS context is provisioned for a federation (:func:`provision_contexts`): the
sites get it *with* the secret key (``he-secret.ctx``), the server *without* it
(``he-public.ctx``), so the server can add ciphertexts and multiply them by
plaintext scalars but never decrypt. A float array travels as its flattened values
packed into CKKS vectors of at most ``poly_modulus_degree / 2`` slots ("chunks").

Wire format of an encrypted array ``key`` inside an ArrayRecord: two entries,

- ``"<key>.ckks"``: a 1-d ``uint8`` array, :data:`MAGIC` (4 bytes), the key id of the
  public key the ciphertexts were made under (:data:`KEY_ID_BYTES` bytes), the
  number of chunks ``n`` (uint32, little endian), ``n`` chunk lengths (uint64, little
  endian), then the ``n`` serialised TenSEAL CKKS vectors back to back;
- ``"<key>.ckks-shape"``: a 1-d ``int64`` array, the shape of the plaintext array.

The key id is a fingerprint of the public key (:func:`key_id`): it lets a site or
the server tell ciphertexts made under another provisioning apart from their own
(decrypting those does not fail, it gives noise). It is an integrity check against
misconfiguration, not an authentication: anybody can copy it.

tenseal is an optional dependency (``pip install flower-medimg[he]``): it is
imported inside the functions that need it, never when this module is imported.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .private_files import private_dir, write_private

__all__ = [
    "CIPHERTEXT_SUFFIX",
    "KEY_ID_BYTES",
    "MAGIC",
    "PUBLIC_CONTEXT_FILE",
    "SECRET_CONTEXT_FILE",
    "SHAPE_SUFFIX",
    "CiphertextLayout",
    "add_and_scale",
    "check_shape",
    "ciphertext_key",
    "create_context",
    "decrypt_array",
    "encrypt_array",
    "is_encrypted_key",
    "key_id",
    "layout_of",
    "load_public_context",
    "load_secret_context",
    "provision_contexts",
    "shape_key",
    "unpack_chunks",
    "validate_chunks",
]

SECRET_CONTEXT_FILE = "he-secret.ctx"
PUBLIC_CONTEXT_FILE = "he-public.ctx"
CIPHERTEXT_SUFFIX = ".ckks"
SHAPE_SUFFIX = ".ckks-shape"
MAGIC = b"CKV1"
KEY_ID_BYTES = 16
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def _tenseal() -> ModuleType:
    """Import tenseal, or say how to install it."""
    try:
        import tenseal  # optional dependency, imported on use
    except ImportError as err:
        raise ImportError(
            "homomorphic encryption needs TenSEAL: pip install flower-medimg[he]"
        ) from err
    return tenseal


# ---- contexts ---------------------------------------------------------------------


def create_context(
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: Sequence[int] = (60, 40, 40),
    scale_bits: int = 40,
) -> Any:
    """Create a CKKS context with a secret key and relinearisation keys.

    Parameters follow NVFlare's provisioning (degree 8192, moduli [60, 40, 40],
    scale 2^40): one ciphertext x plaintext multiplication (depth 1), ~128-bit
    security, 4096 slots per ciphertext.

    Parameters
    ----------
    poly_modulus_degree : int (default: 8192)
        Ring degree; a ciphertext holds ``poly_modulus_degree / 2`` values.
    coeff_mod_bit_sizes : Sequence[int] (default: (60, 40, 40))
        Bit sizes of the coefficient-modulus primes.
    scale_bits : int (default: 40)
        ``log2`` of the encoding scale.

    Returns
    -------
    tenseal.Context
        The context, holding the secret key.
    """
    ts = _tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
    )
    context.global_scale = 2.0**scale_bits
    context.generate_relin_keys()
    return context


def provision_contexts(
    folder: str | Path,
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: Sequence[int] = (60, 40, 40),
    scale_bits: int = 40,
) -> tuple[Path, Path]:
    """Write the sites' secret context and the server's public context.

    Both files are written ``0o600`` in a ``0o700`` folder. Hand
    ``he-secret.ctx`` to every site (never to the server) and ``he-public.ctx``
    to the server.

    Parameters
    ----------
    folder : str or Path
        Where to write; created if missing.
    poly_modulus_degree, coeff_mod_bit_sizes, scale_bits
        See :func:`create_context`.

    Returns
    -------
    tuple[Path, Path]
        The secret and the public context file.
    """
    context = create_context(poly_modulus_degree, coeff_mod_bit_sizes, scale_bits)
    folder = private_dir(folder)
    secret = write_private(
        folder / SECRET_CONTEXT_FILE, context.serialize(save_secret_key=True)
    )
    public = write_private(
        folder / PUBLIC_CONTEXT_FILE, context.serialize(save_secret_key=False)
    )
    return secret, public


def _load_context(path: str | Path) -> Any:
    ts = _tenseal()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(
            f"cannot read the TenSEAL context file {path}: {err.strerror}"
        ) from err
    try:
        context = ts.context_from(data)
    except Exception as err:  # TenSEAL raises ValueError or RuntimeError
        raise ValueError(f"{path} is not a serialised TenSEAL context ({err})") from err
    if context.public_key() is None:
        raise ValueError(f"{path}: the TenSEAL context holds no public key")
    return context


def load_secret_context(path: str | Path) -> Any:
    """Load a site's context; it must hold the secret key.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a TenSEAL context or holds no
        secret key (the file names it).
    """
    context = _load_context(path)
    if not context.has_secret_key():
        raise ValueError(
            f"{path} holds no secret key: a site needs {SECRET_CONTEXT_FILE}, "
            f"not the server's {PUBLIC_CONTEXT_FILE}"
        )
    return context


def load_public_context(path: str | Path) -> Any:
    """Load the server's context; it must not hold the secret key.

    Raises
    ------
    ValueError
        If the file is missing, unreadable, not a TenSEAL context or holds the
        secret key (the server must never be able to decrypt).
    """
    context = _load_context(path)
    if context.has_secret_key():
        raise ValueError(
            f"{path} holds the secret key: the server must get "
            f"{PUBLIC_CONTEXT_FILE} (serialised without it), never "
            f"{SECRET_CONTEXT_FILE}"
        )
    return context


def key_id(context: Any) -> bytes:
    """Fingerprint of the context's public key (:data:`KEY_ID_BYTES` bytes)."""
    public = context.serialize(
        save_public_key=True,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return hashlib.sha256(public).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True)
class CiphertextLayout:
    """What every fresh ciphertext of a context looks like.

    Attributes
    ----------
    key_id : bytes
        Fingerprint of the public key.
    slots : int
        Values per ciphertext (``poly_modulus_degree / 2``).
    levels : int
        Number of coefficient-modulus primes of a fresh ciphertext.
    scale : float
        Encoding scale of a fresh ciphertext.
    """

    key_id: bytes
    slots: int
    levels: int
    scale: float


def layout_of(context: Any) -> CiphertextLayout:
    """Describe the fresh ciphertexts of ``context`` (encrypts one zero)."""
    ts = _tenseal()
    probe = ts.ckks_vector(context, [0.0]).ciphertext()[0]
    return CiphertextLayout(
        key_id=key_id(context),
        slots=probe.poly_modulus_degree() // 2,
        levels=probe.coeff_modulus_size(),
        scale=float(probe.scale),
    )


# ---- wire format ------------------------------------------------------------------


def ciphertext_key(key: str) -> str:
    """ArrayRecord key of the ciphertext bytes of array ``key``."""
    return f"{key}{CIPHERTEXT_SUFFIX}"


def shape_key(key: str) -> str:
    """ArrayRecord key of the shape of the encrypted array ``key``."""
    return f"{key}{SHAPE_SUFFIX}"


def is_encrypted_key(key: str, dtype: np.dtype, prefixes: Sequence[str] | None) -> bool:
    """Whether array ``key`` is encrypted: a float array matching ``prefixes``.

    ``prefixes=None`` selects every floating-point array.
    """
    if np.dtype(dtype).kind != "f":
        return False
    return prefixes is None or any(key.startswith(p) for p in prefixes)


def _pack(identity: bytes, chunks: Sequence[bytes]) -> np.ndarray:
    header = [MAGIC, identity, _COUNT.pack(len(chunks))]
    header += [_LENGTH.pack(len(chunk)) for chunk in chunks]
    return np.frombuffer(b"".join([*header, *chunks]), dtype=np.uint8).copy()


def unpack_chunks(packed: np.ndarray, identity: bytes) -> list[bytes]:
    """Split a ``"<key>.ckks"`` array into its serialised ciphertexts.

    Raises
    ------
    ValueError
        If the array is not 1-d ``uint8``, the header is malformed, the key id is
        not ``identity`` or the lengths do not add up.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(
            f"ciphertext must be a 1-d uint8 array, got {packed.dtype} "
            f"of shape {packed.shape}"
        )
    data = packed.tobytes()
    start = len(MAGIC) + KEY_ID_BYTES + _COUNT.size
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise ValueError("ciphertext header is malformed")
    if data[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES] != identity:
        raise ValueError(
            "ciphertext was made under another public key (key id differs from "
            "this context's): the provisioning differs"
        )
    (count,) = _COUNT.unpack_from(data, start - _COUNT.size)
    offset = start + count * _LENGTH.size
    if offset > len(data):
        raise ValueError(f"ciphertext header announces {count} chunks; bytes missing")
    lengths = [
        _LENGTH.unpack_from(data, start + i * _LENGTH.size)[0] for i in range(count)
    ]
    if any(n == 0 for n in lengths) or offset + sum(lengths) != len(data):
        raise ValueError("ciphertext chunk lengths do not match its size")
    chunks = []
    for length in lengths:
        chunks.append(data[offset : offset + length])
        offset += length
    return chunks


def check_shape(shape: np.ndarray) -> tuple[int, ...]:
    """Validate a ``"<key>.ckks-shape"`` array and return the shape.

    Raises
    ------
    ValueError
        If it is not a 1-d int64 array of non-negative sizes.
    """
    shape = np.asarray(shape)
    if shape.dtype != np.int64 or shape.ndim != 1 or (shape < 0).any():
        raise ValueError(
            f"shape must be a 1-d int64 array of sizes >= 0, got {shape.dtype} "
            f"{shape.tolist()}"
        )
    return tuple(int(n) for n in shape)


# ---- kernels ----------------------------------------------------------------------


def encrypt_array(
    context: Any, layout: CiphertextLayout, values: np.ndarray, factor: float = 1.0
) -> np.ndarray:
    """Encrypt ``factor * values`` (flattened) into a ``"<key>.ckks"`` array.

    HEFL's site step: the site sends ``Enc(n_k * theta_k)``, with ``factor`` its
    aggregation weight ``n_k``, so that the server needs only additions and one
    plaintext multiplication.

    Parameters
    ----------
    context : tenseal.Context
        A context with the public key (the site's).
    layout : CiphertextLayout
        ``layout_of(context)``.
    values : np.ndarray
        Finite floating-point values, any shape.
    factor : float (default: 1.0)
        Multiplies the values before encryption.

    Returns
    -------
    np.ndarray
        The packed ciphertexts (1-d uint8).
    """
    ts = _tenseal()
    flat = np.asarray(values, dtype=np.float64).ravel() * float(factor)
    chunks = [
        ts.ckks_vector(context, flat[i : i + layout.slots]).serialize()
        for i in range(0, flat.size, layout.slots)
    ]
    return _pack(layout.key_id, chunks)


def _vectors(
    context: Any, layout: CiphertextLayout, chunks: Sequence[bytes], size: int
) -> Iterator[Any]:
    """Deserialise ``chunks`` and check that they hold ``size`` values in all."""
    ts = _tenseal()
    expected = [min(layout.slots, size - i) for i in range(0, size, layout.slots)]
    if len(chunks) != len(expected):
        raise ValueError(f"{len(chunks)} ciphertext chunks, expected {len(expected)}")
    for i, (chunk, values) in enumerate(zip(chunks, expected, strict=True)):
        try:
            vector = ts.ckks_vector_from(context, chunk)
        except Exception as err:  # TenSEAL raises ValueError or RuntimeError
            raise ValueError(f"chunk {i} is not a CKKS vector ({err})") from err
        if vector.size() != values:
            raise ValueError(f"chunk {i} holds {vector.size()} values, not {values}")
        yield vector


def validate_chunks(
    context: Any, layout: CiphertextLayout, packed: np.ndarray, size: int
) -> list[bytes]:
    """Check that ``packed`` holds fresh ciphertexts of ``size`` values.

    Every chunk must deserialise under ``context``, hold the expected number of
    values and be a fresh two-polynomial ciphertext at ``layout``'s level and
    scale (so that adding it cannot fail).

    Returns
    -------
    list[bytes]
        The serialised chunks.

    Raises
    ------
    ValueError
        Saying which chunk fails and why.
    """
    chunks = unpack_chunks(packed, layout.key_id)
    for i, vector in enumerate(_vectors(context, layout, chunks, size)):
        ciphertext = vector.ciphertext()[0]
        if (
            ciphertext.size() != 2
            or ciphertext.coeff_modulus_size() != layout.levels
            or not math.isclose(ciphertext.scale, layout.scale, rel_tol=1e-9)
        ):
            raise ValueError(f"chunk {i} is not a fresh ciphertext of this context")
    return chunks


def add_and_scale(
    context: Any,
    layout: CiphertextLayout,
    replies: Sequence[Sequence[bytes]],
    coefficients: Sequence[float],
) -> np.ndarray:
    """Return ``Enc(sum_k c_k * x_k)`` from the replies' ciphertexts ``Enc(x_k)``.

    HEFL's server step with the public context only: ciphertext + ciphertext and
    ciphertext x plaintext (depth 1). With equal coefficients (FedAvg: every
    ``c_k = 1 / sum(n_k)``) the ciphertexts are added first and multiplied once.

    Parameters
    ----------
    context : tenseal.Context
        The server's public context.
    layout : CiphertextLayout
        ``layout_of(context)``.
    replies : Sequence[Sequence[bytes]]
        Per reply, its validated chunks (:func:`validate_chunks`), all of the same
        sizes.
    coefficients : Sequence[float]
        One plaintext coefficient per reply.

    Returns
    -------
    np.ndarray
        The packed aggregate (1-d uint8), under the same key id.
    """
    ts = _tenseal()
    uniform = len(set(coefficients)) == 1
    out = []
    for j in range(len(replies[0])):
        vectors = [ts.ckks_vector_from(context, chunks[j]) for chunks in replies]
        if uniform:
            total = _sum(vectors) * float(coefficients[0])
        else:
            total = _sum(
                v * float(c) for v, c in zip(vectors, coefficients, strict=True)
            )
        out.append(total.serialize())
    return _pack(layout.key_id, out)


def _sum(vectors: Iterable[Any]) -> Any:
    iterator = iter(vectors)
    total = next(iterator)
    for vector in iterator:
        total.add_(vector)
    return total


def decrypt_array(
    context: Any, layout: CiphertextLayout, packed: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Decrypt a ``"<key>.ckks"`` array into a float32 array of ``shape``.

    Parameters
    ----------
    context : tenseal.Context
        A context holding the secret key (the site's). With the server's public
        context TenSEAL raises ``ValueError``.
    layout : CiphertextLayout
        ``layout_of(context)``.
    packed : np.ndarray
        The packed ciphertexts.
    shape : Sequence[int]
        The plaintext array's shape.

    Raises
    ------
    ValueError
        If the ciphertexts are malformed, made under another key, do not hold
        ``prod(shape)`` values, or decrypt to non-finite values.
    """
    chunks = unpack_chunks(packed, layout.key_id)
    parts = [
        np.asarray(vector.decrypt(), dtype=np.float64)
        for vector in _vectors(context, layout, chunks, math.prod(shape))
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if not np.isfinite(flat).all():
        raise ValueError("ciphertext decrypts to non-finite values")
    return flat.astype(np.float32).reshape(tuple(shape))

"""A Flower mod that keeps a site's weights encrypted outside the site (CKKS).

Papers: HEFL (Zhang et al., review ref. 25); CKKS (Cheon et al., ASIACRYPT 2017,
https://eprint.iacr.org/2016/421); TenSEAL (Benaissa et al. 2021,
https://arxiv.org/abs/2104.03152).

The mod wraps the ClientApp's train and evaluate functions. It decrypts the
encrypted arrays of the global model it receives (``"<key>.ckks"`` +
``"<key>.ckks-shape"``, see :mod:`flower_medimg.core.homomorphic`) into float32
arrays under their own keys, so the ClientApp sees an ordinary model; on a train
reply it encrypts ``n_k * theta_k`` of every selected array, ``n_k`` being the
reply's weighting metric (``num-examples`` unless the server's train config names
another under ``he-weight-key``). The server
(:class:`~flower_medimg.strategies.homomorphic.HomomorphicFedAvg`) adds the
ciphertexts and multiplies by ``1 / sum(n_k)`` without being able to decrypt::

    he = HomomorphicEncryptionMod("/secure/he-secret.ctx")

    @app.train(mods=[he])
    def train(msg, context): ...

    @app.evaluate(mods=[he])
    def evaluate(msg, context): ...

Put it outermost (first in ``mods``): every other mod must see plaintext.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from flower_medimg.core import protocol
from flower_medimg.core.homomorphic import (
    CIPHERTEXT_SUFFIX,
    SHAPE_SUFFIX,
    check_shape,
    ciphertext_key,
    decrypt_array,
    encrypt_array,
    is_encrypted_key,
    layout_of,
    load_secret_context,
    shape_key,
)

from .mods import mod_error_reply

__all__ = ["HomomorphicEncryptionMod"]


class _ModError(Exception):
    """A precondition of the mod failed; the message becomes an error reply."""


class HomomorphicEncryptionMod:
    """Decrypt the received global model and encrypt the train reply (CKKS).

    Parameters
    ----------
    secret_context_path : str or Path
        The site's TenSEAL context, holding the secret key (``he-secret.ctx``
        from :func:`~flower_medimg.core.homomorphic.provision_contexts`).
    keys : Optional[Sequence[str]] (default: None)
        Prefixes of the array keys to encrypt; ``None`` encrypts every
        floating-point array. Must match the server's ``keys``.

    Raises
    ------
    ValueError
        If the context file is missing, unreadable or holds no secret key.
    ImportError
        If TenSEAL is not installed.
    """

    name = "HomomorphicEncryptionMod"

    def __init__(
        self, secret_context_path: str | Path, keys: Sequence[str] | None = None
    ) -> None:
        self.context = load_secret_context(secret_context_path)
        self.layout = layout_of(self.context)
        self.keys = None if keys is None else tuple(keys)

    def __repr__(self) -> str:
        return f"{self.name}(keys={self.keys})"

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Decrypt train/evaluate messages, encrypt train replies.

        Other message types pass through untouched, and so do error replies.
        """
        kind = msg.metadata.message_type
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, context)
        try:
            for name, record in list(msg.content.array_records.items()):
                msg.content[name] = self._decrypt_record(record)
        except _ModError as err:
            return mod_error_reply(msg, f"{self.name}: {err}")
        reply = call_next(msg, context)
        if kind != MessageType.TRAIN or reply.has_error():
            return reply
        try:
            weight = self._weight(msg, reply)
            for name, record in list(reply.content.array_records.items()):
                reply.content[name] = self._encrypt_record(record, weight)
        except _ModError as err:
            return mod_error_reply(msg, f"{self.name}: {err}")
        return reply

    def _decrypt_record(self, record: ArrayRecord) -> ArrayRecord:
        """Replace each ciphertext/shape pair by the decrypted float32 array."""
        out = ArrayRecord()
        decrypted = 0
        for key, array in record.items():
            if key.endswith(SHAPE_SUFFIX):
                if ciphertext_key(key[: -len(SHAPE_SUFFIX)]) not in record:
                    raise _ModError(f"array '{key}' has no ciphertext next to it")
                continue
            if not key.endswith(CIPHERTEXT_SUFFIX):
                out[key] = array
                continue
            base = key[: -len(CIPHERTEXT_SUFFIX)]
            if shape_key(base) not in record:
                raise _ModError(f"encrypted array '{base}' comes without its shape")
            try:
                shape = check_shape(record[shape_key(base)].numpy())
                values = decrypt_array(self.context, self.layout, array.numpy(), shape)
            except ValueError as err:
                raise _ModError(f"cannot decrypt array '{base}': {err}") from err
            out[base] = Array(values)
            decrypted += 1
        if decrypted:
            log(INFO, "%s: decrypted %d arrays", self.name, decrypted)
        return out

    def _weight(self, msg: Message, reply: Message) -> float:
        """Return the reply's weighting metric: the factor of its encrypted weights."""
        configs = msg.content.config_records
        config = next(iter(configs.values())) if configs else {}
        key = config.get(protocol.CONFIG_HE_WEIGHT_KEY, protocol.METRIC_NUM_EXAMPLES)
        records = list(reply.content.metric_records.values())
        if len(records) != 1:
            raise _ModError(
                f"expects exactly one MetricRecord in the reply, found {len(records)}"
            )
        value = records[0].get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise _ModError(
                f"the reply's weighting metric '{key}' must be a positive number, "
                f"got {value!r}"
            )
        return float(value)

    def _encrypt_record(self, record: ArrayRecord, weight: float) -> ArrayRecord:
        """Replace each selected array by ``Enc(weight * values)`` and its shape."""
        out = ArrayRecord()
        encrypted = 0
        for key, array in record.items():
            if key.endswith((CIPHERTEXT_SUFFIX, SHAPE_SUFFIX)):
                raise _ModError(
                    f"array key '{key}' ends with a suffix reserved for ciphertexts "
                    f"('{CIPHERTEXT_SUFFIX}', '{SHAPE_SUFFIX}')"
                )
            if not is_encrypted_key(key, np.dtype(array.dtype), self.keys):
                out[key] = array
                continue
            values = array.numpy()
            if not np.isfinite(values).all():
                raise _ModError(f"array '{key}' holds non-finite values")
            packed = encrypt_array(self.context, self.layout, values, weight)
            out[ciphertext_key(key)] = Array(packed)
            out[shape_key(key)] = Array(np.asarray(values.shape, dtype=np.int64))
            encrypted += 1
        log(
            INFO,
            "%s: encrypted %d arrays (weight %g), %d sent in plaintext",
            self.name,
            encrypted,
            weight,
            len(out) - 2 * encrypted,
        )
        return out

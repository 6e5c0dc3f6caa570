"""A Flower mod that compresses a site's update before it leaves the site.

Paper: Lin et al., "Deep Gradient Compression", ICLR 2018,
https://arxiv.org/abs/1712.01887 (top-k with error feedback); the kernels are in
:mod:`flower_medimg.core.compression`. The server decodes the reply with
:class:`flower_medimg.strategies.compressed.DecompressUpdates` before anything else
reads it.

The mod must be the outermost mod (first in the list), so that it encodes the
update the other mods (clipping, sparse sharing) produced::

    app = ClientApp()

    @app.train(mods=[CompressionMod("int8"), safe_fixedclipping_mod])
    def train(msg, context): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from flower_medimg.core import protocol
from flower_medimg.core.compression import (
    DOWNLINKS,
    check_codec,
    encode,
    payload_bytes,
    side_key,
    widen_model,
)
from flower_medimg.core.protocol import (
    CONFIG_CODEC,
    CONFIG_DOWNLINK,
    CONFIG_FRACTION,
    INFO_CODEC,
    INFO_ENCODED_KEYS,
    METRIC_COMPRESSED_BYTES,
    RECORD_CODEC,
    RECORD_CODEC_INFO,
)

from .mods import mod_error_reply

__all__ = ["STATE_RESIDUAL", "CompressionMod"]

#: Key of top-k's residual (an ArrayRecord) in ``context.state``.
STATE_RESIDUAL = "compression-residual"


def _widen_downlink(msg: Message) -> None:
    """Give the ClientApp float32 arrays where the server sent float16 (in place)."""
    config = msg.content.config_records.get(protocol.RECORD_CONFIG)
    downlink = "none" if config is None else config.get(CONFIG_DOWNLINK, "none")
    if downlink not in DOWNLINKS:
        raise ValueError(
            f"unknown downlink {downlink!r}; valid downlinks are {list(DOWNLINKS)}"
        )
    if downlink == "none":
        return
    for name, record in list(msg.content.array_records.items()):
        widened = widen_model({key: record[key].numpy() for key in record})
        msg.content[name] = ArrayRecord({k: Array(v) for k, v in widened.items()})


@dataclass
class _EncodedArrays:
    """What leaves the site: payload and side data by key, encoded keys, residual."""

    data: dict[str, np.ndarray] = field(default_factory=dict)
    side: dict[str, np.ndarray] = field(default_factory=dict)
    encoded: list[str] = field(default_factory=list)
    residual: dict[str, np.ndarray] = field(default_factory=dict)

    def num_bytes(self) -> int:
        return payload_bytes([*self.data.values(), *self.side.values()])


class CompressionMod:
    """Send a train reply's update ``theta_k - theta_global`` compressed.

    For every floating-point array the update is encoded with the codec
    (:data:`~flower_medimg.core.compression.CODECS`): ``"fp16"`` (float16 update),
    ``"int8"`` (int8 update, scale per tensor, stochastic rounding), ``"topk"``
    (float32 values of the largest ``fraction`` of ``update + residual``, with error
    feedback) or ``"none"`` (the arrays as they are). The reply then carries:

    - its ArrayRecord (``"arrays"``): per key the encoded payload; non-float arrays
      and arrays the codec refuses (fp16 overflow, NaN) as they were trained, in
      their own dtype;
    - an ArrayRecord ``"codec"``: side data ``<key>.scale`` (float32, shape (1,)) for
      int8, ``<key>.indices`` (int32) for top-k;
    - a ConfigRecord ``"codec-info"``: ``codec`` and ``encoded-keys`` (the keys sent
      as updates);
    - the metric ``compressed-bytes`` (payload plus side data) in its MetricRecord.

    A train or evaluate message whose config says ``compression-downlink = "fp16"``
    carries the global model's float32 arrays as float16; the mod casts them back
    before the ClientApp sees them, and the update is taken against the model as
    received.

    **The server's codec wins.** If the train config names a codec
    (``compression-codec``, and ``compression-fraction`` for top-k), the mod uses it,
    whatever it was constructed with, so that the reply is what the server decodes; a
    codec or fraction in the config that is not valid gives an error reply. Without
    them the mod uses its own settings.

    Top-k's residual is kept in ``context.state[state_key]`` as an ArrayRecord
    (float32, per array key); a residual whose keys or shapes differ from the
    model's is discarded. ``context.state`` lives in memory on a SuperNode. Other
    message types, replies carrying an error and replies without arrays pass
    through untouched.

    Parameters
    ----------
    codec : str
        One of ``"none"``, ``"fp16"``, ``"int8"``, ``"topk"``.
    fraction : float (default: 0.1)
        Top-k: fraction of each tensor's entries sent, in ``(0, 1]``.
    state_key : str (default: "compression-residual")
        Key of the residual record in ``context.state``.
    """

    name = "CompressionMod"

    def __init__(
        self, codec: str, fraction: float = 0.1, *, state_key: str = STATE_RESIDUAL
    ) -> None:
        check_codec(codec, fraction)
        self.codec = codec
        self.fraction = fraction
        self.state_key = state_key

    def __repr__(self) -> str:
        return f"CompressionMod(codec={self.codec!r}, fraction={self.fraction})"

    def _settings(self, msg: Message) -> tuple[str, float]:
        """Return the codec and fraction: the server's if its config names them."""
        config = msg.content.config_records.get(protocol.RECORD_CONFIG)
        if config is None or CONFIG_CODEC not in config:
            return self.codec, self.fraction
        codec = config[CONFIG_CODEC]
        fraction = config.get(CONFIG_FRACTION, self.fraction)
        check_codec(codec, fraction)
        if codec != self.codec:
            log(INFO, "%s: using the server's codec %r", self.name, codec)
        return str(codec), float(fraction)  # type: ignore[arg-type]

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Widen a float16 downlink; compress the update in a ``train`` reply."""
        if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE):
            return call_next(msg, context)
        try:
            _widen_downlink(msg)
        except ValueError as err:
            return mod_error_reply(msg, f"{self.name}: server config: {err}")
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if len(msg.content.array_records) != 1:
            return mod_error_reply(
                msg,
                f"{self.name} expects exactly one ArrayRecord in the train message, "
                f"found {len(msg.content.array_records)}",
            )
        received = next(iter(msg.content.array_records.values()))
        try:
            codec, fraction = self._settings(msg)
        except ValueError as err:
            return mod_error_reply(msg, f"{self.name}: server config: {err}")

        reply = call_next(msg, context)
        if reply.has_error() or not reply.content.array_records:
            return reply
        problem = _layout_problem(reply, received)
        if problem:
            return mod_error_reply(msg, f"{self.name}: {problem}")

        record_name, sent = next(iter(reply.content.array_records.items()))
        local = {k: sent[k].numpy() for k in sent}
        global_ = {k: received[k].numpy() for k in sent}
        for key, value in local.items():
            if value.shape != global_[key].shape:
                return mod_error_reply(
                    msg,
                    f"{self.name}: array '{key}' has shape {value.shape} in the "
                    f"reply but {global_[key].shape} in the train message",
                )
        residual = self._residual(context, local) if codec == "topk" else {}
        out = _encode_arrays(codec, fraction, local, global_, residual)
        if codec == "topk":
            context.state[self.state_key] = ArrayRecord(
                {k: Array(r.astype(np.float32)) for k, r in out.residual.items()}
            )
        self._write_reply(reply, record_name, codec, out)
        log(
            INFO,
            "%s: %s, %d of %d arrays encoded, %d bytes (uncompressed %d)",
            self.name,
            codec,
            len(out.encoded),
            len(local),
            out.num_bytes(),
            payload_bytes(local.values()),
        )
        return reply

    def _residual(
        self, context: Context, local: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Top-k's stored residual, or none if it does not fit the model."""
        record = context.state.array_records.get(self.state_key)
        if record is None:
            return {}
        stored = {k: record[k].numpy() for k in record}
        shapes = {
            k: v.shape for k, v in local.items() if np.issubdtype(v.dtype, np.floating)
        }
        if {k: v.shape for k, v in stored.items()} != shapes:
            log(
                WARNING,
                "%s: the stored residual does not match the model's float arrays "
                "(keys or shapes); discarded",
                self.name,
            )
            return {}
        return stored

    @staticmethod
    def _write_reply(
        reply: Message, record_name: str, codec: str, out: _EncodedArrays
    ) -> None:
        reply.content[record_name] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in out.data.items()}
        )
        reply.content[RECORD_CODEC] = ArrayRecord(
            {k: Array(v) for k, v in out.side.items()}
        )
        reply.content[RECORD_CODEC_INFO] = ConfigRecord(
            {INFO_CODEC: codec, INFO_ENCODED_KEYS: out.encoded}
        )
        metrics = next(iter(reply.content.metric_records.values()), None)
        if metrics is None:
            metrics = MetricRecord()
            reply.content[protocol.RECORD_METRICS] = metrics
        metrics[METRIC_COMPRESSED_BYTES] = out.num_bytes()


def _layout_problem(reply: Message, received: ArrayRecord) -> str | None:
    """Why the reply cannot be encoded against ``received`` (None if it can)."""
    if len(reply.content.array_records) != 1:
        return (
            f"expects exactly one ArrayRecord in the reply, "
            f"found {len(reply.content.array_records)}"
        )
    if len(reply.content.metric_records) > 1:
        return (
            f"expects at most one MetricRecord in the reply, "
            f"found {len(reply.content.metric_records)}"
        )
    sent = next(iter(reply.content.array_records.values()))
    missing = set(received.keys()) - set(sent.keys())
    extra = set(sent.keys()) - set(received.keys())
    if missing or extra:
        return (
            f"the reply must carry the received array keys: "
            f"missing {sorted(missing)}, extra {sorted(extra)}"
        )
    return None


def _encode_arrays(
    codec: str,
    fraction: float,
    local: dict[str, np.ndarray],
    global_: dict[str, np.ndarray],
    residual: dict[str, np.ndarray],
) -> _EncodedArrays:
    """Encode the update of every float array; others, and refused ones, go raw."""
    out = _EncodedArrays()
    for key, value in local.items():
        if codec == "none" or not np.issubdtype(value.dtype, np.floating):
            out.data[key] = value
            continue
        delta = value.astype(np.float64) - global_[key].astype(np.float64)
        try:
            encoded = encode(codec, delta, residual.get(key), fraction)
        except ValueError as err:
            log(WARNING, "CompressionMod: array '%s' sent uncompressed: %s", key, err)
            out.data[key] = value
            out.residual[key] = np.zeros(value.shape)
            continue
        out.data[key] = encoded.data
        out.encoded.append(key)
        for name, array in encoded.side.items():
            out.side[side_key(key, name)] = array
        if encoded.residual is not None:
            out.residual[key] = encoded.residual
    return out

"""DecompressUpdates: decode compressed train replies in front of any strategy.

Paper: Lin et al., "Deep Gradient Compression", ICLR 2018,
https://arxiv.org/abs/1712.01887; the site side is
:class:`flower_medimg.privacy.compression_mod.CompressionMod` and the kernels are in
:mod:`flower_medimg.core.compression`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_medimg.core.compression import (
    DOWNLINKS,
    SIDE_DATA,
    check_codec,
    decode,
    narrow_model,
    side_key,
    widen_model,
)
from flower_medimg.core.protocol import (
    CONFIG_CODEC,
    CONFIG_DOWNLINK,
    CONFIG_FRACTION,
    ERROR_UNDECODABLE,
    INFO_CODEC,
    INFO_ENCODED_KEYS,
    RECORD_ARRAYS,
    RECORD_CODEC,
    RECORD_CODEC_INFO,
)

from ._wire import cast_to_dtype, read_array
from .chain import DelegatingWrapper
from .quality import log_rejection

__all__ = ["DecompressUpdates", "decode_reply"]

#: The wrapper's own attributes; every other attribute is the wrapped strategy's.
_OWN_ATTRIBUTES = frozenset(
    {"strategy", "codec", "fraction", "downlink", "current_arrays"}
)


class DecompressUpdates(DelegatingWrapper, Strategy):
    """Wrap a strategy so that it receives compressed train replies decoded.

    ``configure_train`` remembers the global arrays and adds the codec
    (``compression-codec``) and top-k fraction (``compression-fraction``) to the train
    config: a site's :class:`~flower_medimg.privacy.compression_mod.CompressionMod`
    then encodes with the server's codec, whatever its own setting. Before the
    wrapped ``aggregate_train`` sees the replies, each one is decoded back into a
    plain reply: its ArrayRecord holds ``global + decoded update`` in the global
    model's dtypes and shapes, and the records ``codec`` and ``codec-info`` are
    removed (the metric ``compressed-bytes`` stays). A reply that cannot be decoded
    (wrong codec, keys, shapes, dtypes, indices, scale, missing side data, a
    non-finite result) becomes an error reply, logged with the node id and the key,
    so the wrapped strategy drops it and the round goes on.

    Put it outermost, in front of the reply screening:
    ``DecompressUpdates(QualityGate(FedAvg()), codec="int8")``. Everything else
    (``configure_evaluate``, ``aggregate_evaluate``, ``summary``, attribute reads and
    writes other than its own) is delegated to the wrapped strategy, kept in
    :attr:`strategy`.

    Parameters
    ----------
    strategy : Strategy
        The Message-API strategy that aggregates the decoded replies.
    codec : str (default: "int8")
        The codec every site must use: ``"none"``, ``"fp16"``, ``"int8"`` or
        ``"topk"``.
    fraction : float (default: 0.1)
        Top-k: fraction of each tensor's entries a site sends, in ``(0, 1]``; a reply
        with more values is refused.
    downlink : str (default: "none")
        ``"fp16"``: the global model's float32 arrays travel to the sites as float16
        (train and evaluate messages; the sites' ``CompressionMod`` widens them).
    """

    _OWN_ATTRIBUTES = _OWN_ATTRIBUTES

    def __init__(
        self,
        strategy: Strategy,
        codec: str = "int8",
        fraction: float = 0.1,
        downlink: str = "none",
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"DecompressUpdates wraps a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        check_codec(codec, fraction)
        if downlink not in DOWNLINKS:
            raise ValueError(
                f"unknown downlink {downlink!r}; valid downlinks are {list(DOWNLINKS)}"
            )
        self.strategy = strategy
        self.downlink = downlink
        self.codec = codec
        self.fraction = fraction
        self.current_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(
            INFO,
            "\t├──> DecompressUpdates (codec %s, fraction %g) in front of %s:",
            self.codec,
            self.fraction,
            type(self.strategy).__name__,
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Name the codec in the config, delegate, narrow the sent model if asked.

        The replies are decoded against the model the sites received: with a
        float16 downlink, the float16-rounded global model.
        """
        config = ConfigRecord(
            {
                **dict(config),
                CONFIG_CODEC: self.codec,
                CONFIG_FRACTION: self.fraction,
                **self._downlink_config(),
            }
        )
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        messages, self.current_arrays = self._narrowed(messages, arrays)
        return messages

    def _downlink_config(self) -> dict[str, str]:
        return {} if self.downlink == "none" else {CONFIG_DOWNLINK: self.downlink}

    def _narrowed(
        self, messages: Iterable[Message], arrays: ArrayRecord
    ) -> tuple[list[Message], ArrayRecord]:
        """Return the messages with the model as it travels, and that model."""
        messages = list(messages)
        if self.downlink == "none":
            return messages, arrays
        narrow = narrow_model({key: arrays[key].numpy() for key in arrays})
        sent = ArrayRecord({key: Array(value) for key, value in narrow.items()})
        received = ArrayRecord(
            {key: Array(value) for key, value in widen_model(narrow).items()}
        )
        return [_with_arrays(message, sent) for message in messages], received

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply, then aggregate them with the wrapped strategy."""
        reference = (
            {}
            if self.current_arrays is None
            else {k: a.numpy() for k, a in self.current_arrays.items()}
        )
        decoded = [self._decoded(reply, reference) for reply in replies]
        return self.strategy.aggregate_train(server_round, decoded)

    def _decoded(self, reply: Message, reference: Mapping[str, np.ndarray]) -> Message:
        """Return the plain reply, or an error reply saying why it is undecodable."""
        if reply.has_error():
            return reply
        try:
            return decode_reply(reply, reference, self.codec, self.fraction)
        except Exception as err:  # pylint: disable=broad-exception-caught
            reason = f"undecodable update: {err}"
            log_rejection(reply, reason)
            return Message(
                Error(code=ERROR_UNDECODABLE, reason=reason), metadata=reply.metadata
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy; narrow the sent model if asked."""
        config = ConfigRecord({**dict(config), **self._downlink_config()})
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self._narrowed(messages, arrays)[0]


def decode_reply(
    reply: Message,
    reference: Mapping[str, np.ndarray],
    codec: str,
    fraction: float,
) -> Message:
    """Return ``reply`` with its update decoded against the global ``reference``.

    Raises
    ------
    ValueError
        Naming the key, if the reply does not hold exactly the reference's keys
        encoded with ``codec`` (see :func:`~flower_medimg.core.compression.decode`).
    """
    if not reference:
        raise ValueError("no global model was sent in configure_train")
    encoded = _encoded_keys(reply, codec)
    names = [n for n in reply.content.array_records if n != RECORD_CODEC]
    if len(names) != 1:
        raise ValueError(f"expected one ArrayRecord besides '{RECORD_CODEC}': {names}")
    payload = reply.content.array_records[names[0]]
    side = reply.content.array_records.get(RECORD_CODEC, ArrayRecord())
    _check_keys(payload, side, reference, encoded, codec)
    arrays = ArrayRecord()
    for key, target in reference.items():
        if key in encoded:
            values = _decoded_array(payload, side, target, key, codec, fraction)
        else:
            values = _raw_array(payload[key], target, key)
        arrays[key] = Array(np.ascontiguousarray(values))
    content = RecordDict(
        {
            name: record
            for name, record in reply.content.items()
            if name not in (RECORD_CODEC, RECORD_CODEC_INFO)
        }
    )
    content[names[0]] = arrays
    return Message(content, metadata=reply.metadata)


def _with_arrays(message: Message, arrays: ArrayRecord) -> Message:
    """Return a copy of a message to a site carrying ``arrays`` as its model."""
    content = RecordDict(dict(message.content.items()))
    name = next(iter(message.content.array_records), RECORD_ARRAYS)
    content[name] = arrays
    return Message(
        content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=message.metadata.group_id,
    )


def _encoded_keys(reply: Message, codec: str) -> frozenset[str]:
    """Return the keys that ``codec-info`` says were encoded with ``codec``."""
    info = reply.content.config_records.get(RECORD_CODEC_INFO)
    if info is None:
        raise ValueError(f"no '{RECORD_CODEC_INFO}' record (expected codec {codec!r})")
    if info.get(INFO_CODEC) != codec:
        raise ValueError(f"codec {info.get(INFO_CODEC)!r}, expected {codec!r}")
    keys = info.get(INFO_ENCODED_KEYS, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"'{INFO_ENCODED_KEYS}' is not a list of array keys")
    if len(set(keys)) != len(keys):
        raise ValueError(f"'{INFO_ENCODED_KEYS}' names a key twice")
    return frozenset(keys)


def _check_keys(
    payload: ArrayRecord,
    side: ArrayRecord,
    reference: Mapping[str, np.ndarray],
    encoded: frozenset[str],
    codec: str,
) -> None:
    """Refuse missing or extra payload keys, encoded non-floats and wrong side data."""
    missing = sorted(set(reference) - set(payload.keys()))
    extra = sorted(set(payload.keys()) - set(reference))
    if missing or extra:
        raise ValueError(f"array keys missing {missing}, extra {extra}")
    for key in sorted(encoded):
        if key not in reference or not np.issubdtype(reference[key].dtype, np.floating):
            raise ValueError(f"'{key}': not a floating-point array of the model")
    expected = {side_key(k, name) for k in encoded for name in SIDE_DATA[codec]}
    missing = sorted(expected - set(side.keys()))
    extra = sorted(set(side.keys()) - expected)
    if missing or extra:
        raise ValueError(f"side data missing {missing}, extra {extra}")


def _decoded_array(
    payload: ArrayRecord,
    side: ArrayRecord,
    target: np.ndarray,
    key: str,
    codec: str,
    fraction: float,
) -> np.ndarray:
    """Return ``target + decoded update`` in ``target``'s dtype, checked finite."""
    side_data = {
        name: read_array(side[side_key(key, name)]) for name in SIDE_DATA[codec]
    }
    delta = decode(
        codec, read_array(payload[key]), side_data, target.shape, key, fraction
    )
    values = cast_to_dtype(target.astype(np.float64) + delta, target.dtype)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"'{key}': the decoded array is not finite in {target.dtype}")
    return values


def _raw_array(array: Array, target: np.ndarray, key: str) -> np.ndarray:
    """Return an array sent as it is, checked for ``target``'s dtype and shape."""
    flat = read_array(array)
    if flat.dtype != target.dtype or tuple(array.shape) != target.shape:
        raise ValueError(
            f"'{key}': {flat.dtype} {tuple(array.shape)} sent uncompressed, "
            f"expected {target.dtype} {target.shape}"
        )
    if flat.size != target.size:
        raise ValueError(f"'{key}': {flat.size} values, expected {target.size}")
    return flat.reshape(target.shape)

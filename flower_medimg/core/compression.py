"""Update compression kernels: encode a site's model update, decode it on the server.

A site sends ``delta = theta_k - theta_global`` of every floating-point array in one
of four codecs (:data:`CODECS`):

- ``"none"``: the arrays as they are (no kernel here);
- ``"fp16"``: the update cast to float16 (:func:`encode_fp16`);
- ``"int8"``: the update quantised to int8 with one scale per tensor and stochastic
  rounding, unbiased (:func:`encode_int8`, Flower's secure-aggregation quantiser);
- ``"topk"``: the ``k`` largest-magnitude entries of the update plus the site's
  residual, with error feedback (:func:`encode_topk`; Seide et al., Interspeech 2014;
  Stich et al., NeurIPS 2018, https://arxiv.org/abs/1809.07599; Lin et al., "Deep
  Gradient Compression", ICLR 2018, https://arxiv.org/abs/1712.01887).

Each encoder returns the payload array and its side data (``{"scale": ...}``,
``{"indices": ...}``); an encoder that cannot represent a tensor raises
``ValueError`` and the caller sends that tensor uncompressed. Each decoder takes the
payload (hostile until checked), the side data and the shape the server expects,
checks dtype, length, range and finiteness before it allocates anything, and raises
``ValueError`` naming the array key. Decoders return float64 updates of the expected
shape.

The wire names below (records, config keys, metric) are to be moved to
:mod:`flower_medimg.core.protocol`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

__all__ = [
    "CODECS",
    "DOWNLINKS",
    "FP16_MAX",
    "INT8_LEVELS",
    "SIDE_DATA",
    "Encoded",
    "check_codec",
    "decode",
    "decode_fp16",
    "decode_int8",
    "decode_topk",
    "encode",
    "encode_fp16",
    "narrow_model",
    "widen_model",
    "encode_int8",
    "encode_topk",
    "payload_bytes",
    "side_key",
    "topk_count",
]

CODECS = ("none", "fp16", "int8", "topk")

#: Side data each codec sends per encoded array, by name.
SIDE_DATA: dict[str, tuple[str, ...]] = {
    "none": (),
    "fp16": (),
    "int8": ("scale",),
    "topk": ("indices",),
}
#: Largest finite float16.
FP16_MAX = 65504.0
#: Stored int8 levels are ``-INT8_LEVELS .. INT8_LEVELS`` (-128 is never used).
INT8_LEVELS = 127
_INDEX_LIMIT = int(np.iinfo(np.int32).max)


class Encoded(NamedTuple):
    """One encoded tensor: payload, side data by name, and top-k's new residual."""

    data: np.ndarray
    side: dict[str, np.ndarray]
    residual: np.ndarray | None = None


def side_key(key: str, name: str) -> str:
    """Return the key of side data ``name`` of array ``key`` (``"w.scale"``)."""
    return f"{key}.{name}"


def check_codec(codec: object, fraction: object) -> None:
    """Raise ``ValueError`` unless ``codec`` is known and ``fraction`` in ``(0, 1]``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; valid codecs are {list(CODECS)}")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0 < fraction <= 1
    ):
        raise ValueError(f"top-k fraction must be a number in (0, 1], got {fraction!r}")


def payload_bytes(arrays: Iterable[np.ndarray]) -> int:
    """Return the bytes of array data in ``arrays`` (headers not counted)."""
    return sum(int(np.asarray(a).nbytes) for a in arrays)


def _finite_update(update: np.ndarray) -> np.ndarray:
    values = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("the update holds NaN or inf")
    return values


def _checked(
    data: np.ndarray, dtype: type[np.generic], size: int, key: str, what: str
) -> np.ndarray:
    """Check dtype and length of a hostile array before anything reads its values."""
    data = np.asarray(data)
    if data.dtype != np.dtype(dtype):
        raise ValueError(
            f"'{key}': {what} has dtype {data.dtype}, expected {np.dtype(dtype)}"
        )
    if data.size != size:
        raise ValueError(f"'{key}': {what} has {data.size} values, expected {size}")
    return data


def _require_finite(values: np.ndarray, key: str, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"'{key}': {what} holds NaN or inf")


# ---- fp16 ----------------------------------------------------------------------------


def encode_fp16(update: np.ndarray) -> Encoded:
    """Cast an update to float16.

    Round-to-nearest: ``|decoded - x| <= 2**-11 * |x|`` for ``|x| >= 2**-14`` (normal
    float16 numbers) and ``<= 2**-25`` below (subnormals; values under ``2**-25``
    become 0).

    Raises
    ------
    ValueError
        If a value is NaN, inf, or above :data:`FP16_MAX` (65504) in magnitude:
        clipping would bias the update, so the caller sends this tensor as it is.
    """
    values = _finite_update(update)
    if values.size and float(np.max(np.abs(values))) > FP16_MAX:
        raise ValueError(f"the update exceeds float16's range ({FP16_MAX:g})")
    return Encoded(values.astype(np.float16), {})


def decode_fp16(data: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    """Decode a float16 update of ``shape``; raise ``ValueError`` naming ``key``."""
    data = _checked(data, np.float16, math.prod(shape), key, "the payload")
    _require_finite(data, key, "the payload")
    return data.astype(np.float64).reshape(shape)


# ---- downlink: the global model as float16 ------------------------------------------

#: Ways the global model may travel to the sites (``compression.downlink``).
DOWNLINKS = ("none", "fp16")


def narrow_model(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the global model for a float16 downlink.

    float32 arrays whose values fit float16 travel as float16 (half the bytes,
    error ``<= 2**-11 * |x|``); other arrays (integers, float64, values beyond
    float16's range) travel as they are. The sites widen every float16 array back
    to float32 (:func:`widen_model`), so a model with float16 parameters of its own
    cannot use this downlink.
    """
    out = {}
    for key, value in arrays.items():
        narrow = (
            value.dtype == np.float32
            and np.isfinite(value).all()
            and (value.size == 0 or float(np.max(np.abs(value))) <= FP16_MAX)
        )
        out[key] = value.astype(np.float16) if narrow else value
    return out


def widen_model(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast the float16 arrays of a received downlink back to float32."""
    return {
        key: value.astype(np.float32) if value.dtype == np.float16 else value
        for key, value in arrays.items()
    }


# ---- int8 ----------------------------------------------------------------------------


def _int8_scale(max_abs: float) -> np.float32:
    """Return the float32 ``max_abs / 127``, rounded up: ``127 * scale >= max_abs``."""
    scale = np.float32(max_abs / INT8_LEVELS)
    if float(scale) * INT8_LEVELS < max_abs:
        scale = np.nextafter(scale, np.float32(np.inf))
    if not np.isfinite(scale):
        raise ValueError("the update exceeds the int8 scale's float32 range")
    return scale


def encode_int8(update: np.ndarray) -> Encoded:
    """Quantise an update to int8 with one scale per tensor and stochastic rounding.

    Uses Flower's secure-aggregation quantiser
    (``flwr.common.secure_aggregation.quantization.quantize``) with
    ``clipping_range = 127 * scale >= max|x|`` and ``target_range = 254``, then
    shifts its levels ``0 .. 254`` by -127. The side data ``scale`` (float32, shape
    ``(1,)``) is stored so that the site and the server use the same clipping range.
    Stochastic rounding makes the decoded value unbiased, ``E[decoded] = x``, with
    ``|decoded - x| < scale = max|x| / 127`` per value (Alistarh et al., QSGD, NeurIPS
    2017, https://arxiv.org/abs/1610.02132). Flower's quantiser draws from numpy's
    global RNG (``np.random.rand``): seed it with ``np.random.seed`` for a
    reproducible run. An all-zero tensor has scale 0.

    Raises
    ------
    ValueError
        If the update holds NaN or inf.
    """
    values = _finite_update(update)
    max_abs = float(np.max(np.abs(values))) if values.size else 0.0
    if max_abs == 0.0:
        return Encoded(
            np.zeros(values.shape, np.int8), {"scale": np.zeros(1, np.float32)}
        )
    scale = _int8_scale(max_abs)
    clipping_range = float(scale) * INT8_LEVELS
    levels = quantize([values], clipping_range, 2 * INT8_LEVELS)[0]
    # the product (x + c) * 254 / (2c) may round a hair above 254
    levels = np.clip(levels, 0, 2 * INT8_LEVELS) - INT8_LEVELS
    return Encoded(levels.astype(np.int8), {"scale": np.array([scale], np.float32)})


def decode_int8(
    data: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], key: str
) -> np.ndarray:
    """Decode an int8 update of ``shape`` with its scale (Flower's ``dequantize``).

    Raises
    ------
    ValueError
        Naming ``key``, if the payload is not int8 of ``shape``'s size or holds -128,
        or the scale is not one finite, non-negative float32.
    """
    scale = _checked(scale, np.float32, 1, side_key(key, "scale"), "the scale")
    value = float(scale.reshape(-1)[0])
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"'{side_key(key, 'scale')}': scale is {value}")
    data = _checked(data, np.int8, math.prod(shape), key, "the payload")
    if data.size and int(data.min()) < -INT8_LEVELS:
        raise ValueError(f"'{key}': the payload holds -128 (levels are -127..127)")
    if value == 0.0:
        return np.zeros(shape)
    levels = data.astype(np.int32).reshape(shape) + INT8_LEVELS
    return dequantize([levels], value * INT8_LEVELS, 2 * INT8_LEVELS)[0]


# ---- top-k ---------------------------------------------------------------------------


def topk_count(size: int, fraction: float) -> int:
    """Return ``k = ceil(fraction * size)``, at least 1 for a non-empty tensor.

    Float noise is ignored: ``0.1 * 30`` gives 3, not 4.
    """
    return min(size, max(1, math.ceil(fraction * size - 1e-9)))


def encode_topk(
    update: np.ndarray, residual: np.ndarray | None, fraction: float
) -> Encoded:
    """Keep the ``k`` largest-magnitude entries of ``update + residual``.

    Top-k sparsification with error feedback (Seide et al. 2014; Stich et al.,
    https://arxiv.org/abs/1809.07599; Lin et al., https://arxiv.org/abs/1712.01887):
    ``acc = update + residual``; the ``k = ceil(fraction * size)`` entries of largest
    ``|acc|`` (ties broken arbitrarily) are sent as float32 ``values`` with their
    flat, strictly increasing int32 ``indices`` (side data); the new residual
    ``acc - sent`` (float64, including the float32 rounding of the sent values) is
    added to the next round's update, so nothing is lost, only delayed.

    Raises
    ------
    ValueError
        If ``acc`` holds NaN or inf, ``residual`` has another shape, or the tensor
        has more entries than an int32 index reaches.
    """
    acc = _finite_update(update)
    if residual is not None:
        if np.shape(residual) != acc.shape:
            raise ValueError(
                f"residual of shape {np.shape(residual)} for an update of {acc.shape}"
            )
        acc = _finite_update(acc + residual)
    if acc.size > _INDEX_LIMIT:
        raise ValueError(f"{acc.size} entries exceed int32 indices")
    flat = acc.reshape(-1)
    k = topk_count(flat.size, fraction)
    if k < flat.size:
        indices = np.sort(np.argpartition(-np.abs(flat), k - 1)[:k])
    else:
        indices = np.arange(flat.size)
    values = flat[indices].astype(np.float32)
    new_residual = flat.copy()
    new_residual[indices] -= values
    return Encoded(
        values, {"indices": indices.astype(np.int32)}, new_residual.reshape(acc.shape)
    )


def decode_topk(
    values: np.ndarray,
    indices: np.ndarray,
    shape: tuple[int, ...],
    key: str,
    max_count: int | None = None,
) -> np.ndarray:
    """Scatter top-k ``values`` at flat ``indices`` into a zero update of ``shape``.

    Raises
    ------
    ValueError
        Naming ``key``, if ``values`` is not 1-D float32 or holds NaN/inf,
        ``indices`` is not 1-D int32 of the same length, there are more than
        ``max_count`` (default: the size of ``shape``) entries, or the indices are
        not strictly increasing within ``[0, size)`` (a duplicate is refused).
    """
    size = math.prod(shape)
    limit = size if max_count is None else min(size, max_count)
    values, indices = np.asarray(values), np.asarray(indices)
    if values.ndim != 1:
        raise ValueError(f"'{key}': top-k values must be 1-D, got shape {values.shape}")
    if values.size > limit:
        raise ValueError(
            f"'{key}': {values.size} top-k values, at most {limit} allowed"
        )
    values = _checked(values, np.float32, values.size, key, "the top-k values")
    index_key = side_key(key, "indices")
    indices = _checked(indices, np.int32, values.size, index_key, "the indices")
    _require_finite(values, key, "the top-k values")
    if indices.size:
        if indices.ndim != 1 or np.any(np.diff(indices) <= 0):
            raise ValueError(f"'{index_key}': indices not strictly increasing")
        if int(indices[0]) < 0 or int(indices[-1]) >= size:
            raise ValueError(f"'{index_key}': index out of range [0, {size})")
    update = np.zeros(size)
    update[indices] = values
    return update.reshape(shape)


# ---- by codec name -------------------------------------------------------------------


def encode(
    codec: str,
    update: np.ndarray,
    residual: np.ndarray | None = None,
    fraction: float = 1.0,
) -> Encoded:
    """Encode ``update`` with ``codec`` (``"fp16"``, ``"int8"`` or ``"topk"``).

    Raises
    ------
    ValueError
        If the codec is unknown (``"none"`` has no encoder) or refuses the tensor.
    """
    if codec == "fp16":
        return encode_fp16(update)
    if codec == "int8":
        return encode_int8(update)
    if codec == "topk":
        return encode_topk(update, residual, fraction)
    raise ValueError(f"codec {codec!r} has no encoder; use one of fp16, int8, topk")


def decode(
    codec: str,
    data: np.ndarray,
    side: Mapping[str, np.ndarray],
    shape: tuple[int, ...],
    key: str,
    fraction: float = 1.0,
) -> np.ndarray:
    """Decode one array sent with ``codec``; ``side`` maps side-data names to arrays.

    For top-k, at most ``topk_count(size, fraction)`` values are accepted.

    Raises
    ------
    ValueError
        Naming the key, if the codec is unknown, side data is missing or the payload
        is malformed (see the decoders).
    """
    if codec not in SIDE_DATA or codec == "none":
        raise ValueError(f"'{key}': codec {codec!r} encodes no array")
    missing = [side_key(key, name) for name in SIDE_DATA[codec] if name not in side]
    if missing:
        raise ValueError(f"'{key}': side data {missing} missing")
    if codec == "fp16":
        return decode_fp16(data, shape, key)
    if codec == "int8":
        return decode_int8(data, side["scale"], shape, key)
    return decode_topk(
        data, side["indices"], shape, key, topk_count(math.prod(shape), fraction)
    )

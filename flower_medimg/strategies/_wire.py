"""The wire format of reply arrays: read ``.npy`` payloads in place, write them back.

Flower stores every ``Array`` as the bytes of ``np.save`` (an ``.npy`` header
followed by the raw, C-ordered data), so ``np.frombuffer`` on the payload gives a
read-only view without the two copies that ``Array.numpy()`` makes.

A model is described by a :class:`Layout`: its keys, dtypes and shapes, and a split
of the tensors into *blocks*. Each large floating-point tensor is one block that is
read in place; all small tensors of one dtype are packed (one small copy per reply)
into a single block, so that a kernel issues a few calls per reply instead of one per
tensor. :func:`read_blocks` turns a reply into its *columns* (one 1-D array per
block), the kernels of :mod:`.kernels` work on columns, and
:func:`build_arrayrecord` turns their result back into an ``ArrayRecord``.

Every byte of a payload is checked against the layout before it is read: a wrong
key, dtype, shape, serialisation type, header or length raises ``ValueError``
naming the key.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

__all__ = [
    "SMALL_TENSOR_SIZE",
    "Block",
    "Columns",
    "Layout",
    "build_arrayrecord",
    "cast_to_dtype",
    "read_array",
    "read_blocks",
]

#: For each reply, one flat array per block.
Columns = Sequence[Sequence[np.ndarray]]

#: Float tensors with fewer elements than this are packed into one block per dtype.
SMALL_TENSOR_SIZE = 1 << 14

_NPY_MAGIC = b"\x93NUMPY"
#: Longest ``.npy`` header accepted (``np.save`` writes 128 bytes for any model).
_MAX_HEADER = 1 << 16

_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}

_OUT_HEADER_CACHE: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _parse_npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """Parse (and cache) the dictionary of an ``.npy`` header."""
    cached = _HEADER_CACHE.get(header)
    if cached is not None:
        return cached
    try:
        info = ast.literal_eval(header.decode("latin1"))
        dtype = np.lib.format.descr_to_dtype(info["descr"])
        shape = tuple(int(s) for s in info["shape"])
        fortran = bool(info["fortran_order"])
    except Exception as err:  # any malformed header, however it fails
        raise ValueError(f"unreadable .npy header: {type(err).__name__}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f".npy header has a negative dimension: {shape}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    if len(_HEADER_CACHE) > 65536:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[header] = (dtype, shape, fortran)
    return dtype, shape, fortran


def _payload(array: Array) -> tuple[int, np.dtype, tuple[int, ...], bool]:
    """Return (data offset, dtype, shape, fortran_order) of an Array's .npy bytes."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported serialisation type '{array.stype}'")
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"payload is a {type(data).__name__}, not bytes")
    if len(data) < 10 or bytes(data[:6]) != _NPY_MAGIC:
        raise ValueError("payload is not in .npy format")
    if data[6] == 1:
        start = 10
        header_len = data[8] | (data[9] << 8)
    elif data[6] in (2, 3) and len(data) >= 12:
        start = 12
        header_len = int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unknown .npy format version {data[6]}")
    end = start + header_len
    if end > len(data) or header_len > _MAX_HEADER:
        raise ValueError(
            f".npy header claims {header_len} bytes, the payload holds {len(data)}"
        )
    dtype, shape, fortran = _parse_npy_header(bytes(data[start:end]))
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(
            f"payload holds {len(data) - end} bytes, header promises "
            f"{count * dtype.itemsize}"
        )
    return end, dtype, shape, fortran


def read_array(array: Array) -> np.ndarray:
    """Return a read-only, flat (C-order) view of an Array's data.

    Unlike ``Array.numpy()`` this does not copy the data, except for arrays stored in
    Fortran order (then one C-ordered copy is returned).

    Raises
    ------
    ValueError
        If the Array is not a well-formed numpy payload.
    """
    offset, dtype, shape, fortran = _payload(array)
    count = math.prod(shape)
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=offset)
    if fortran and len(shape) > 1:
        return flat.reshape(shape[::-1]).T.ravel()
    return flat


@dataclass(frozen=True)
class Block:
    """A group of tensors that kernels treat as one flat vector.

    Attributes
    ----------
    keys : tuple[str, ...]
        Array keys stored in the block, in order.
    dtype : np.dtype
        Common dtype of the tensors.
    offsets : tuple[int, ...]
        Start of each key in the block, followed by the block length.
    packed : bool
        Whether the tensors are copied into one buffer (small tensors) or a single
        tensor is read in place.
    """

    keys: tuple[str, ...]
    dtype: np.dtype
    offsets: tuple[int, ...]
    packed: bool

    @property
    def size(self) -> int:
        """Number of elements in the block."""
        return self.offsets[-1]

    @property
    def is_float(self) -> bool:
        """Whether the block holds floating-point values."""
        return self.dtype.kind == "f"


@dataclass(frozen=True, eq=False)
class Layout:
    """Keys, dtypes and shapes of a model, and their grouping into blocks."""

    keys: tuple[str, ...]
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]
    blocks: tuple[Block, ...]
    dtype_names: dict[str, str]
    #: The ``.npy`` header ``np.save`` writes for each key (C order).
    headers: dict[str, bytes]

    @cached_property
    def key_set(self) -> frozenset[str]:
        """The keys, as a set (checked against every reply)."""
        return frozenset(self.keys)

    @cached_property
    def fast_checks(self) -> dict[str, tuple[str, tuple[int, ...], bytes, int]]:
        """Per key: dtype name, shape, expected header, expected payload length."""
        return {
            key: (
                self.dtype_names[key],
                self.shapes[key],
                self.headers[key],
                len(self.headers[key])
                + self.dtypes[key].itemsize * math.prod(self.shapes[key]),
            )
            for key in self.keys
        }

    @classmethod
    def from_arrayrecord(
        cls, record: ArrayRecord, small_tensor_size: int = SMALL_TENSOR_SIZE
    ) -> Layout:
        """Describe an ArrayRecord using the metadata of its Arrays.

        Layouts are cached by the record's keys, dtypes and shapes, so a strategy
        that sees the same model every round builds its layout once.
        """
        signature = tuple(
            (key, array.dtype, tuple(int(s) for s in array.shape))
            for key, array in record.items()
        )
        return _layout_of(signature, small_tensor_size)

    @classmethod
    def from_specs(
        cls,
        keys: Sequence[str],
        dtypes: dict[str, np.dtype],
        shapes: dict[str, tuple[int, ...]],
        small_tensor_size: int = SMALL_TENSOR_SIZE,
    ) -> Layout:
        """Build a layout from keys, dtypes and shapes."""
        blocks: list[Block] = []
        packed: dict[np.dtype, list[str]] = {}
        for key in keys:
            size = math.prod(shapes[key])
            if dtypes[key].kind == "f" and size >= small_tensor_size:
                blocks.append(Block((key,), dtypes[key], (0, size), packed=False))
            else:
                packed.setdefault(dtypes[key], []).append(key)
        for dtype, group in packed.items():
            offsets = [0]
            for key in group:
                offsets.append(offsets[-1] + math.prod(shapes[key]))
            blocks.append(Block(tuple(group), dtype, tuple(offsets), packed=True))
        names = {key: dtypes[key].name for key in keys}
        headers = {key: _npy_header(dtypes[key], shapes[key]) for key in keys}
        return cls(tuple(keys), dtypes, shapes, tuple(blocks), names, headers)

    @property
    def float_blocks(self) -> list[int]:
        """Indices of the floating-point blocks."""
        return [i for i, block in enumerate(self.blocks) if block.is_float]

    def matches(self, record: ArrayRecord) -> str | None:
        """Return why ``record``'s metadata differs from the layout, or None."""
        if len(record) != len(self.keys) or any(k not in record for k in self.keys):
            have = set(record.keys())
            missing = sorted(set(self.keys) - have)
            extra = sorted(have - set(self.keys))
            return f"array keys differ (missing {missing}, unexpected {extra})"
        for key in self.keys:
            reason = self.check_array(key, record[key])
            if reason is not None:
                return reason
        return None

    def check_array(self, key: str, array: Array) -> str | None:
        """Return why the metadata of ``array`` (stored as ``key``) differs."""
        shape = self.shapes[key]
        if array.shape != shape and tuple(array.shape) != shape:
            return f"array '{key}' has shape {tuple(array.shape)}, expected {shape}"
        if array.dtype != self.dtype_names[key]:
            return (
                f"array '{key}' has dtype {array.dtype}, "
                f"expected {self.dtype_names[key]}"
            )
        return None


@lru_cache(maxsize=16)
def _layout_of(
    signature: tuple[tuple[str, str, tuple[int, ...]], ...], small_tensor_size: int
) -> Layout:
    """Build (and cache) the layout of ``(key, dtype name, shape)`` triples."""
    dtypes: dict[str, np.dtype] = {}
    for key, name, _ in signature:
        try:
            dtypes[key] = np.dtype(name)
        except TypeError as err:
            raise ValueError(f"array '{key}' has unknown dtype") from err
    keys = tuple(key for key, _, _ in signature)
    shapes = {key: shape for key, _, shape in signature}
    return Layout.from_specs(keys, dtypes, shapes, small_tensor_size)


def read_blocks(record: ArrayRecord, layout: Layout) -> list[np.ndarray]:
    """Return one flat array per block of ``layout`` for ``record``.

    Single-tensor blocks are read-only views of the reply's bytes; packed blocks are
    one small copy. An Array whose metadata matches and whose bytes start with the
    header ``np.save`` writes for the expected dtype and shape (the usual case) is
    read without parsing anything; any other Array is fully checked.

    Raises
    ------
    ValueError
        If the record does not match the layout (keys, shapes, dtypes, payload). The
        message names the offending key.
    """
    if len(record) != len(layout.keys) or set(record) != layout.key_set:
        raise ValueError(layout.matches(record))
    checks = layout.fast_checks
    columns: list[np.ndarray] = []
    for block in layout.blocks:
        parts: list[memoryview | np.ndarray] = []
        for key in block.keys:
            array = record[key]
            name, shape, header, length = checks[key]
            data = array.data
            if (
                array.stype == SType.NUMPY
                and array.dtype == name
                and array.shape == shape
                and len(data) == length
                and data[: len(header)] == header  # bytes or a memoryview
            ):
                parts.append(memoryview(data)[len(header) :])
            else:
                parts.append(_checked_data(array, key, layout))
        if block.packed:
            columns.append(np.frombuffer(b"".join(parts), dtype=block.dtype))
        else:
            columns.append(np.frombuffer(parts[0], dtype=block.dtype))
    return columns


def _checked_data(array: Array, key: str, layout: Layout) -> memoryview | np.ndarray:
    """Check an Array's metadata and payload in full; return its C-ordered data."""
    reason = layout.check_array(key, array)
    if reason is not None:
        raise ValueError(reason)
    try:
        offset, dtype, shape, fortran = _payload(array)
    except ValueError as err:
        raise ValueError(f"array '{key}': {err}") from err
    _check_header(key, dtype, shape, layout)
    if fortran and len(shape) > 1:
        return read_array(array)
    return memoryview(array.data)[offset:]


def _check_header(
    key: str, dtype: np.dtype, shape: tuple[int, ...], layout: Layout
) -> None:
    if dtype != layout.dtypes[key] or shape != layout.shapes[key]:
        raise ValueError(
            f"array '{key}' payload is {dtype}{list(shape)}, metadata says "
            f"{layout.dtypes[key]}{list(layout.shapes[key])}"
        )


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """Return the ``.npy`` header ``np.save`` writes for a C-ordered array."""
    cache_key = (dtype.str, shape)
    header = _OUT_HEADER_CACHE.get(cache_key)
    if header is None:
        buffer = BytesIO()
        np.lib.format.write_array_header_1_0(
            buffer,
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": shape,
            },
        )
        header = buffer.getvalue()
        _OUT_HEADER_CACHE[cache_key] = header
    return header


def cast_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast aggregated values back to ``dtype``; integers and bools via ``np.rint``."""
    values = np.asarray(values)
    if values.dtype == dtype:
        return values
    if dtype.kind in "iub":
        values = np.asarray(np.rint(values))
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            values = np.clip(values, info.min, info.max)
        return values.astype(dtype)
    return values.astype(dtype)


def build_arrayrecord(layout: Layout, values: Sequence[np.ndarray]) -> ArrayRecord:
    """Build an ArrayRecord from one flat array per block of ``layout``.

    Values are cast back to each key's dtype (integers rounded with ``np.rint``). The
    ``.npy`` bytes are written directly (header + data in one copy), which gives the
    same bytes as ``Array(ndarray)`` without its ``BytesIO`` round trip.
    """
    by_key: dict[str, np.ndarray] = {}
    for block, flat in zip(layout.blocks, values, strict=True):
        flat = np.ascontiguousarray(cast_to_dtype(np.asarray(flat), block.dtype))
        for i, key in enumerate(block.keys):
            by_key[key] = flat[block.offsets[i] : block.offsets[i + 1]]
    record = ArrayRecord()
    for key in layout.keys:
        data = b"".join((layout.headers[key], memoryview(by_key[key])))
        record[key] = Array(
            dtype=layout.dtype_names[key],
            shape=layout.shapes[key],
            stype=SType.NUMPY,
            data=data,
        )
    return record

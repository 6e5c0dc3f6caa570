"""Numeric kernels for server-side aggregation of reply arrays.

The functions here read each reply's bytes in place and avoid per-tensor
temporaries. Flower stores every ``Array`` as the bytes of ``np.save`` (an ``.npy``
header followed by the raw, C-ordered data), so ``np.frombuffer`` on the payload gives
a read-only view without the two copies that ``Array.numpy()`` makes.

A model is described by a :class:`Layout`: its keys, dtypes and shapes, and a split
of the tensors into *blocks*. Each large floating-point tensor is one block that is
read in place; all small tensors of one dtype are packed (one small copy per reply)
into a single block, so that a kernel issues a few calls per reply instead of one per
tensor. Kernels work on ``columns``: for each reply, the list of its 1-D block arrays
(``read_blocks``), and return one 1-D array per block (``build_arrayrecord`` turns
those back into an ``ArrayRecord``). Tests can pass plain 1-D numpy arrays as
columns.

Weighted sums use BLAS ``?axpy`` (``y += a x`` in place, no temporary) directly on
the replies' bytes, one call per reply and tensor, or per cache-sized chunk of a
large tensor (BLAS threads as configured, e.g. ``OPENBLAS_NUM_THREADS``); order
statistics and Gram matrices stack the replies column chunk by column chunk into a
small cache-resident buffer.

The pure functions at the end compute the method-specific weights and scores of the
strategies in this package (COPOD, FedCostWAvg, FedFocus, FedNova), so that the worked
examples of the specification can be tested without Flower in the loop.
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
from scipy.linalg import blas
from scipy.spatial.distance import cdist

__all__ = [
    "Block",
    "Layout",
    "build_arrayrecord",
    "coordinate_median",
    "copod_scores",
    "cosine_distances",
    "euclidean_distances",
    "fallback_weights",
    "fedcostwavg_weights",
    "fedfocus_weights",
    "fednova_coefficients",
    "gram_matrix",
    "normalise_weights",
    "pairwise_distances",
    "read_array",
    "read_blocks",
    "softmin_weights",
    "trimmed_mean",
    "update_sq_norms",
    "weighted_average",
    "weighted_sum",
]

#: Float tensors with fewer elements than this are packed into one block per dtype.
SMALL_TENSOR_SIZE = 1 << 14

#: Elements per BLAS axpy call on large tensors (1 MiB of float32, cache-sized).
_AXPY_CHUNK = 1 << 18

#: Number of columns of the (N, chunk) buffer used by order statistics / Gram matrix.
_STACK_BYTES = 1 << 21

_NPY_MAGIC = b"\x93NUMPY"
_HEADER_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_OUT_HEADER_CACHE: dict[tuple[str, tuple[int, ...]], bytes] = {}

Columns = Sequence[Sequence[np.ndarray]]


# ----------------------------------------------------------------------------------
# Reading and writing ArrayRecords
# ----------------------------------------------------------------------------------


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
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable .npy header: {err}") from err
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
    if data[:6] != _NPY_MAGIC:
        raise ValueError("payload is not in .npy format")
    if data[6] == 1:
        start = 10
        header_len = data[8] | (data[9] << 8)
    else:
        start = 12
        header_len = int.from_bytes(data[8:12], "little")
    end = start + header_len
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

    @property
    def num_float_values(self) -> int:
        """Number of floating-point parameters in the model."""
        return sum(b.size for b in self.blocks if b.is_float)

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
                array.dtype == name
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
    if values.dtype == dtype:
        return values
    if dtype.kind in "iub":
        values = np.rint(values)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            np.clip(values, info.min, info.max, out=values)
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


# ----------------------------------------------------------------------------------
# Aggregation kernels over reply columns
# ----------------------------------------------------------------------------------


def _accumulator_dtype(dtype: np.dtype) -> np.dtype:
    if dtype == np.float32 or dtype == np.float64:
        return dtype
    return np.dtype(np.float64)


def weighted_sum(
    columns: Columns,
    coefficients: Sequence[float] | np.ndarray,
    blocks: Sequence[int] | None = None,
) -> list[np.ndarray | None]:
    """Return ``sum_k c_k x_k`` for every block (no normalisation).

    Float32 and float64 blocks accumulate in their own precision with BLAS ``axpy``
    (as Flower's FedAvg, float32 stays float32); other dtypes
    (integers, float16) accumulate in float64.

    Parameters
    ----------
    columns : Sequence[Sequence[np.ndarray]]
        For each reply, one flat array per block.
    coefficients : Sequence[float]
        One coefficient per reply.
    blocks : Sequence[int], optional
        Restrict the computation to these block indices (others are None).

    Returns
    -------
    list[Optional[np.ndarray]]
        One flat array per block.
    """
    coeffs = np.asarray(coefficients, dtype=np.float64)
    if len(columns) != len(coeffs) or len(columns) == 0:
        raise ValueError("need one coefficient per reply and at least one reply")
    num_blocks = len(columns[0])
    wanted = range(num_blocks) if blocks is None else blocks
    out: list[np.ndarray | None] = [None] * num_blocks
    for b in wanted:
        first = columns[0][b]
        acc_dtype = _accumulator_dtype(first.dtype)
        acc = np.multiply(first, coeffs[0], dtype=acc_dtype)
        terms = [(columns[k][b], coeffs[k]) for k in range(1, len(columns))]
        if acc_dtype == first.dtype:
            axpy = blas.saxpy if acc_dtype == np.float32 else blas.daxpy
            live = [(x, c) for x, c in terms if c != 0.0]
            # acc += c x in place; a large tensor goes chunk by chunk, so that its
            # accumulator stays in cache while every reply is added to it
            for start in range(0, acc.size, _AXPY_CHUNK):
                size = min(_AXPY_CHUNK, acc.size - start)
                for x, c in live:
                    axpy(x, acc, n=size, a=c, offx=start, offy=start)
        else:
            tmp = np.empty_like(acc)
            for x, c in terms:
                np.multiply(x, c, out=tmp, casting="unsafe")
                np.add(acc, tmp, out=acc)
        out[b] = acc
    return out


def normalise_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Normalise non-negative weights to sum 1.

    Raises
    ------
    ValueError
        If a weight is negative or non-finite, or all weights are zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero")
    return w / total


def fallback_weights(
    method_weights: Sequence[float] | np.ndarray | None,
    num_examples: Sequence[float] | np.ndarray,
) -> tuple[np.ndarray, str]:
    """Apply the edge-case policy to a method's weights (spec section 0.3-5).

    Returns normalised method weights if they are finite, non-negative and not all
    zero; otherwise ``num_examples`` weights; if those sum to zero, uniform weights.

    Returns
    -------
    tuple[np.ndarray, str]
        The normalised weights and which rule produced them (``"method"``,
        ``"num-examples"`` or ``"uniform"``).
    """
    if method_weights is not None:
        try:
            return normalise_weights(method_weights), "method"
        except ValueError:
            pass
    try:
        return normalise_weights(num_examples), "num-examples"
    except ValueError:
        n = len(num_examples)
        return np.full(n, 1.0 / n), "uniform"


def weighted_average(
    columns: Columns, weights: Sequence[float] | np.ndarray
) -> list[np.ndarray]:
    """Return the weighted average (weights normalised here) of every block."""
    return weighted_sum(columns, normalise_weights(weights))  # type: ignore[return-value]


def _stack_width(num_replies: int, itemsize: int) -> int:
    return max(256, _STACK_BYTES // max(1, num_replies * itemsize))


def _order_statistic(columns: Columns, reduce) -> list[np.ndarray]:
    """Sort each column chunk over replies and apply ``reduce(sorted, out)``."""
    n = len(columns)
    if n == 0:
        raise ValueError("need at least one reply")
    out: list[np.ndarray] = []
    for b in range(len(columns[0])):
        size = columns[0][b].size
        dtype = _accumulator_dtype(columns[0][b].dtype)
        result = np.empty(size, dtype=dtype)
        width = _stack_width(n, dtype.itemsize)
        buffer = np.empty((n, min(width, max(size, 1))), dtype=dtype)
        for start in range(0, size, width):
            stop = min(start + width, size)
            stack = buffer[:, : stop - start]
            for k in range(n):
                stack[k] = columns[k][b][start:stop]
            stack.sort(axis=0)
            reduce(stack, result[start:stop])
        out.append(result)
    return out


def coordinate_median(columns: Columns) -> list[np.ndarray]:
    """Return the coordinate-wise median over replies of every block.

    Same values as ``np.median(np.stack(...), axis=0)`` (the mean of the two middle
    values for an even number of replies).
    """
    n = len(columns)
    lo, hi = (n - 1) // 2, n // 2

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        if lo == hi:
            out[...] = stack[lo]
        else:
            np.add(stack[lo], stack[hi], out=out)
            out *= 0.5

    return _order_statistic(columns, reduce)


def trimmed_mean(columns: Columns, beta: float) -> list[np.ndarray]:
    """Return the coordinate-wise trimmed mean over replies of every block.

    ``int(beta * N)`` values are cut from each end, as in Flower's
    ``FedTrimmedAvg`` (and ``scipy.stats.trim_mean``).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError("`beta` must be in the range [0, 0.5).")
    n = len(columns)
    cut = int(beta * n)
    keep = n - 2 * cut

    def reduce(stack: np.ndarray, out: np.ndarray) -> None:
        np.sum(stack[cut : n - cut], axis=0, out=out)
        out /= keep

    return _order_statistic(columns, reduce)


def gram_matrix(
    columns: Columns,
    reference: Sequence[np.ndarray] | None = None,
    blocks: Sequence[int] | None = None,
) -> np.ndarray:
    """Return the (N, N) Gram matrix of the flattened replies (or their updates).

    ``G_ij = <x_i - r, x_j - r>`` over the selected blocks (default: all float
    blocks), computed chunk by chunk (products in the block precision, sums of
    chunks in float64). A reply with non-finite values gets a non-finite diagonal.
    """
    n = len(columns)
    gram = np.zeros((n, n), dtype=np.float64)
    if n == 0:
        return gram
    if blocks is None:
        blocks = [b for b, col in enumerate(columns[0]) if col.dtype.kind == "f"]
    for b in blocks:
        size = columns[0][b].size
        dtype = _accumulator_dtype(columns[0][b].dtype)
        width = _stack_width(n, dtype.itemsize)
        buffer = np.empty((n, min(width, max(size, 1))), dtype=dtype)
        ref = None if reference is None else reference[b]
        for start in range(0, size, width):
            stop = min(start + width, size)
            stack = buffer[:, : stop - start]
            for k in range(n):
                if ref is None:
                    stack[k] = columns[k][b][start:stop]
                else:
                    np.subtract(
                        columns[k][b][start:stop],
                        ref[start:stop],
                        out=stack[k],
                        casting="unsafe",
                    )
            with np.errstate(invalid="ignore", over="ignore"):
                gram += stack @ stack.T
    return gram


def update_sq_norms(
    columns: Columns,
    reference: Sequence[np.ndarray] | None = None,
    blocks: Sequence[int] | None = None,
) -> np.ndarray:
    """Return ``||x_k - r||^2`` per reply over the float blocks (one pass each).

    Non-finite values in a reply (or a squared norm overflowing a chunk's precision)
    give a non-finite result, so this doubles as the finiteness check.
    """
    n = len(columns)
    norms = np.zeros(n, dtype=np.float64)
    if n == 0:
        return norms
    if blocks is None:
        blocks = [b for b, col in enumerate(columns[0]) if col.dtype.kind == "f"]
    for b in blocks:
        size = columns[0][b].size
        dtype = _accumulator_dtype(columns[0][b].dtype)
        width = min(size, 1 << 16) or 1
        tmp = np.empty(width, dtype=dtype)
        ref = None if reference is None else reference[b]
        for k in range(n):
            col = columns[k][b]
            with np.errstate(invalid="ignore", over="ignore"):
                if ref is None and col.dtype == dtype:
                    norms[k] += float(np.dot(col, col))
                    continue
                for start in range(0, size, width):
                    stop = min(start + width, size)
                    t = tmp[: stop - start]
                    if ref is None:
                        t[...] = col[start:stop]
                    else:
                        np.subtract(
                            col[start:stop], ref[start:stop], out=t, casting="unsafe"
                        )
                    norms[k] += float(np.dot(t, t))
    return norms


def euclidean_distances(gram: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Pairwise Euclidean distances from a Gram matrix (zero diagonal).

    Squared distances below ``rtol * (G_ii + G_jj)`` (rounding noise of the Gram
    identity) are snapped to 0, so identical vectors are exactly at distance 0.
    """
    diag = np.diag(gram)
    sq = diag[:, None] + diag[None, :] - 2.0 * gram
    sq = 0.5 * (sq + sq.T)
    sq[sq < rtol * (diag[:, None] + diag[None, :])] = 0.0
    np.fill_diagonal(sq, 0.0)
    return np.sqrt(np.maximum(sq, 0.0))


def cosine_distances(gram: np.ndarray, zero_norm_distance: float = 1.0) -> np.ndarray:
    """Pairwise cosine distances ``1 - cos`` from a Gram matrix (zero diagonal).

    A vector of zero norm has no direction: its distances to every other vector are
    set to ``zero_norm_distance`` (spec section 1.3-4) instead of NaN.
    """
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    zero = norms == 0.0
    safe = np.where(zero, 1.0, norms)
    dist = 1.0 - gram / safe[:, None] / safe[None, :]
    dist = np.clip(0.5 * (dist + dist.T), 0.0, 2.0)
    dist[zero, :] = zero_norm_distance
    dist[:, zero] = zero_norm_distance
    np.fill_diagonal(dist, 0.0)
    return dist


def pairwise_distances(
    columns: Columns,
    reference: Sequence[np.ndarray] | None = None,
    *,
    exact_max_elements: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return Euclidean and cosine distance matrices of the replies' float blocks.

    Vectors are ``x_k - reference`` (updates) or ``x_k``. When ``N * d`` is at most
    ``exact_max_elements`` the vectors are stacked and ``scipy.spatial.distance.cdist``
    is used (pairwise differences, no cancellation); otherwise the distances come from
    the chunked Gram matrix (one read of every reply). The two differ only by rounding
    (which matters only for exact ties, e.g. in hand-made examples).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``(euclidean, cosine, squared_norms)``; a non-finite squared norm marks a
        reply with non-finite values (its distances are then meaningless).
    """
    n = len(columns)
    if n == 0:
        empty = np.zeros((0, 0))
        return empty, empty, np.zeros(0)
    float_blocks = [b for b, col in enumerate(columns[0]) if col.dtype.kind == "f"]
    dim = sum(columns[0][b].size for b in float_blocks)
    if n * dim > exact_max_elements:
        gram = gram_matrix(columns, reference, float_blocks)
        sq_norms = np.diag(gram).copy()
        return euclidean_distances(gram), cosine_distances(gram), sq_norms
    stacked = np.empty((n, dim), dtype=np.float64)
    for k in range(n):
        parts = [np.asarray(columns[k][b], dtype=np.float64) for b in float_blocks]
        row = np.concatenate(parts) if parts else np.zeros(0)
        if reference is not None and parts:
            row -= np.concatenate(
                [np.asarray(reference[b], dtype=np.float64) for b in float_blocks]
            )
        stacked[k] = row
    with np.errstate(invalid="ignore", over="ignore"):
        sq_norms = np.einsum("ij,ij->i", stacked, stacked)
    finite = np.isfinite(sq_norms)
    safe = np.where(finite[:, None], stacked, 0.0)
    euclid = cdist(safe, safe)
    zero = sq_norms == 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = cdist(safe, safe, "cosine") if dim else np.zeros((n, n))
    cosine[zero, :] = 1.0
    cosine[:, zero] = 1.0
    np.fill_diagonal(cosine, 0.0)
    return euclid, cosine, sq_norms


# ----------------------------------------------------------------------------------
# Method-specific weights and scores
# ----------------------------------------------------------------------------------


def copod_scores(x: np.ndarray) -> np.ndarray:
    """COPOD outlier score of each row of ``x`` (spec section 1.3).

    Copula-based outlier detection (Li et al., ICDM 2020,
    https://arxiv.org/abs/2009.09463), computed in one pass as pyod's
    ``COPOD().fit(X).decision_function(X)`` does::

        F_l(x_ij) = #{r: x_rj <= x_ij} / K      U_l = -ln F_l
        F_r(x_ij) = #{r: x_rj >= x_ij} / K      U_r = -ln F_r
        U_s = U_l if skew_j < 0, U_r if skew_j > 0, U_l + U_r if skew_j = 0
        score_i = sum_j max(U_s_ij, (U_l_ij + U_r_ij) / 2)

    with the population skewness of each column. A constant column has undefined
    skewness, which makes every score NaN (as in pyod); callers fall back.

    Parameters
    ----------
    x : np.ndarray
        (K, M) matrix, one row per sample.

    Returns
    -------
    np.ndarray
        (K,) scores; larger means more outlying.
    """
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0]
    # counts[i, j] = #{r : x[r, j] <= x[i, j]} via sorted columns
    ordered = np.sort(x, axis=0)
    f_left = np.empty_like(x)
    f_right = np.empty_like(x)
    for j in range(x.shape[1]):
        col = ordered[:, j]
        f_left[:, j] = np.searchsorted(col, x[:, j], side="right")
        f_right[:, j] = k - np.searchsorted(col, x[:, j], side="left")
    u_left = -np.log(f_left / k)
    u_right = -np.log(f_right / k)
    mean = x.mean(axis=0)
    centred = x - mean
    m2 = np.mean(centred**2, axis=0)
    m3 = np.mean(centred**3, axis=0)
    eps = np.finfo(np.float64).eps
    with np.errstate(invalid="ignore", divide="ignore"):
        skew = np.where(m2 <= (eps * mean) ** 2, np.nan, m3 / m2**1.5)
    sign = np.sign(skew)
    u_skew = -u_left * np.sign(sign - 1) + u_right * np.sign(sign + 1)
    outlying = np.maximum(u_skew, 0.5 * (u_left + u_right))
    return outlying.sum(axis=1)


def softmin_weights(scores: np.ndarray) -> np.ndarray:
    """Return ``exp(-a_k) / sum_j exp(-a_j)`` (shifted for stability)."""
    a = np.asarray(scores, dtype=np.float64)
    e = np.exp(-(a - a.min()))
    return e / e.sum()


def fedcostwavg_weights(
    num_examples: Sequence[float] | np.ndarray,
    loss_before: Sequence[float] | np.ndarray,
    loss_after: Sequence[float] | np.ndarray,
    alpha: float = 0.5,
    loss_floor: float = 1e-12,
) -> np.ndarray:
    """Return FedCostWAvg weights ``p_k = alpha n_k/N + (1 - alpha) k_k/K``.

    ``k_k = L_before / max(L_after, loss_floor)`` is the cost improvement of client
    k (Mächler et al. 2021, https://arxiv.org/abs/2111.08649). If the improvements
    are unusable (non-finite, negative or summing to 0), plain data-size weights are
    returned (alpha = 1).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("`alpha` must be in [0, 1]")
    n = np.asarray(num_examples, dtype=np.float64)
    q = n / n.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.asarray(loss_before, dtype=np.float64) / np.maximum(
            np.asarray(loss_after, dtype=np.float64), loss_floor
        )
    total = ratio.sum()
    if not np.all(np.isfinite(ratio)) or np.any(ratio < 0) or total <= 0:
        return q
    return alpha * q + (1.0 - alpha) * ratio / total


def fedfocus_weights(
    num_examples: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    server_round: int,
    *,
    beta: float = 1.0,
    lambda0: float = 0.5,
    gamma: float = 0.8,
    mode: str = "convex",
    direction: int = 1,
) -> np.ndarray:
    """Return FedFocus / loss-weighted aggregation weights (spec section 1.2).

    Our reconstruction (the paper's exact equations were not retrievable)::

        s_k = L_k^(direction * beta) / sum_j L_j^(direction * beta)
        q_k = n_k / N
        lambda_t = lambda0 * gamma^(t - 1)
        convex:   p_k = (1 - lambda_t) q_k + lambda_t s_k   (lambda_t clipped to [0, 1])
        additive: p_k ∝ q_k + lambda_t s_k

    If all losses are 0 (or the loss term is not finite), ``s = q``.
    """
    if mode not in ("convex", "additive"):
        raise ValueError("`mode` must be 'convex' or 'additive'")
    if direction not in (1, -1):
        raise ValueError("`direction` must be 1 or -1")
    n = np.asarray(num_examples, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if np.any(loss < 0):
        raise ValueError("losses must be non-negative")
    q = n / n.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        powered = loss ** (direction * beta)
        total = powered.sum()
        s = powered / total
    if not (np.isfinite(total) and total > 0 and np.all(np.isfinite(s))):
        s = q
    lam = lambda0 * gamma ** (server_round - 1)
    if mode == "convex":
        lam = min(max(lam, 0.0), 1.0)
        return (1.0 - lam) * q + lam * s
    p = q + lam * s
    return p / p.sum()


def fednova_coefficients(
    num_examples: Sequence[float] | np.ndarray,
    nova_a: Sequence[float] | np.ndarray,
    local_steps: Sequence[float] | np.ndarray,
    proximal_mu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return FedNova's per-client coefficients (Wang et al. 2020, spec 2.1).

    With ``p_k = n_k / N`` and ``tau_eff = sum_k p_k tau_k`` if ``proximal_mu != 0``
    else ``sum_k p_k a_k``, the new model is
    ``theta - sum_k c_k (theta - theta_k)`` with ``c_k = p_k tau_eff / a_k``
    (a sum, as in the reference code, not a normalised mean).

    Returns
    -------
    tuple[np.ndarray, np.ndarray, float]
        ``(c, p, tau_eff)``.
    """
    n = np.asarray(num_examples, dtype=np.float64)
    a = np.asarray(nova_a, dtype=np.float64)
    tau = np.asarray(local_steps, dtype=np.float64)
    if np.any(a <= 0):
        raise ValueError("`nova-a` must be positive")
    p = n / n.sum()
    tau_eff = float(np.dot(p, tau) if proximal_mu != 0.0 else np.dot(p, a))
    return p * tau_eff / a, p, tau_eff

"""Numeric kernels for server-side aggregation of reply arrays.

Kernels work on *columns* (see :mod:`._wire`): for each reply, one flat array per
block of the model's layout, read in place from the reply's bytes; they return one
flat array per block. Tests can pass plain 1-D numpy arrays as columns.

Weighted sums use BLAS ``?axpy`` (``y += a x`` in place, no temporary) directly on
the replies' bytes, one call per reply and tensor, or per cache-sized chunk of a
large tensor (BLAS threads as configured, e.g. ``OPENBLAS_NUM_THREADS``); order
statistics and Gram matrices stack the replies column chunk by column chunk into a
small cache-resident buffer. The method-specific weights live with their strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg import blas
from scipy.spatial.distance import cdist

from ._wire import Columns

__all__ = [
    "cap_shares",
    "coordinate_median",
    "cosine_distances",
    "euclidean_distances",
    "fallback_weights",
    "gram_matrix",
    "normalise_weights",
    "pairwise_distances",
    "reply_magnitudes",
    "trimmed_mean",
    "update_gram",
    "update_sq_norms",
    "weighted_average",
    "weighted_sum",
]

#: Elements per BLAS axpy call on large tensors (1 MiB of float32, cache-sized).
_AXPY_CHUNK = 1 << 18

#: Number of columns of the (N, chunk) buffer used by order statistics / Gram matrix.
_STACK_BYTES = 1 << 21


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
    """Apply the fallback policy to a method's weights.

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


def reply_magnitudes(
    columns: Columns,
    reference: Sequence[np.ndarray] | None = None,
    blocks: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``||x_k - r||^2`` and ``max |x_k|`` per reply over the float blocks.

    One read of every reply, in cache-sized chunks accumulated in float64, so that
    values near the float32 limit (3e38) do not overflow into "not finite". A
    reply with NaN or infinite values gets a non-finite squared norm.
    """
    n = len(columns)
    norms = np.zeros(n, dtype=np.float64)
    largest = np.zeros(n, dtype=np.float64)
    if n == 0:
        return norms, largest
    if blocks is None:
        blocks = [b for b, col in enumerate(columns[0]) if col.dtype.kind == "f"]
    for b in blocks:
        size = columns[0][b].size
        width = min(size, 1 << 16) or 1
        tmp = np.empty(width, dtype=np.float64)
        ref = None if reference is None else reference[b]
        for k in range(n):
            col = columns[k][b]
            with np.errstate(invalid="ignore", over="ignore"):
                for start in range(0, size, width):
                    stop = min(start + width, size)
                    t = tmp[: stop - start]
                    t[...] = col[start:stop]
                    chunk_max = float(np.max(np.abs(t))) if stop > start else 0.0
                    largest[k] = max(largest[k], chunk_max)
                    if ref is not None:
                        t -= ref[start:stop]
                    norms[k] += float(np.dot(t, t))
    return norms, largest


def update_sq_norms(
    columns: Columns,
    reference: Sequence[np.ndarray] | None = None,
    blocks: Sequence[int] | None = None,
) -> np.ndarray:
    """Return ``||x_k - r||^2`` per reply (see :func:`reply_magnitudes`)."""
    return reply_magnitudes(columns, reference, blocks)[0]


def update_gram(
    columns: Columns, reference: Sequence[np.ndarray] | None, blocks: Sequence[int]
) -> np.ndarray:
    """Return the Gram matrix ``G[k, j] = <x_k - r, x_j - r>`` over ``blocks``.

    float64, computed in chunks of at most 2**16 values per reply (one small
    matrix product per chunk), so a large model needs no copy of the updates. The
    diagonal holds the squared update norms.
    """
    n = len(columns)
    gram = np.zeros((n, n), dtype=np.float64)
    for b in blocks:
        size = columns[0][b].size if n else 0
        width = min(size, 1 << 16) or 1
        chunk = np.empty((n, width), dtype=np.float64)
        ref = None if reference is None else reference[b]
        for start in range(0, size, width):
            stop = min(start + width, size)
            t = chunk[:, : stop - start]
            for k in range(n):
                t[k] = columns[k][b][start:stop]
            if ref is not None:
                t -= ref[start:stop]
            with np.errstate(invalid="ignore", over="ignore"):
                gram += t @ t.T
    return gram


def cap_shares(weights: Sequence[float] | np.ndarray, max_share: float) -> np.ndarray:
    """Cap normalised weights at ``max_share``, giving the excess to the others.

    Water-filling: every weight above the cap is set to it and the rest are scaled
    up in proportion, repeated until none exceeds it. The result sums to 1 and keeps
    the order of the weights. With fewer than ``1 / max_share`` weights no cap can
    hold, and the weights become uniform (the closest they can get).

    Parameters
    ----------
    weights : Sequence[float]
        Non-negative weights summing to 1.
    max_share : float
        The largest share any weight may have, in ``(0, 1]``.
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    n = len(w)
    if n == 0 or max_share >= 1.0:
        return w
    if n * max_share <= 1.0:
        return np.full(n, 1.0 / n)
    capped = np.zeros(n, dtype=bool)
    while True:
        over = ~capped & (w > max_share * (1 + 1e-12))
        if not over.any():
            return w
        capped |= over
        w[capped] = max_share
        free = ~capped
        budget = 1.0 - max_share * capped.sum()
        total = w[free].sum()
        w[free] = w[free] * budget / total if total > 0 else budget / free.sum()


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
    set to ``zero_norm_distance`` instead of NaN (Alkhunaizi et al., MICCAI 2022).
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

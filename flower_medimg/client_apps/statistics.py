"""Data statistics at the site: summaries of its own images and labels, never pixels.

The server's statistics phase (:mod:`flower_medimg.lifecycle.statistics`) sends every
site a ``query`` message with a fixed bin grid; :func:`statistics_reply` answers it
with :func:`summarise_site` of the site's training and validation data: an intensity
histogram on that grid, voxel count, sum and sum of squares, image shapes and
spacings, and label counts. A site whose ``node_config`` sets
``share-statistics = false`` replies with an error instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from flower_medimg.core import protocol
from flower_medimg.core.settings import Settings
from flower_medimg.data import site_datasets

__all__ = ["statistics_reply", "summarise_site"]


def summarise_site(
    samples: Iterable[Mapping[str, Any]],
    bins: int,
    value_range: tuple[float, float],
    num_classes: int,
) -> dict[str, Any]:
    """Summarise a site's images and labels (the values its reply carries).

    Parameters
    ----------
    samples : Iterable[Mapping]
        Dataset items with ``"image"`` (channel-first) and ``"label"`` (a mask or a
        class index); ``image.meta["pixdim"]`` is read when present.
    bins : int
        Number of histogram bins on ``value_range``.
    value_range : tuple[float, float]
        The fixed intensity grid every site uses.
    num_classes : int
        Label values counted (at least; larger labels extend the counts).

    Returns
    -------
    dict
        ``num-images``, ``histogram`` (list of ``bins`` counts), ``below`` and
        ``above`` (voxels outside the grid), ``count``, ``sum``, ``sum-sq``,
        ``shape-min``/``shape-max`` (spatial shape), ``spacing-mean`` (empty if
        unknown) and ``label-counts``.
    """
    lo, hi = value_range
    histogram = np.zeros(bins, dtype=np.int64)
    below = above = count = num_images = 0
    total = total_sq = 0.0
    shapes, spacings = [], []
    labels = np.zeros(num_classes, dtype=np.int64)
    for item in samples:
        image = np.asarray(item["image"], dtype=np.float64)
        num_images += 1
        shapes.append(image.shape[1:])
        pixdim = getattr(item["image"], "meta", {}).get("pixdim")
        if pixdim is not None:
            spacings.append(np.asarray(pixdim, dtype=np.float64).ravel()[1:4])
        values = image.ravel()
        histogram += np.histogram(values, bins=bins, range=(lo, hi))[0]
        below += int(np.sum(values < lo))
        above += int(np.sum(values > hi))
        count += values.size
        total += float(values.sum())
        total_sq += float(np.dot(values, values))
        label = np.asarray(item["label"]).astype(np.int64).ravel()
        found = np.bincount(label, minlength=num_classes)
        if found.size > labels.size:
            labels = np.pad(labels, (0, found.size - labels.size))
        labels[: found.size] += found
    shape_array = np.array(shapes or [[0]], dtype=np.int64)
    return {
        "num-images": num_images,
        "histogram": histogram.tolist(),
        "below": below,
        "above": above,
        "count": count,
        "sum": total,
        "sum-sq": total_sq,
        "shape-min": shape_array.min(axis=0).tolist(),
        "shape-max": shape_array.max(axis=0).tolist(),
        "spacing-mean": np.mean(spacings, axis=0).tolist() if spacings else [],
        "label-counts": labels.tolist(),
    }


def _declines(node_config: Mapping[str, Any]) -> bool:
    value = node_config.get(protocol.NODE_SHARE_STATISTICS, True)
    return str(value).strip().lower() in ("false", "0", "no", "off")


def statistics_reply(msg: Message, context: Context, settings: Settings) -> Message:
    """Answer the statistics query at a site (the ClientApp's ``query`` handler).

    Replies with an error when ``node_config["share-statistics"]`` is false.
    """
    if _declines(context.node_config):
        return Message(
            Error(
                code=protocol.ERROR_REFUSED,
                reason="the site declines to share data statistics",
            ),
            reply_to=msg,
        )
    query = msg.content[protocol.RECORD_CONFIG]
    train_ds, val_ds = site_datasets(settings, context.node_config)
    values = summarise_site(
        (item for ds in (train_ds, val_ds) for item in ds),
        int(query[protocol.QUERY_BINS]),
        (
            float(query[protocol.QUERY_RANGE_MIN]),
            float(query[protocol.QUERY_RANGE_MAX]),
        ),
        settings.num_classes,
    )
    values[protocol.METRIC_NUM_TRAIN] = len(train_ds)
    partition = context.node_config.get(protocol.NODE_PARTITION_ID)
    if partition is not None:
        values[protocol.METRIC_PARTITION_ID] = int(partition)
    return Message(
        RecordDict({protocol.RECORD_STATISTICS: MetricRecord(values)}), reply_to=msg
    )

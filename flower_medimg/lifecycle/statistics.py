"""Federated data statistics: what each site's images and labels look like.

Before training the server sends every site a ``query`` message with a fixed bin
grid; each site answers with summaries of its own data only (an intensity
histogram on that grid, voxel count, sum and sum of squares, image shapes and
spacings, label counts), never an image. The server pools them (exactly: the
histograms add up, mean and std follow from the sums), writes a table and a plot,
and flags every site whose intensity histogram is far from that of every other site
(Jensen-Shannon distance to the closest other site). A site whose ``node_config`` sets
``share-statistics = false`` replies with an error; it is logged and the run goes
on without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from PIL import Image, ImageDraw
from scipy.spatial.distance import jensenshannon

from flower_medimg.core import protocol
from flower_medimg.core.settings import Settings

from .node_deadline import NodeDeadlineGrid

__all__ = [
    "SiteStatistics",
    "StatisticsReport",
    "check_site_statistics",
    "collect_statistics",
    "js_distance",
    "pool_statistics",
]


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two histograms.

    ``sqrt(JSD)`` with ``JSD = (KL(p||m) + KL(q||m)) / 2`` and ``m = (p + q) / 2``
    of the normalised histograms (Lin 1991, https://doi.org/10.1109/18.61115),
    computed by :func:`scipy.spatial.distance.jensenshannon`.
    """
    return float(jensenshannon(p, q, base=2))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (math.isfinite(value))
    )


def _whole_list(value: Any) -> bool:
    return isinstance(value, list) and all(_whole(v) for v in value)


#: What each key of a statistics reply must hold (``num-train`` and
#: ``partition-id`` may be missing: a site that does not say gets no bound).
_STATISTICS_CHECKS = {
    "num-images": (_whole, "a whole number >= 0"),
    "histogram": (_whole_list, "a list of whole numbers >= 0"),
    "below": (_whole, "a whole number >= 0"),
    "above": (_whole, "a whole number >= 0"),
    "count": (lambda v: _whole(v) and v > 0, "a whole number > 0"),
    "sum": (_finite, "a finite number"),
    "sum-sq": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "shape-min": (_whole_list, "a list of whole numbers >= 0"),
    "shape-max": (_whole_list, "a list of whole numbers >= 0"),
    "spacing-mean": (
        lambda v: isinstance(v, list) and all(_finite(x) for x in v),
        "a list of finite numbers",
    ),
    "label-counts": (_whole_list, "a list of whole numbers >= 0"),
    protocol.METRIC_NUM_TRAIN: (_whole, "a whole number >= 0"),
    protocol.METRIC_PARTITION_ID: (_whole, "a whole number >= 0"),
}
_OPTIONAL_STATISTICS = (protocol.METRIC_NUM_TRAIN, protocol.METRIC_PARTITION_ID)


def check_site_statistics(values: dict[str, Any], bins: int) -> None:
    """Check a site's statistics reply before anything reads it.

    Raises
    ------
    ValueError
        Naming the first key that is missing, unknown, of the wrong type, or
        inconsistent with the others (a histogram of another length than the
        query's ``bins``, counts that do not add up, more training images than
        images).
    """
    for key in values:
        if key not in _STATISTICS_CHECKS:
            raise ValueError(f"unknown key {key!r}")
    for key, (check, expected) in _STATISTICS_CHECKS.items():
        if key not in values:
            if key in _OPTIONAL_STATISTICS:
                continue
            raise ValueError(f"{key!r} is missing")
        if not check(values[key]):
            raise ValueError(f"{key!r} must be {expected}, got {values[key]!r}")
    if len(values["histogram"]) != bins:
        raise ValueError(
            f"'histogram' has {len(values['histogram'])} bins, the query asked {bins}"
        )
    if sum(values["histogram"]) + values["below"] + values["above"] != values["count"]:
        raise ValueError("'histogram' + 'below' + 'above' does not add up to 'count'")
    if values.get(protocol.METRIC_NUM_TRAIN, 0) > values["num-images"]:
        raise ValueError(
            f"{protocol.METRIC_NUM_TRAIN!r} = {values[protocol.METRIC_NUM_TRAIN]} is "
            f"more than 'num-images' = {values['num-images']}"
        )


@dataclass
class SiteStatistics:
    """One site's summaries and how they compare with the other sites."""

    node_id: int
    values: dict[str, Any]
    distance: float = math.nan
    flagged: bool = False

    @property
    def mean(self) -> float:
        """Mean intensity."""
        return self.values["sum"] / self.values["count"]

    @property
    def std(self) -> float:
        """Intensity standard deviation."""
        mean = self.mean
        return math.sqrt(max(self.values["sum-sq"] / self.values["count"] - mean**2, 0))

    def full_histogram(self) -> np.ndarray:
        """Return the histogram with the below/above-range counts as end bins."""
        v = self.values
        return np.array([v["below"], *v["histogram"], v["above"]], dtype=np.float64)

    @property
    def label(self) -> str:
        """Node id, with the simulation's partition id when known."""
        partition = self.values.get(protocol.METRIC_PARTITION_ID)
        return f"{self.node_id}" + (
            f" (site {partition})" if partition is not None else ""
        )


@dataclass
class StatisticsReport:
    """The statistics phase's result."""

    sites: list[SiteStatistics] = field(default_factory=list)
    declined: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    pooled: dict[str, Any] = field(default_factory=dict)

    @property
    def num_train(self) -> dict[int, int]:
        """Each site's reported training-set size (sites that reported one)."""
        return {
            s.node_id: s.values[protocol.METRIC_NUM_TRAIN]
            for s in self.sites
            if protocol.METRIC_NUM_TRAIN in s.values
        }

    @property
    def flagged(self) -> list[int]:
        """Node ids of the flagged sites."""
        return [s.node_id for s in self.sites if s.flagged]


def pool_statistics(
    sites: list[SiteStatistics], flag_distance: float, flag_factor: float = 1.5
) -> dict[str, Any]:
    """Pool the sites' summaries and flag outlying intensity distributions.

    Each site's distance is the Jensen-Shannon distance between its histogram and
    that of its *closest* other site. A site is flagged when that distance is above
    ``flag_distance`` *and* above ``flag_factor`` times the median of all sites'
    distances: relative to how far apart the sites are anyway, so sites that all
    differ alike (every hospital its own scanner) are not flagged, while one that
    differs from every other far more than they differ among themselves is. With
    two sites there is no spread to compare with: both are flagged when their
    distance is above ``flag_distance`` (they differ, and neither can be told to be
    the outlier). Sets ``distance`` and ``flagged`` on every site; returns the
    pooled summaries, with the distance above which a site was flagged
    (``flag-bound``).
    """
    full = [s.full_histogram() for s in sites]
    bound = flag_distance
    if len(sites) > 1:
        for i, site in enumerate(sites):
            site.distance = min(
                js_distance(full[i], h) for j, h in enumerate(full) if j != i
            )
        if len(sites) > 2:
            typical = float(np.median([site.distance for site in sites]))
            bound = max(flag_distance, flag_factor * typical)
        for site in sites:
            site.flagged = site.distance > bound
    count = sum(s.values["count"] for s in sites)
    total = sum(s.values["sum"] for s in sites)
    total_sq = sum(s.values["sum-sq"] for s in sites)
    mean = total / count if count else math.nan
    labels = [s.values["label-counts"] for s in sites]
    width = max((len(c) for c in labels), default=0)
    return {
        "flag-bound": bound,
        "num-sites": len(sites),
        "num-images": sum(s.values["num-images"] for s in sites),
        "count": count,
        "mean": mean,
        "std": math.sqrt(max(total_sq / count - mean**2, 0.0)) if count else math.nan,
        "histogram": np.sum([s.values["histogram"] for s in sites], axis=0).tolist()
        if sites
        else [],
        "label-counts": np.sum([c + [0] * (width - len(c)) for c in labels], axis=0)
        .astype(int)
        .tolist()
        if sites
        else [],
    }


def _table(report: StatisticsReport) -> str:
    lines = [
        "| node | images | mean | std | below/above | shape | label counts "
        "| JS distance | flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.sites:
        v = s.values
        shape = "x".join(map(str, v["shape-min"]))
        if v["shape-max"] != v["shape-min"]:
            shape += " .. " + "x".join(map(str, v["shape-max"]))
        lines.append(
            f"| {s.label} | {v['num-images']} | {s.mean:.4f} | {s.std:.4f} | "
            f"{v['below']}/{v['above']} | {shape} | {v['label-counts']} | "
            f"{s.distance:.3f} | {'YES' if s.flagged else 'no'} |"
        )
    p = report.pooled
    lines.append(
        f"| pooled | {p['num-images']} | {p['mean']:.4f} | {p['std']:.4f} | | | "
        f"{p['label-counts']} | | |"
    )
    for node_id, reason in report.declined.items():
        lines.append(f"| {node_id} | declined: {reason} | | | | | | | |")
    for node_id, reason in report.rejected.items():
        lines.append(f"| {node_id} | rejected: {reason} | | | | | | | |")
    return "\n".join(lines)


_COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def _plot(
    report: StatisticsReport, path: Path, value_range: tuple[float, float]
) -> None:
    """Draw every site's normalised histogram (flagged sites dashed) and the pool."""
    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    curves = [
        (
            s.label + (" FLAGGED" if s.flagged else ""),
            np.asarray(s.values["histogram"], float),
            _COLOURS[i % len(_COLOURS)],
        )
        for i, s in enumerate(report.sites)
    ]
    curves.append(("pooled", np.asarray(report.pooled["histogram"], float), (0, 0, 0)))
    peak = max((c.max() / max(c.sum(), 1) for _, c, _ in curves), default=1.0) or 1.0
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for index, (name, counts, colour) in enumerate(curves):
        share = counts / max(counts.sum(), 1)
        xs = np.linspace(margin, width - margin, len(share))
        ys = height - margin - share / peak * (height - 2 * margin)
        draw.line(
            list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=colour, width=2
        )
        draw.text((margin + 10, margin + 5 + 12 * index), name, fill=colour)
    draw.text((margin, height - margin + 5), f"{value_range[0]:g}", fill="black")
    draw.text(
        (width - margin - 20, height - margin + 5), f"{value_range[1]:g}", fill="black"
    )
    draw.text(
        (width // 2 - 80, height - margin + 20),
        "intensity (share of voxels per bin)",
        fill="black",
    )
    image.save(path)


def _connected_sites(grid: Grid) -> list[int]:
    """Return the connected nodes, once the run's required sites are connected."""
    if isinstance(grid, NodeDeadlineGrid):
        return grid.wait_for_nodes()
    return list(grid.get_node_ids())


def collect_statistics(
    grid: Grid, settings: Settings, out_dir: Path, timeout: float
) -> StatisticsReport:
    """Run the statistics phase: query every connected site, pool, flag, write.

    Writes ``statistics.json``, ``statistics.md`` and ``statistics.png`` to
    ``out_dir`` and logs the table.
    """
    bins = settings["stats.bins"]
    value_range = (settings["stats.range-min"], settings["stats.range-max"])
    flag_distance = settings["stats.flag-distance"]
    flag_factor = settings["stats.flag-factor"]
    query = ConfigRecord(
        {
            protocol.QUERY_BINS: bins,
            protocol.QUERY_RANGE_MIN: value_range[0],
            protocol.QUERY_RANGE_MAX: value_range[1],
        }
    )
    messages = [
        Message(
            RecordDict({protocol.RECORD_CONFIG: query}),
            dst_node_id=node_id,
            message_type=protocol.QUERY_STATISTICS,
        )
        for node_id in sorted(_connected_sites(grid))
    ]
    report = StatisticsReport()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = int(reply.metadata.src_node_id)
        if reply.has_error():
            report.declined[node_id] = reply.error.reason
            log(
                WARNING,
                "flower-medimg: node %d sent no statistics: %s",
                node_id,
                reply.error.reason,
            )
            continue
        try:
            values = dict(reply.content[protocol.RECORD_STATISTICS])
            check_site_statistics(values, bins)
        except Exception as err:  # pylint: disable=broad-exception-caught
            report.rejected[node_id] = f"invalid statistics: {err}"
            log(WARNING, "flower-medimg: node %d: invalid statistics: %s", node_id, err)
            continue
        report.sites.append(SiteStatistics(node_id, values))
    report.sites.sort(key=lambda s: s.node_id)
    report.pooled = pool_statistics(report.sites, flag_distance, flag_factor)
    table = _table(report)
    for line in table.splitlines():
        log(INFO, "flower-medimg: %s", line)
    for site in report.sites:
        if site.flagged:
            log(
                WARNING,
                "flower-medimg: node %s has a strongly different intensity "
                "distribution (Jensen-Shannon distance %.3f to the closest other "
                "site, above %.3f: stats.flag-distance %g, or %g x the sites' median "
                "with three sites or more)",
                site.label,
                site.distance,
                report.pooled["flag-bound"],
                flag_distance,
                flag_factor,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "statistics.md").write_text(table + "\n")
    (out_dir / "statistics.json").write_text(
        json.dumps(
            {
                "sites": [
                    {
                        "node-id": s.node_id,
                        **s.values,
                        "mean": s.mean,
                        "std": s.std,
                        "js-distance": s.distance,
                        "flagged": s.flagged,
                    }
                    for s in report.sites
                ],
                "declined": {str(k): v for k, v in report.declined.items()},
                "rejected": {str(k): v for k, v in report.rejected.items()},
                "pooled": report.pooled,
                "bins": bins,
                "range": list(value_range),
            },
            indent=2,
        )
    )
    if report.sites:
        _plot(report, out_dir / "statistics.png", value_range)
    return report

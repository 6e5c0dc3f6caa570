"""Cross-site validation: every site evaluates every final model.

After training the server sends each connected site an ``evaluate`` message for
each model (the final global model, and the best one when it is another round).
A site evaluates the received shared parameters merged with its own private
parameters (FLOP head, FedBN norms), so with ``private-params`` set every cell is
that site's personalised model; private parameters never leave their site, so one site's
personalised model is not evaluated at another. The result is a site x model
matrix, written as ``cross_site.csv`` (one row per site, model and metric) and
``cross_site.md`` (one table per metric).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flower_medimg.core import protocol

__all__ = ["cross_site_matrix", "write_matrix"]

Matrix = dict[str, dict[str, dict[str, float]]]


def cross_site_matrix(
    grid: Grid,
    models: Mapping[str, ArrayRecord],
    server_round: int,
    timeout: float,
) -> Matrix:
    """Have every connected site evaluate every model.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    models : Mapping[str, ArrayRecord]
        Model name (a column of the matrix) -> global arrays.
    server_round : int
        Sent as ``server-round`` in the evaluate config.
    timeout : float
        Seconds to wait for the replies.

    Returns
    -------
    dict
        ``{site: {model: {metric: value}}}`` with the site named by its node id
        (and its partition id in simulation); a site that failed is logged and
        left out of that model's column.
    """
    node_ids = sorted(grid.get_node_ids())
    cells: dict[int, dict[str, dict[str, float]]] = {n: {} for n in node_ids}
    partitions: dict[int, int] = {}
    for name, arrays in models.items():
        messages = [
            Message(
                RecordDict(
                    {
                        protocol.RECORD_ARRAYS: arrays,
                        protocol.RECORD_CONFIG: ConfigRecord(
                            {protocol.CONFIG_SERVER_ROUND: server_round}
                        ),
                    }
                ),
                dst_node_id=node_id,
                message_type=MessageType.EVALUATE,
            )
            for node_id in node_ids
        ]
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node_id = int(reply.metadata.src_node_id)
            if reply.has_error():
                log(
                    WARNING,
                    "flower-medimg: cross-site: node %d could not evaluate %s: %s",
                    node_id,
                    name,
                    reply.error.reason,
                )
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            if protocol.METRIC_PARTITION_ID in metrics:
                partitions[node_id] = int(metrics[protocol.METRIC_PARTITION_ID])  # type: ignore[arg-type]
            cells[node_id][name] = {
                key: float(value)
                for key, value in metrics.items()
                if key not in protocol.SITE_BOOKKEEPING_METRICS
                and isinstance(value, (int, float))
            }
    return {
        f"{n} (site {partitions[n]})" if n in partitions else str(n): row
        for n, row in cells.items()
    }


def write_matrix(matrix: Matrix, models: list[str], out_dir: Path) -> str:
    """Write ``cross_site.csv`` and ``cross_site.md``; return the Markdown."""
    metrics = sorted(
        {key for row in matrix.values() for cell in row.values() for key in cell}
    )
    with (out_dir / "cross_site.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["site", "model", "metric", "value"])
        for site, row in matrix.items():
            for model in models:
                for key in metrics:
                    value = row.get(model, {}).get(key)
                    writer.writerow([site, model, key, "" if value is None else value])
    blocks = []
    for key in metrics:
        lines = [f"**{key}**", "", "| site | " + " | ".join(models) + " |"]
        lines.append("|---" * (len(models) + 1) + "|")
        for site, row in matrix.items():
            values = [row.get(m, {}).get(key) for m in models]
            lines.append(
                f"| {site} | "
                + " | ".join("failed" if v is None else f"{v:.4f}" for v in values)
                + " |"
            )
        blocks.append("\n".join(lines))
    markdown = "\n\n".join(blocks) + "\n"
    (out_dir / "cross_site.md").write_text(markdown)
    for line in markdown.splitlines():
        if line:
            log(INFO, "flower-medimg: %s", line)
    return markdown

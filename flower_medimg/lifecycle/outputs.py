"""What a run leaves behind: the global model and a per-round metrics summary.

Files in ``<output-dir>/<run-name>/``:

``global_model.pt``
    The final global model as a PyTorch ``state_dict`` (loads straight into the
    MONAI network that :func:`flower_medimg.core.models.model_from_settings`
    builds; with ``private-params`` it holds the shared parameters only).
``config.json``
    The resolved run config.
``metrics.json``
    Per round: aggregated federated train and evaluate metrics, each site's own
    metrics, central evaluation on the server-held test set and the round's wall
    time; plus the central evaluation of the initial model (round 0).
``metrics.csv``
    The same per-round numbers as a flat table (one row per round).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flower_medimg.core import protocol
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.private_params import load_shared_state
from flower_medimg.core.settings import resolve_settings
from flower_medimg.strategies.kernels import cap_shares

__all__ = ["RoundRecorder", "load_global_model", "make_run_dir", "write_outputs"]


class RoundRecorder:
    """Keep every site's metrics and each round's wall time while a strategy runs.

    :meth:`train` and :meth:`evaluate` are metric aggregation functions with the
    signature Flower's strategies expect (``train_metrics_aggr_fn``,
    ``evaluate_metrics_aggr_fn``): they record each reply's MetricRecord and return
    Flower's usual weighted average, with every site's weight capped at
    ``max_weight_share``; :meth:`evaluate` adds each metric's median over the sites
    as ``median-<key>``, a value no single site of three or more can set.
    :meth:`end_round` is the strategy's
    ``evaluate_fn``, which ``Strategy.start`` calls before round 1 and after every
    round: it files the recorded metrics under that round, stops the round's clock
    and runs the optional central evaluation (not counted in the round's time).

    Parameters
    ----------
    central_evaluation : callable, optional
        ``(arrays) -> dict`` evaluating a global model on a server-held test set.
    max_weight_share : float, optional
        The largest share of one site in the averages (None: uncapped).
    """

    def __init__(
        self,
        central_evaluation: Callable[[ArrayRecord], dict] | None = None,
        max_weight_share: float | None = None,
    ) -> None:
        self.central_evaluation = central_evaluation
        self.max_weight_share = max_weight_share
        self.rounds: dict[int, dict[str, Any]] = {}
        self._pending_train: list[dict[str, Any]] = []
        self._pending_evaluate: list[dict[str, Any]] = []
        self._round_started = time.perf_counter()

    def train(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        """Record the train replies' metrics and return their weighted average."""
        self._pending_train = _metric_dicts(records)
        return self._average(self._pending_train, weighted_by_key)

    def evaluate(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        """Record the evaluate replies' metrics; return their average and medians."""
        self._pending_evaluate = _metric_dicts(records)
        metrics = self._average(self._pending_evaluate, weighted_by_key)
        for key in list(metrics):
            if key not in protocol.SITE_BOOKKEEPING_METRICS:
                values = [m[key] for m in self._pending_evaluate if key in m]
                metrics[f"median-{key}"] = float(np.median(values))
        return metrics

    def _average(
        self, sites: list[dict[str, Any]], weighted_by_key: str
    ) -> MetricRecord:
        """Flower's weighted average of the sites' metrics, weights capped."""
        if self.max_weight_share is not None and len(sites) > 1:
            weights = np.array([float(m[weighted_by_key]) for m in sites])
            capped = cap_shares(weights / weights.sum(), self.max_weight_share)
            if not np.allclose(capped, weights / weights.sum(), rtol=0, atol=1e-12):
                sites = [
                    {**m, weighted_by_key: float(share)}
                    for m, share in zip(sites, capped, strict=True)
                ]
        records = [RecordDict({"metrics": MetricRecord(m)}) for m in sites]
        return _without_site_ids(aggregate_metricrecords(records, weighted_by_key))

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Close ``server_round`` and return its central evaluation, if any."""
        self.rounds[server_round] = {
            "clients-train": self._pending_train,
            "clients-evaluate": self._pending_evaluate,
            "wall-time-s": time.perf_counter() - self._round_started,
        }
        self._pending_train, self._pending_evaluate = [], []
        metrics = None
        if self.central_evaluation is not None:
            metrics = MetricRecord(self.central_evaluation(arrays))
        self._round_started = time.perf_counter()
        return metrics


def _without_site_ids(metrics: MetricRecord) -> MetricRecord:
    """Drop ``partition-id``: the sites' ids are recorded per site, never averaged."""
    if protocol.METRIC_PARTITION_ID in metrics:
        del metrics[protocol.METRIC_PARTITION_ID]
    return metrics


def _metric_dicts(records: list[RecordDict]) -> list[dict[str, Any]]:
    return [dict(m) for record in records for m in record.metric_records.values()]


def make_run_dir(output_dir: str | Path, run_name: str) -> Path:
    """Create ``output_dir/run_name`` (a numeric suffix keeps earlier runs)."""
    base = Path(output_dir).expanduser().resolve() / run_name
    run_dir, suffix = base, 1
    while run_dir.exists():
        suffix += 1
        run_dir = base.with_name(f"{base.name}-{suffix}")
    run_dir.mkdir(parents=True)
    return run_dir


def write_outputs(
    run_dir: Path,
    config: Mapping[str, Any],
    result: Result,
    recorder: RoundRecorder,
    num_rounds: int,
) -> dict[str, Any]:
    """Write the model, config and metrics files; return the metrics summary."""
    if result.arrays is not None:
        torch.save(result.arrays.to_torch_state_dict(), run_dir / "global_model.pt")
    (run_dir / "config.json").write_text(json.dumps(dict(config), indent=2))

    rounds = []
    for rnd in range(1, num_rounds + 1):
        recorded = recorder.rounds.get(rnd, {})
        rounds.append(
            {
                "round": rnd,
                "train": dict(result.train_metrics_clientapp.get(rnd, {})),
                "evaluate": dict(result.evaluate_metrics_clientapp.get(rnd, {})),
                "central": dict(result.evaluate_metrics_serverapp.get(rnd, {})),
                "clients-train": recorded.get("clients-train", []),
                "clients-evaluate": recorded.get("clients-evaluate", []),
                "wall-time-s": recorded.get("wall-time-s"),
            }
        )
    summary = {
        "central-initial": dict(result.evaluate_metrics_serverapp.get(0, {})),
        "rounds": rounds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    _write_csv(run_dir / "metrics.csv", rounds)
    return summary


def _write_csv(path: Path, rounds: list[dict[str, Any]]) -> None:
    rows = []
    for entry in rounds:
        row: dict[str, Any] = {"round": entry["round"]}
        for part in ("train", "evaluate", "central"):
            row.update({f"{part}/{k}": v for k, v in entry[part].items()})
        row["wall-time-s"] = entry["wall-time-s"]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def load_global_model(run_dir: str | Path) -> torch.nn.Module:
    """Rebuild the MONAI network of a finished run and load its final weights.

    For a run with ``private-params`` the file holds the shared parameters only;
    the private ones (a FLOP head, FedBN norms) stay at their initial values, as
    they never left the sites.
    """
    run_dir = Path(run_dir)
    settings = resolve_settings(json.loads((run_dir / "config.json").read_text()))
    model = model_from_settings(settings)
    state = torch.load(run_dir / "global_model.pt", weights_only=True)
    return load_shared_state(model, state, settings["private-params"])

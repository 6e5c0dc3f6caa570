"""Stop rule and best-model selection on the per-round metrics.

A round's metrics are named ``<source>/<key>``: ``train/...`` and ``evaluate/...``
are the sites' aggregated train and evaluate MetricRecords, ``central/...`` the
server-side evaluation (see :func:`round_metrics`). The :class:`StopRule` ends the
run early when a chosen metric reaches a target or stops improving; the
:class:`BestModel` remembers the round whose global model scored best. Both keep
their whole state in a plain dict, so a resumed run continues where the crashed one
stopped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp.strategy import Result

from flower_medimg.core.settings import METRIC_SOURCES

__all__ = [
    "RESULT_ATTRIBUTES",
    "BestModel",
    "StopDecision",
    "StopRule",
    "metric_direction",
    "round_metrics",
]

#: Prefixes of round metric names and the part of Flower's ``Result`` they come from.
RESULT_ATTRIBUTES = dict(
    zip(
        METRIC_SOURCES,
        (
            "train_metrics_clientapp",
            "evaluate_metrics_clientapp",
            "evaluate_metrics_serverapp",
        ),
        strict=True,
    )
)

_LOWER_IS_BETTER = ("loss", "hd95", "distance", "error")


def round_metrics(result: Result, server_round: int) -> dict[str, float]:
    """Return one round's scalar metrics as ``{"<source>/<key>": value}``."""
    metrics: dict[str, float] = {}
    for source, attribute in RESULT_ATTRIBUTES.items():
        record = getattr(result, attribute).get(server_round, {})
        for key, value in record.items():
            if isinstance(value, (int, float)):
                metrics[f"{source}/{key}"] = float(value)
    return metrics


def metric_direction(metric: str, mode: str = "auto") -> str:
    """Return ``"min"`` or ``"max"``: whether lower or higher values are better.

    Parameters
    ----------
    metric : str
        A round metric name such as ``"central/dice"``.
    mode : {"auto", "min", "max"}
        ``"auto"`` picks ``"min"`` for losses, distances (``hd95``) and errors.

    Raises
    ------
    ValueError
        For an unknown ``mode``.
    """
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"stop.mode must be 'auto', 'min' or 'max', got {mode!r}")
    key = metric.rsplit("/", 1)[-1].lower()
    return "min" if any(word in key for word in _LOWER_IS_BETTER) else "max"


def _check_metric_name(metric: str, setting: str) -> None:
    source = metric.split("/", 1)[0]
    if "/" not in metric or source not in METRIC_SOURCES:
        raise ValueError(
            f"{setting} {metric!r} must be '<source>/<key>' with source one of "
            f"{', '.join(METRIC_SOURCES)} (e.g. 'evaluate/eval-loss', 'central/dice')"
        )


def _better(value: float, best: float | None, direction: str, margin: float) -> bool:
    if best is None:
        return True
    if direction == "min":
        return value < best - margin
    return value > best + margin


@dataclass(frozen=True)
class StopDecision:
    """Why the training loop ended.

    Attributes
    ----------
    round : int
        The last round that was run.
    reason : str
        ``"target"``, ``"patience"`` or ``"num-server-rounds"``.
    message : str
        A sentence for the log, the audit log and the registry.
    """

    round: int
    reason: str
    message: str


class StopRule:
    """Stop when a metric reaches a target or has not improved for some rounds.

    Parameters
    ----------
    metric : str
        Round metric to watch, e.g. ``"evaluate/eval-loss"`` or ``"central/dice"``.
    mode : {"auto", "min", "max"} (default: "auto")
        Whether lower or higher is better (see :func:`metric_direction`).
    target : Optional[float] (default: None)
        Stop after the first round whose value is at or beyond the target.
    patience : int (default: 0)
        Stop once ``patience`` rounds in a row did not improve the best value by more
        than ``min_delta``; 0 turns this test off.
    min_delta : float (default: 0.0)
        Smallest change that counts as an improvement.

    Raises
    ------
    ValueError
        For a malformed metric name, an unknown mode or a negative patience/min-delta.
    """

    def __init__(
        self,
        metric: str,
        mode: str = "auto",
        target: float | None = None,
        patience: int = 0,
        min_delta: float = 0.0,
    ) -> None:
        _check_metric_name(metric, "stop.metric")
        if patience < 0 or min_delta < 0:
            raise ValueError(
                f"stop.patience and stop.min-delta must be >= 0, got {patience} and "
                f"{min_delta}"
            )
        self.metric = metric
        self.direction = metric_direction(metric, mode)
        self.target = target
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_round: int | None = None
        self.stale_rounds = 0

    @property
    def active(self) -> bool:
        """Whether the rule can end the run before ``num-server-rounds``."""
        return self.target is not None or self.patience > 0

    def update(
        self, server_round: int, metrics: Mapping[str, float]
    ) -> StopDecision | None:
        """Take one round's metrics; return a decision when the run should stop.

        Raises
        ------
        ValueError
            If the rule is active and the round has no such metric (the message
            lists the round's metrics).
        """
        if not self.active:
            return None
        if self.metric not in metrics:
            raise ValueError(
                f"stop.metric {self.metric!r} is not among round {server_round}'s "
                f"metrics; available: {', '.join(sorted(metrics)) or 'none'}"
            )
        value = float(metrics[self.metric])
        if _better(value, self.best, self.direction, self.min_delta):
            self.best, self.best_round, self.stale_rounds = value, server_round, 0
        else:
            self.stale_rounds += 1
        if self.target is not None and not math.isnan(value):
            reached = (
                value <= self.target
                if self.direction == "min"
                else value >= self.target
            )
            if reached:
                return StopDecision(
                    server_round,
                    "target",
                    f"{self.metric} = {value:.6g} reached the target {self.target:g} "
                    f"in round {server_round}",
                )
        if self.patience and self.stale_rounds >= self.patience:
            return StopDecision(
                server_round,
                "patience",
                f"{self.metric} has not improved by more than {self.min_delta:g} for "
                f"{self.stale_rounds} rounds (best {self.best:.6g} in round "
                f"{self.best_round})",
            )
        return None

    def state(self) -> dict[str, Any]:
        """Return the rule's progress (for a resumed run)."""
        return {
            "best": self.best,
            "best-round": self.best_round,
            "stale-rounds": self.stale_rounds,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a state returned by :meth:`state`."""
        self.best = state["best"]
        self.best_round = state["best-round"]
        self.stale_rounds = int(state["stale-rounds"])


class BestModel:
    """Remember the round whose global model scored best on a metric.

    Ties keep the earlier round. A round without the metric (e.g. no site evaluated)
    is skipped with a warning, once.

    Parameters
    ----------
    metric : str
        Round metric, e.g. ``"central/dice"``.
    mode : {"auto", "min", "max"} (default: "auto")
        Whether lower or higher is better.
    """

    def __init__(self, metric: str, mode: str = "auto") -> None:
        _check_metric_name(metric, "stop.best-metric")
        self.metric = metric
        self.direction = metric_direction(metric, mode)
        self.best: float | None = None
        self.best_round: int | None = None
        self._warned = False

    def update(self, server_round: int, metrics: Mapping[str, float]) -> bool:
        """Take one round's metrics; return whether this round is the new best."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            if not self._warned:
                self._warned = True
                log(
                    WARNING,
                    "flower-medimg: best-model metric %r missing in round %d "
                    "(available: %s); such rounds are never the best",
                    self.metric,
                    server_round,
                    ", ".join(sorted(metrics)) or "none",
                )
            return False
        if _better(float(value), self.best, self.direction, 0.0):
            self.best, self.best_round = float(value), server_round
            return True
        return False

    def state(self) -> dict[str, Any]:
        """Return the best value and round (for a resumed run)."""
        return {"best": self.best, "best-round": self.best_round}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a state returned by :meth:`state`."""
        self.best = state["best"]
        self.best_round = state["best-round"]

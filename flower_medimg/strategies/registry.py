"""Build a Message-API strategy by name, with parameters from the run config."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from .cyclic import CyclicIncremental
from .dos import DistanceOutlierSuppression
from .fast_fedavg import FastFedAvg
from .fast_fedmedian import FastFedMedian
from .fast_fedtrimmedavg import FastFedTrimmedAvg
from .fedcostwavg import FedCostWAvg
from .fedfocus import FedFocus
from .fednova import FedNova

__all__ = ["SELF_CHECKING", "STRATEGIES", "build_strategy", "strategy_parameters"]

#: Strategy names accepted by the run config's ``strategy.name``.
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
    "fedavgm": flwr_strategy.FedAvgM,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
    "multikrum": flwr_strategy.MultiKrum,
    "bulyan": flwr_strategy.Bulyan,
    "fast-fedavg": FastFedAvg,
    "fast-fedmedian": FastFedMedian,
    "fast-fedtrimmedavg": FastFedTrimmedAvg,
    "fedcostwavg": FedCostWAvg,
    "fedfocus": FedFocus,
    "dos": DistanceOutlierSuppression,
    "fednova": FedNova,
    "cyclic": CyclicIncremental,
}

#: Strategies that check every reply themselves (the quality gate's checks).
SELF_CHECKING: tuple[type[Strategy], ...] = (FastFedAvg,)


def strategy_parameters(name: str) -> list[str]:
    """Return the constructor parameters of ``name`` in run-config spelling."""
    signature = inspect.signature(_strategy_class(name).__init__)
    return [
        p.replace("_", "-")
        for p, spec in signature.parameters.items()
        if p != "self" and spec.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def build_strategy(
    name: str, params: Mapping[str, Any] | None = None, **code_params: Any
) -> Strategy:
    """Instantiate the strategy registered as ``name``.

    Parameters
    ----------
    name : str
        A key of ``STRATEGIES`` (case-insensitive).
    params : Mapping, optional
        Constructor parameters in run-config spelling (``fraction-train``), e.g.
        ``section(config, "strategy")`` without ``name``.
    **code_params
        Constructor parameters given in code (Python spelling), such as
        ``train_metrics_aggr_fn``; used only if the strategy accepts them.

    Returns
    -------
    Strategy
        The configured strategy.

    Raises
    ------
    ValueError
        For an unknown name (listing the valid ones) or an unknown parameter (listing
        the strategy's valid parameters).
    """
    cls = _strategy_class(name)
    valid = strategy_parameters(name)
    kwargs: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in valid:
            raise ValueError(
                f"Strategy {name!r} has no parameter {key!r}; valid parameters: "
                f"{', '.join(valid)}"
            )
        kwargs[key.replace("-", "_")] = value
    for key, value in code_params.items():
        if key.replace("_", "-") in valid:
            kwargs.setdefault(key, value)
    return cls(**kwargs)


def _strategy_class(name: str) -> type[Strategy]:
    key = name.lower()
    if key not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[key]

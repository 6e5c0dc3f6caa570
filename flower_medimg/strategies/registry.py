"""Build a Message-API strategy by name, with parameters from the run config."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from flower_medimg.core.settings import SettingsError

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


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named constructor parameters of ``cls`` and of the classes it passes on to.

    A constructor that takes ``*args``/``**kwargs`` hands them to its bases, so
    their parameters count too (in method resolution order, nearest first).
    """
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        passes_on = False
        for name, spec in inspect.signature(klass.__init__).parameters.items():
            if spec.kind in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD):
                passes_on = True
            elif name != "self":
                found.setdefault(name, spec)
        if not passes_on:
            break
    return found


def strategy_parameters(name: str) -> list[str]:
    """Return the constructor parameters of ``name`` in run-config spelling."""
    return [p.replace("_", "-") for p in _constructor_parameters(_strategy_class(name))]


def _coerced(strategy: str, key: str, value: Any, spec: inspect.Parameter) -> Any:
    """Convert a run-config value to the type of the parameter's default."""
    default = spec.default
    if default is inspect.Parameter.empty or default is None:
        return value
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (kind is float or float(value).is_integer())
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SettingsError(
            f"run config strategy.{key} = {value!r} is not valid: {strategy}'s "
            f"parameter {spec.name} takes a {kind.__name__} (default {default!r})"
        )
    return kind(value)


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
    parameters = _constructor_parameters(cls)
    valid = [p.replace("_", "-") for p in parameters]
    kwargs: dict[str, Any] = {}
    for key, value in (params or {}).items():
        python_name = key.replace("-", "_")
        if python_name not in parameters:
            raise ValueError(
                f"Strategy {name!r} has no parameter {key!r}; valid parameters: "
                f"{', '.join(valid)}"
            )
        kwargs[python_name] = _coerced(name, key, value, parameters[python_name])
    for key, value in code_params.items():
        if key in parameters:
            kwargs.setdefault(key, value)
    return cls(**kwargs)


def _strategy_class(name: str) -> type[Strategy]:
    key = name.lower()
    if key not in STRATEGIES:
        raise ValueError(
            f"Unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[key]

"""The experiment's settings: Flower run config defaults and their resolution.

Flower's run config (``[tool.flwr.app.config]`` in ``pyproject.toml``; nested tables
become dotted keys such as ``model.name``) is the single place where an experiment is
set. ``DEFAULTS`` mirrors that table so the apps also run where no run config is given
(``flwr.simulation.run_simulation`` passes an empty one); a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULTS", "OPEN_PREFIXES", "resolve_config", "section"]

DEFAULTS: dict[str, Any] = {
    "task": "segmentation",
    "num-server-rounds": 5,
    "seed": 0,
    "output-dir": "outputs",
    "central-eval": True,
    "round-timeout": 600.0,
    "node-wait-timeout": 300.0,
    "model.name": "unet",
    "model.spatial-dims": 2,
    "model.norm": "instance",
    "model.channels": "",
    "train.local-epochs": 1,
    "train.lr": 0.005,
    "train.optimizer": "adam",
    "train.momentum": 0.0,
    "train.batch-size": 8,
    "data.num-sites": 4,
    "data.image-size": 64,
    "data.samples-per-site": 32,
    "data.val-fraction": 0.25,
    "data.quantity-skew": 0.5,
    "data.scanner-shift": 1.0,
    "data.label-skew": 0.0,
    "data.num-classes": 2,
    "gate.enabled": True,
    "gate.max-update-norm": 0.0,
    "gate.update-norm-factor": 0.0,
    "strategy.name": "fedavg",
    "strategy.weighted-by-key": "num-examples",
    "strategy.fraction-train": 1.0,
    "strategy.fraction-evaluate": 1.0,
    "strategy.min-train-nodes": 2,
    "strategy.min-evaluate-nodes": 2,
    "strategy.min-available-nodes": 2,
    "private-params": "none",
    "method.names": "",
    "method.harmofl-window": 0.0,
    "method.harmofl-momentum": 0.1,
    "method.harmofl-alpha": 0.05,
    "method.fedmax-beta": 1000.0,
    "sim.dropout": 0.0,
    "dp.noise-multiplier": 0.0,
    "dp.target-epsilon": 0.0,
    "dp.max-grad-norm": 1.0,
    "dp.delta": 1e-5,
    "dp.grad-sample-mode": "auto",
    "dp.user-level": "none",
    "dp.user-noise-multiplier": 1.0,
    "dp.user-clipping-norm": 1.0,
    "dp.user-num-sampled": 0,
    "dp.allow-data-dependent-weights": False,
    "privacy.filter": "none",
    "privacy.share": 1.0,
    "privacy.gamma": 0.0,
    "privacy.tau": 0.0,
    "privacy.epsilon": 1.0,
    "privacy.release-epsilon": 0.0,
    "attack.kind": "none",
    "attack.sites": "",
    "stop.metric": "evaluate/eval-loss",
    "stop.mode": "auto",
    "stop.target": "",
    "stop.patience": 0,
    "stop.min-delta": 0.0,
    "stop.best-metric": "",
    "registry.path": "registry",
    "registry.keep": "best+last",
    "registry.resume": True,
    "stats.enabled": True,
    "stats.bins": 32,
    "stats.range-min": 0.0,
    "stats.range-max": 1.0,
    "stats.flag-distance": 0.3,
    "cross-site.enabled": True,
}

#: Sections whose keys are not fixed in advance: strategy parameters are checked
#: against the chosen strategy's constructor instead.
OPEN_PREFIXES = ("strategy.",)


def resolve_config(
    run_config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge ``DEFAULTS``, Flower's run config and explicit overrides (in that order).

    Parameters
    ----------
    run_config : Mapping, optional
        ``context.run_config`` as Flower hands it to the app.
    overrides : Mapping, optional
        Settings given in code, e.g. to ``make_server_app(...)`` in a test.

    Returns
    -------
    dict
        The complete, flat configuration.

    Raises
    ------
    KeyError
        If a key is neither a known setting nor under an open section; the message
        lists the valid keys.
    """
    config = dict(DEFAULTS)
    for source in (run_config or {}, overrides or {}):
        for key, value in source.items():
            if key not in DEFAULTS and not key.startswith(OPEN_PREFIXES):
                raise KeyError(
                    f"Unknown run-config key {key!r}; valid keys: "
                    f"{', '.join(sorted(DEFAULTS))} (and any 'strategy.<parameter>')"
                )
            config[key] = value
    for key in (
        "task",
        "model.name",
        "model.norm",
        "strategy.name",
        "attack.kind",
        "dp.user-level",
        "privacy.filter",
        "stop.mode",
        "registry.keep",
    ):
        config[key] = str(config[key]).lower()
    return config


def section(config: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Return the keys under ``prefix.`` with the prefix removed."""
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in config.items() if k.startswith(start)}

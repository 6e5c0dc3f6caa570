"""ServerApp: run config -> settings -> model -> strategy -> lifecycle -> outputs.

The run config is checked first (:func:`~flower_medimg.core.settings.resolve_settings`,
every key, including those only the sites read), so a bad value stops the run
before any site trains. The rounds run through
:func:`flower_medimg.lifecycle.run_lifecycle` (the same calls as
``Strategy.start``, plus data statistics, a stop rule, the model registry, resume
and the audit log).

The global model holds only the shared parameters: with ``private-params`` set, the
initial arrays leave out the private keys, which stay at the sites.

The same ServerApp serves Flower's simulation runtime (``flwr run .``) and its
deployment runtime (SuperLink + one SuperNode per hospital).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from monai.data import DataLoader

from flower_medimg.core import protocol
from flower_medimg.core.device import device
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.private_params import private_keys, split_state
from flower_medimg.core.settings import (
    BUNDLE_TASK,
    Settings,
    check_values,
    resolve_settings,
)
from flower_medimg.core.tasks import get_task
from flower_medimg.data import central_test_dataset
from flower_medimg.lifecycle import run_lifecycle
from flower_medimg.lifecycle.driver import LifecycleError
from flower_medimg.lifecycle.node_deadline import NodeDeadlineGrid
from flower_medimg.lifecycle.outputs import RoundRecorder, make_run_dir, write_outputs
from flower_medimg.strategies import QualityGate, make_user_level_dp
from flower_medimg.strategies.compressed import DecompressUpdates
from flower_medimg.strategies.registry import SELF_CHECKING, build_strategy
from flower_medimg.strategies.secagg import SecAggPlus, secure_mean_problem

__all__ = ["app", "central_evaluator", "make_server_app", "run_experiment"]


def central_evaluator(settings: Settings) -> Callable[[ArrayRecord], dict[str, float]]:
    """Evaluate global arrays on the server-held synthetic test sets.

    Both are held out from every site: new patients at the sites' scanners (the
    metrics under their own names, ``central/dice``) and at a scanner no site has
    (``central/unseen-dice``: a hospital that did not train).
    """
    task = get_task(settings["task"])
    batch_size = settings["train.batch-size"]
    loaders = {
        prefix: DataLoader(central_test_dataset(settings, scanners), batch_size)
        for prefix, scanners in (("", "seen"), ("unseen-", "unseen"))
    }
    model = model_from_settings(settings)
    dev = device()

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.to(dev)
        return {
            f"{prefix}{key}": value
            for prefix, loader in loaders.items()
            for key, value in task.evaluate(model, loader, dev).items()
        }

    return evaluate


def build_gated_strategy(settings: Settings, recorder: RoundRecorder) -> Strategy:
    """Build the configured strategy behind the quality gate (``gate.*``).

    Our strategies check every reply themselves (the bounds are passed to them);
    Flower's are wrapped in :class:`~flower_medimg.strategies.QualityGate`, so one
    malformed or poisoned reply never raises out of a round or poisons the model.

    Raises
    ------
    ValueError
        For an unknown strategy or parameter (the message lists the valid ones).
    """
    params = settings.section("strategy")
    gate_on = settings["gate.enabled"]
    checks = screening_parameters(settings) if gate_on else {"check_finite": False}
    strategy = build_strategy(
        params.pop("name"),
        params,
        train_metrics_aggr_fn=recorder.train,
        evaluate_metrics_aggr_fn=recorder.evaluate,
        max_steps_per_example=settings["train.local-epochs"],  # FedNova's bound
        **checks,
    )
    if gate_on and not isinstance(strategy, SELF_CHECKING):
        strategy = QualityGate(strategy, **checks)
    return strategy


def screening_parameters(settings: Settings) -> dict[str, Any]:
    """Return the reply checks of ``gate.*`` as strategy and gate keyword arguments."""
    min_cosine = settings["gate.min-cosine"]
    max_share = settings["gate.max-weight-share"]
    return {
        "max_update_norm": settings["gate.max-update-norm"] or None,
        "update_norm_factor": settings["gate.update-norm-factor"] or None,
        "min_cosine": None if min_cosine <= -1 else min_cosine,
        "max_abs_value": settings["gate.max-abs-value"] or None,
        "max_num_examples": settings["gate.max-num-examples"] or None,
        "max_weight_share": None if max_share >= 1 else max_share,
    }


def _with_user_level_dp(
    strategy: Strategy, settings: Settings, grid: NodeDeadlineGrid
) -> Strategy:
    """Wrap ``strategy`` in user-level DP (clipping + Gaussian noise, ε reported).

    ``m`` (``dp.user-num-sampled``) defaults to the number of sites the strategy
    samples from the sites connected at the start, as Flower's ``FedAvg`` does.
    """
    num_sampled = settings["dp.user-num-sampled"]
    if num_sampled <= 0:
        connected = len(grid.wait_for_nodes())
        num_sampled = max(
            int(connected * settings["strategy.fraction-train"]),
            settings["strategy.min-train-nodes"],
        )
    return make_user_level_dp(
        strategy,
        side=settings["dp.user-level"],
        noise_multiplier=settings["dp.user-noise-multiplier"],
        clipping_norm=settings["dp.user-clipping-norm"],
        num_sampled_clients=num_sampled,
        delta=settings["dp.delta"],
        allow_data_dependent_weights=settings["dp.allow-data-dependent-weights"],
    )


def build_homomorphic_strategy(settings: Settings, recorder: RoundRecorder) -> Strategy:
    """Build the configured mean strategy behind CKKS encryption (``he.*``).

    The server holds only the public context (``he.context-dir``'s
    ``he-public.ctx``): it adds the sites' ciphertexts and scales the sum, and can
    check each reply's structure but not its values (no norm or cosine checks).
    """
    from flower_medimg.core.homomorphic import PUBLIC_CONTEXT_FILE
    from flower_medimg.strategies.homomorphic import HomomorphicFedAvg

    params = settings.section("strategy")
    screening = screening_parameters(settings)
    strategy = build_strategy(
        params.pop("name"),
        params,
        train_metrics_aggr_fn=recorder.train,
        evaluate_metrics_aggr_fn=recorder.evaluate,
        max_num_examples=screening["max_num_examples"],
        max_weight_share=screening["max_weight_share"],
    )
    keys = [k.strip() for k in settings["he.keys"].split(",") if k.strip()]
    return HomomorphicFedAvg(
        strategy,
        Path(settings["he.context-dir"]) / PUBLIC_CONTEXT_FILE,
        keys=keys or None,
    )


def _with_secure_aggregation(strategy: Strategy, settings: Settings) -> Strategy:
    """Wrap ``strategy`` in SecAgg+ (``secagg.*``); int8 compression means 8 bits."""
    share = screening_parameters(settings)["max_weight_share"]
    bits = 8 if settings["compression.codec"] == "int8" else None
    return SecAggPlus(
        strategy,
        num_shares=settings["secagg.num-shares"] or None,
        threshold=settings["secagg.threshold"] or None,
        clipping_range=settings["secagg.clipping-range"],
        quantization_bits=bits or settings["secagg.quantization-bits"],
        timeout=settings["round-timeout"],
        max_num_examples=settings["gate.max-num-examples"] or None,
        max_weight_share=share if settings["gate.enabled"] else None,
    )


def _train_config(settings: Settings) -> ConfigRecord:
    """Return the ConfigRecord sent with every train message (strategies add to it)."""
    config = ConfigRecord(
        {
            protocol.CONFIG_LR: settings["train.lr"],
            protocol.CONFIG_LOCAL_EPOCHS: settings["train.local-epochs"],
        }
    )
    if settings["train.report-losses"]:
        config[protocol.CONFIG_REQUEST_METRICS] = list(protocol.OPTIONAL_TRAIN_METRICS)
    return config


def initial_model(settings: Settings) -> torch.nn.Module:
    """Return the run's initial global model (a bundle's own network with ``bundle``).

    With ``task = "bundle"`` the network is built from the bundle's ``network_def``
    (and its shipped ``models/model.pt``) without running the bundle's code, see
    :func:`flower_medimg.core.bundle.bundle_model`.
    """
    if settings["task"] == BUNDLE_TASK:
        from flower_medimg.core.bundle import bundle_model

        return bundle_model(settings)
    return model_from_settings(settings)


def run_experiment(grid: Grid, context: Context, settings: Settings) -> dict:
    """Run one federated experiment and write its outputs; return the summary."""
    recorder = RoundRecorder(
        max_weight_share=screening_parameters(settings)["max_weight_share"]
    )
    if settings["he.enabled"]:
        strategy = build_homomorphic_strategy(settings, recorder)
    else:  # a bad parameter fails now
        strategy = build_gated_strategy(settings, recorder)
    if settings["secagg.enabled"] and (problem := secure_mean_problem(strategy)):
        raise ValueError(f"secagg.enabled cannot wrap this strategy: {problem}")
    model = initial_model(settings)
    private = private_keys(model, settings["private-params"])
    shared, _ = split_state(model.state_dict(), private)
    initial_arrays = ArrayRecord(shared)
    if settings["central-eval"] and settings["task"] == BUNDLE_TASK:
        log(
            INFO,
            "flower-medimg: central evaluation skipped: the server does not run a "
            "bundle's code (task=bundle); see the sites' evaluation",
        )
    elif settings["central-eval"] and private:
        log(
            INFO,
            "flower-medimg: central evaluation skipped: the global model has no "
            "private parameters (private-params=%s); see the sites' evaluation",
            settings["private-params"],
        )
    elif settings["central-eval"]:
        recorder.central_evaluation = central_evaluator(settings)
    run_dir = make_run_dir(settings["output-dir"], f"run-{context.run_id}")
    log(INFO, "flower-medimg: writing outputs to %s", run_dir)

    required_nodes = max(
        settings["strategy.min-available-nodes"], settings["strategy.min-train-nodes"]
    )
    grid = NodeDeadlineGrid(grid, required_nodes, settings["node-wait-timeout"])
    # Flower sizes a round's sample from the nodes connected when it starts: wait for
    # the required sites first, so round 1 does not train on whoever came first
    grid.wait_for_nodes()
    if settings["dp.user-level"] != "none":
        strategy = _with_user_level_dp(strategy, settings, grid)
    if settings["secagg.enabled"]:
        strategy = _with_secure_aggregation(strategy, settings)
    elif settings["compression.codec"] != "none" or (
        settings["compression.downlink"] != "none"
    ):
        strategy = DecompressUpdates(
            strategy,
            settings["compression.codec"],
            settings["compression.fraction"],
            settings["compression.downlink"],
        )
    outcome = run_lifecycle(
        grid,
        context,
        settings,
        strategy,
        initial_arrays,
        recorder,
        run_dir,
        train_config=_train_config(settings),
    )
    summary = write_outputs(
        run_dir, settings, outcome.result, recorder, outcome.decision.round
    )
    summary["run-dir"] = str(run_dir)
    summary["stop"] = {
        "round": outcome.decision.round,
        "reason": outcome.decision.reason,
        "message": outcome.decision.message,
    }
    summary["best-round"] = outcome.best_round
    summary["registry-run"] = outcome.registry_run
    if outcome.error is not None:  # the outputs are written: now fail loudly
        raise LifecycleError(outcome.error)
    return summary


def make_server_app(**overrides: Any) -> ServerApp:
    """Create the ServerApp; ``overrides`` (dotted keys) win over the run config.

    Example: ``make_server_app(**{"num-server-rounds": 2, "strategy.name": "krum"})``.

    Raises
    ------
    SettingsError
        If an override is not a valid setting.
    """
    check_values(overrides)  # fail now on a bad override
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Check the settings, then train the configured model."""
        settings = resolve_settings(context.run_config, overrides)
        torch.manual_seed(settings["seed"])
        run_experiment(grid, context, settings)

    return app


#: The ServerApp named in ``pyproject.toml``.
app = make_server_app()

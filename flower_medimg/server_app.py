"""ServerApp: run config -> model -> strategy -> rounds with a lifecycle -> outputs.

The rounds run through :func:`flower_medimg.lifecycle.run_lifecycle` (the same calls
as ``Strategy.start``, plus data statistics, a stop rule, the model registry,
resume and the audit log).

The global model holds only the shared parameters: with ``private-params`` set, the
initial arrays leave out the private keys, which stay at the sites.

The same ServerApp serves Flower's simulation runtime (``flwr run .``) and its
deployment runtime (SuperLink + one SuperNode per hospital).
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from monai.data import DataLoader

from flower_medimg.client_apps.app import device
from flower_medimg.client_apps.private_params import private_keys, split_state
from flower_medimg.client_apps.tasks import get_task
from flower_medimg.config import resolve_config, section
from flower_medimg.data import central_test_dataset
from flower_medimg.lifecycle import run_lifecycle
from flower_medimg.models import model_from_config
from flower_medimg.node_deadline import NodeDeadlineGrid
from flower_medimg.outputs import RoundRecorder, make_run_dir, write_outputs
from flower_medimg.privacy import make_user_level_dp
from flower_medimg.strategies import QualityGate
from flower_medimg.strategies.registry import SELF_CHECKING, build_strategy

__all__ = ["app", "central_evaluator", "make_server_app", "run_experiment"]


def central_evaluator(config: dict[str, Any]):
    """Evaluate global arrays on the server-held synthetic test set."""
    task = get_task(config["task"])
    dataset = central_test_dataset(
        config["task"], int(config["data.num-sites"]), config
    )
    loader = DataLoader(dataset, batch_size=int(config["train.batch-size"]))
    model = model_from_config(config)
    dev = device()

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return task.evaluate(model.to(dev), loader, dev)

    return evaluate


def _build_gated_strategy(
    config: dict[str, Any], params: dict[str, Any], recorder: RoundRecorder
) -> Strategy:
    """Build the configured strategy behind the quality gate (``gate.*``).

    Our strategies check every reply themselves (the bounds are passed to them);
    Flower's are wrapped in :class:`~flower_medimg.strategies.QualityGate`, so one
    malformed or poisoned reply never raises out of a round or poisons the model.
    """
    gate = section(config, "gate")
    bounds = {
        "max_update_norm": float(gate["max-update-norm"]) or None,
        "update_norm_factor": float(gate["update-norm-factor"]) or None,
    }
    strategy = build_strategy(
        params.pop("name"),
        params,
        train_metrics_aggr_fn=recorder.train,
        evaluate_metrics_aggr_fn=recorder.evaluate,
        **(bounds if gate["enabled"] else {"check_finite": False}),
    )
    if gate["enabled"] and not isinstance(strategy, SELF_CHECKING):
        strategy = QualityGate(strategy, **bounds)
    return strategy


def _with_user_level_dp(
    strategy: Strategy,
    config: dict[str, Any],
    params: dict[str, Any],
    grid: NodeDeadlineGrid,
) -> Strategy:
    """Wrap ``strategy`` in user-level DP (clipping + Gaussian noise, ε reported).

    ``m`` (``dp.user-num-sampled``) defaults to the number of sites the strategy
    samples from the sites connected at the start, as Flower's ``FedAvg`` does.
    """
    num_sampled = int(config["dp.user-num-sampled"])
    if num_sampled <= 0:
        connected = len(grid.wait_for_nodes())
        fraction = float(params.get("fraction-train", 1.0))
        num_sampled = max(
            int(connected * fraction), int(params.get("min-train-nodes", 0))
        )
    return make_user_level_dp(
        strategy,
        side=config["dp.user-level"],
        noise_multiplier=float(config["dp.user-noise-multiplier"]),
        clipping_norm=float(config["dp.user-clipping-norm"]),
        num_sampled_clients=num_sampled,
        delta=float(config["dp.delta"]),
        allow_data_dependent_weights=bool(config["dp.allow-data-dependent-weights"]),
    )


def run_experiment(grid: Grid, context: Context, config: dict[str, Any]) -> dict:
    """Run one federated experiment and write its outputs; return the summary."""
    torch.manual_seed(int(config["seed"]))
    model = model_from_config(config)
    private = private_keys(model, config["private-params"])
    shared, _ = split_state(model.state_dict(), private)
    initial_arrays = ArrayRecord(shared)

    central = None
    if config["central-eval"] and private:
        log(
            INFO,
            "flower-medimg: central evaluation skipped: the global model has no "
            "private parameters (private-params=%s); see the sites' evaluation",
            config["private-params"],
        )
    elif config["central-eval"]:
        central = central_evaluator(config)
    recorder = RoundRecorder(central)
    params = section(config, "strategy")
    strategy = _build_gated_strategy(config, params, recorder)
    run_dir = make_run_dir(config["output-dir"], f"run-{context.run_id}")
    log(INFO, "flower-medimg: writing outputs to %s", run_dir)

    required_nodes = max(
        int(params.get("min-available-nodes", 0)), int(params.get("min-train-nodes", 0))
    )
    grid = NodeDeadlineGrid(grid, required_nodes, float(config["node-wait-timeout"]))
    # Flower sizes a round's sample from the nodes connected when it starts: wait for
    # the required sites first, so round 1 does not train on whoever came first
    grid.wait_for_nodes()
    if config["dp.user-level"] != "none":
        strategy = _with_user_level_dp(strategy, config, params, grid)
    outcome = run_lifecycle(
        grid,
        context,
        config,
        strategy,
        initial_arrays,
        recorder,
        run_dir,
        train_config=ConfigRecord(
            {
                "lr": float(config["train.lr"]),
                "local-epochs": int(config["train.local-epochs"]),
            }
        ),
    )
    summary = write_outputs(
        run_dir, config, outcome.result, recorder, outcome.decision.round
    )
    summary["run-dir"] = str(run_dir)
    summary["stop"] = {
        "round": outcome.decision.round,
        "reason": outcome.decision.reason,
        "message": outcome.decision.message,
    }
    summary["best-round"] = outcome.best_round
    summary["registry-run"] = outcome.registry_run
    return summary


def make_server_app(**overrides: Any) -> ServerApp:
    """Create the ServerApp; ``overrides`` (dotted keys) win over the run config.

    Example: ``make_server_app(**{"num-server-rounds": 2, "strategy.name": "krum"})``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Train the configured model with the configured strategy."""
        run_experiment(grid, context, resolve_config(context.run_config, overrides))

    return app


#: The ServerApp named in ``pyproject.toml``.
app = make_server_app()

"""The training loop with its lifecycle: statistics, stopping, registry, audit.

:func:`run_lifecycle` replaces ``strategy.start(...)`` in the ServerApp. It runs the
rounds one at a time (:func:`~flower_medimg.lifecycle.rounds.run_round`) and after
each one records the model in the registry and the audit log and asks the stop
rule whether to go on. A restarted ServerApp of the same experiment (same config,
apart from output and lifecycle settings) continues from the newest registry
version of the unfinished run: global arrays, strategy state, stop rule, best
model and the metrics history.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_medimg.core.settings import Settings

from .audit import AuditLog
from .cross_site import cross_site_matrix, write_matrix
from .outputs import RoundRecorder
from .registry import ModelRegistry, package_versions
from .rounds import RoundReport, log_start, run_round
from .statistics import collect_statistics
from .stopping import (
    RESULT_ATTRIBUTES,
    BestModel,
    StopDecision,
    StopRule,
    round_metrics,
)
from .strategy_state import capture_strategy_state, restore_strategy_state

__all__ = ["LifecycleOutcome", "experiment_key", "run_lifecycle"]

#: Settings that do not change what is trained (left out of the experiment key).
_NOT_IN_KEY = ("output-dir", "round-timeout", "node-wait-timeout")
_NOT_IN_KEY_PREFIXES = ("registry.", "stats.", "cross-site.")


def experiment_key(config: Mapping[str, Any]) -> str:
    """Return a short hash of the settings that define what is trained."""
    kept = {
        k: v
        for k, v in sorted(config.items())
        if k not in _NOT_IN_KEY and not k.startswith(_NOT_IN_KEY_PREFIXES)
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LifecycleOutcome:
    """What :func:`run_lifecycle` returns.

    Attributes
    ----------
    result : Result
        Flower's per-round history, as ``Strategy.start`` returns it.
    decision : StopDecision
        Why and after which round training ended.
    best_round : Optional[int]
        Round of the best model (None if its metric was never available).
    registry_run : Optional[int]
        The run's id in the registry (None with the registry off).
    resumed_from : Optional[int]
        Registry version this run resumed from.
    """

    result: Result
    decision: StopDecision
    best_round: int | None
    registry_run: int | None
    resumed_from: int | None


def _epsilon(
    report_metrics: Mapping[str, float], recorded: Mapping[str, Any]
) -> float | None:
    """User-level ε of the round, else the largest DP-SGD ε a site reported."""
    if "train/user-epsilon" in report_metrics:
        return report_metrics["train/user-epsilon"]
    site_eps = [
        m["dp-epsilon"] for m in recorded.get("clients-train", []) if "dp-epsilon" in m
    ]
    return max(site_eps) if site_eps else None


def _history(result: Result) -> dict[str, dict[int, dict[str, Any]]]:
    return {
        attribute: {
            rnd: dict(record) for rnd, record in getattr(result, attribute).items()
        }
        for attribute in RESULT_ATTRIBUTES.values()
    }


def _restore_history(
    result: Result, history: Mapping[str, Mapping[int, Mapping]]
) -> None:
    for attribute, rounds in history.items():
        getattr(result, attribute).update(
            {rnd: MetricRecord(dict(values)) for rnd, values in rounds.items()}
        )


def _audit_round(audit: AuditLog, report: RoundReport) -> None:
    audit.append("round-sampled", round=report.server_round, nodes=report.sampled)
    for reply in report.replies:
        audit.append("reply", round=report.server_round, **reply.as_dict())


class _Lifecycle:
    """Audit log, registry, stop rule and best model of one ServerApp run."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.audit = AuditLog(run_dir / "audit.jsonl")
        path = settings["registry.path"].strip()
        self.registry = ModelRegistry(path) if path else None
        self.keep = settings["registry.keep"]
        target = settings["stop.target"]
        self.stop_rule = StopRule(
            settings["stop.metric"],
            mode=settings["stop.mode"],
            target=None if target == "" else target,
            patience=settings["stop.patience"],
            min_delta=settings["stop.min-delta"],
        )
        best_metric = settings["stop.best-metric"]
        self.best = BestModel(
            best_metric or self.stop_rule.metric,
            mode="auto" if best_metric else settings["stop.mode"],
        )
        self.best_arrays: ArrayRecord | None = None
        self.best_version: int | None = None

    def resume_point(self, experiment: str) -> dict[str, Any] | None:
        """Return the registry version to resume from, if any."""
        if self.registry is None or not self.settings["registry.resume"]:
            return None
        return self.registry.resumable(experiment)

    def state_blob(
        self,
        server_round: int,
        strategy: Strategy,
        recorder: RoundRecorder,
        result: Result,
        decision: StopDecision | None,
    ) -> bytes:
        """Return everything a restarted ServerApp needs to continue after a round."""
        return pickle.dumps(
            {
                "round": server_round,
                "strategy": capture_strategy_state(strategy),
                "stop": self.stop_rule.state(),
                "best": self.best.state(),
                "best-version": self.best_version,
                "recorder": recorder.rounds,
                "history": _history(result),
                "decision": decision,
            }
        )

    def resume(
        self,
        version: Mapping[str, Any],
        strategy: Strategy,
        recorder: RoundRecorder,
        result: Result,
    ) -> tuple[ArrayRecord, int, StopDecision | None]:
        """Restore the state stored with ``version``; return arrays, round, decision.

        The resume state is unpickled only after its SHA-256 matched the registry.
        """
        registry = self.registry
        assert registry is not None  # resume points come from the registry
        state = pickle.loads(registry.load_resume_state(version["id"]))
        arrays = ArrayRecord(registry.load_weights(version["id"]))
        restore_strategy_state(strategy, state["strategy"])
        self.stop_rule.restore(state["stop"])
        self.best.restore(state["best"])
        self.best_version = state["best-version"]
        if self.best_version is not None:
            self.best_arrays = ArrayRecord(registry.load_weights(self.best_version))
        recorder.rounds.update(state["recorder"])
        _restore_history(result, state["history"])
        result.arrays = arrays
        log(
            INFO,
            "flower-medimg: resuming from registry version %d (registry run %d, "
            "round %d)",
            version["id"],
            version["run"],
            state["round"],
        )
        return arrays, int(state["round"]), state["decision"]

    def store(
        self,
        registry_run: int,
        report: RoundReport,
        metrics: Mapping[str, float],
        epsilon: float | None,
        is_best: bool,
    ) -> int:
        """Store the round's model version and apply the keep policy."""
        registry = self.registry
        assert registry is not None
        version = registry.add_version(
            registry_run,
            report.server_round,
            report.arrays.to_torch_state_dict(),
            metrics=metrics,
            contributors=report.contributors,
            replies=[r.as_dict() for r in report.replies],
            epsilon=epsilon,
        )
        if is_best:
            self.best_version = version
            registry.set_best(registry_run, version)
        self.audit.append(
            "model-stored",
            round=report.server_round,
            version=version,
            sha256=registry.version(version)["sha256"],
            best=is_best,
        )
        dropped = registry.prune(registry_run, self.keep)
        if dropped:
            self.audit.append("models-pruned", versions=dropped, keep=self.keep)
        return version


# pylint: disable-next=too-many-arguments,too-many-locals
def run_lifecycle(
    grid: Grid,
    context: Context,
    settings: Settings,
    strategy: Strategy,
    initial_arrays: ArrayRecord,
    recorder: RoundRecorder,
    run_dir: Path,
    train_config: ConfigRecord,
) -> LifecycleOutcome:
    """Run (or resume) the federated training with its lifecycle around it.

    1. Open the audit log (``<run_dir>/audit.jsonl``) and the registry
       (``registry.path``); find an unfinished run of this experiment to resume.
    2. Fresh runs only: the statistics phase (``stats.enabled``) and the central
       evaluation of the initial model (round 0).
    3. Each round: train and evaluate, update the best model, apply the stop rule
       (``stop.*``), store the version with its provenance and resume state.
    4. Record the stop decision; cross-site validation (``cross-site.enabled``).

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    context : Context
        The ServerApp's context (its ``run_id`` goes into the provenance).
    settings : Settings
        The run's settings.
    strategy : Strategy
        Any Message-API strategy (wrapped as the ServerApp builds it).
    initial_arrays : ArrayRecord
        The initial global (shared) arrays.
    recorder : RoundRecorder
        Per-site metrics recorder; its ``end_round`` is the central evaluation.
    run_dir : Path
        This run's output folder.
    train_config : ConfigRecord
        Sent with every train message.

    Returns
    -------
    LifecycleOutcome
        History, stop decision, best round and registry ids.
    """
    life = _Lifecycle(settings, run_dir)
    num_rounds = settings["num-server-rounds"]
    timeout = settings["round-timeout"]
    experiment = experiment_key(settings)
    result = Result()
    arrays, last_round, decision = initial_arrays, 0, None
    resume = life.resume_point(experiment)
    if resume is not None:
        arrays, last_round, decision = life.resume(resume, strategy, recorder, result)
    registry_run = None
    if life.registry is not None:
        registry_run = life.registry.start_run(
            flower_run_id=context.run_id,
            experiment=experiment,
            run_dir=run_dir,
            strategy=settings["strategy.name"],
            config=settings,
            resumed_from=None if resume is None else resume["run"],
        )
        if life.best_version is not None:
            life.registry.set_best(registry_run, life.best_version)
    life.audit.append(
        "run-start",
        flower_run_id=context.run_id,
        registry_run=registry_run,
        experiment=experiment,
        config=dict(settings),
        versions=package_versions(),
        resumed_from_version=None if resume is None else resume["id"],
        start_round=last_round + 1,
    )

    if resume is None and settings["stats.enabled"]:
        stats = collect_statistics(grid, settings, run_dir, timeout)
        life.audit.append(
            "statistics",
            nodes=[s.node_id for s in stats.sites],
            declined=stats.declined,
            flagged=stats.flagged,
            js_distances={s.node_id: s.distance for s in stats.sites},
        )

    evaluate_config = ConfigRecord()
    log_start(strategy, num_rounds, arrays, train_config, evaluate_config)
    if resume is None:
        initial = recorder.end_round(0, initial_arrays)
        log(INFO, "Initial global evaluation results: %s", initial)
        if initial is not None:
            result.evaluate_metrics_serverapp[0] = initial

    while decision is None and last_round < num_rounds:
        last_round += 1
        report = run_round(
            strategy,
            grid,
            last_round,
            num_rounds,
            arrays,
            result=result,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=recorder.end_round,
        )
        arrays = report.arrays
        _audit_round(life.audit, report)
        metrics = round_metrics(result, last_round)
        is_best = life.best.update(last_round, metrics)
        if is_best:
            life.best_arrays = arrays
        decision = life.stop_rule.update(last_round, metrics)
        if life.registry is not None and registry_run is not None:
            epsilon = _epsilon(metrics, recorder.rounds.get(last_round, {}))
            version = life.store(registry_run, report, metrics, epsilon, is_best)
            life.registry.attach_resume_state(
                version,
                life.state_blob(last_round, strategy, recorder, result, decision),
            )
    if decision is None:
        decision = StopDecision(
            last_round, "num-server-rounds", f"reached num-server-rounds = {num_rounds}"
        )
    log(INFO, "flower-medimg: stopped after round %d: %s", last_round, decision.message)
    life.audit.append(
        "stop", round=decision.round, reason=decision.reason, message=decision.message
    )
    if life.registry is not None and registry_run is not None:
        life.registry.finish_run(registry_run, decision.reason, decision.message)

    if settings["cross-site.enabled"]:
        models = {f"final (round {last_round})": arrays}
        if life.best_arrays is not None and life.best.best_round != last_round:
            models[f"best (round {life.best.best_round})"] = life.best_arrays
        matrix = cross_site_matrix(grid, models, last_round, timeout)
        write_matrix(matrix, list(models), run_dir)
        life.audit.append("cross-site", models=list(models), matrix=matrix)
    life.audit.append("run-end", last_round=last_round)
    if life.registry is not None:
        life.registry.close()
    return LifecycleOutcome(
        result=result,
        decision=decision,
        best_round=life.best.best_round,
        registry_run=registry_run,
        resumed_from=None if resume is None else resume["id"],
    )

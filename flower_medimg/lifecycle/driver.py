"""The training loop with its lifecycle: statistics, stopping, registry, audit.

:func:`run_lifecycle` replaces ``strategy.start(...)`` in the ServerApp. It runs the
rounds one at a time (:func:`~flower_medimg.lifecycle.rounds.run_round`) and after
each one records the model in the registry and the audit log and asks the stop
rule whether to go on. A restarted ServerApp of the same experiment (same config,
apart from output and lifecycle settings) continues from the newest registry
version of the unfinished run: global arrays, strategy state, stop rule, best
model and the metrics history (:mod:`.resume_state`; signed, never unpickled).

A round that cannot be recorded (the registry stays locked, the disk is full)
ends the run cleanly after that round: its model and metrics still go to the run
folder, the audit log gets the reason and its ``run-end`` line, the registry run
stays unfinished, so the next start resumes from the last round it recorded, and
:attr:`LifecycleOutcome.error` tells the ServerApp to exit with the error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_medimg.core.settings import Settings

from .audit import AuditLog
from .cross_site import cross_site_matrix, write_matrix
from .integrity import ServerKey, check_key_outside, key_path
from .outputs import RoundRecorder
from .registry import (
    ModelRegistry,
    RegistryError,
    RegistryUnavailableError,
    package_versions,
)
from .resume_state import ResumeState, ResumeStateError
from .rounds import RoundReport, log_start, run_round
from .statistics import collect_statistics
from .stopping import (
    RESULT_ATTRIBUTES,
    BestModel,
    StopDecision,
    StopRule,
    round_metrics,
)
from .strategy_state import (
    StrategyStateError,
    capture_strategy_state,
    restore_strategy_state,
)

__all__ = [
    "LifecycleError",
    "LifecycleOutcome",
    "experiment_key",
    "robust_metric",
    "run_lifecycle",
]

#: Stop reason of a run whose round could not be recorded.
REGISTRY_UNAVAILABLE = "registry-unavailable"
#: Stop reason of a run whose last ``stop.max-empty-rounds`` rounds aggregated nothing.
EMPTY_ROUNDS = "empty-rounds"


class LifecycleError(RuntimeError):
    """The run ended early on an error, after writing what it had (see ``error``)."""


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
    error : Optional[str]
        Why the run ended early on an error (None: it ended as planned). The
        outputs are still to be written; then the ServerApp should fail with it.
    """

    result: Result
    decision: StopDecision
    best_round: int | None
    registry_run: int | None
    resumed_from: int | None
    error: str | None = None


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


def robust_metric(metric: str) -> bool:
    """Whether no single site of three or more can set the round metric ``metric``.

    ``central/<key>`` is the server's own evaluation and ``evaluate/median-<key>``
    the median of the sites' values; ``train/<key>`` and ``evaluate/<key>`` are
    weighted means of what the sites report (a site's weight is capped by
    ``gate.max-weight-share``, but it still moves the mean as far as it likes).
    """
    source, _, key = metric.partition("/")
    return source == "central" or (source == "evaluate" and key.startswith("median-"))


def _empty_round(report: RoundReport) -> str:
    """Say that ``report``'s round aggregated nothing, and what each site did."""
    reasons = {r.node_id: r.reason or "accepted" for r in report.replies}
    sites = "; ".join(
        f"node {node_id}: {reasons.get(node_id, 'no reply')}"
        for node_id in sorted({*report.sampled, *reasons})
    )
    return f"round {report.server_round} aggregated no reply ({sites or 'no sites'})"


class _Lifecycle:
    """Server key, audit log, registry, stop rule and best model of one run."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        path = settings["registry.path"].strip()
        key_file = key_path(settings["registry.key-path"])
        folders = {"run folder": run_dir, "output folder": Path(settings["output-dir"])}
        if path:
            folders["registry"] = Path(path)
        check_key_outside(key_file, folders)
        self.key = ServerKey.load_or_create(key_file)
        self.audit = AuditLog(run_dir / "audit.jsonl", self.key)
        self.registry = (
            ModelRegistry(
                path, self.key, lock_timeout=settings["registry.lock-timeout"]
            )
            if path
            else None
        )
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
        for metric in {self.stop_rule.metric, self.best.metric}:
            if not robust_metric(metric):
                log(
                    WARNING,
                    "flower-medimg: %s is the sites' weighted mean of values each "
                    "site reports itself: one site can move it. The stop rule and "
                    "the best model follow it; central/<key> or "
                    "evaluate/median-<key> cannot be set by one site of three.",
                    metric,
                )
        self.best_arrays: ArrayRecord | None = None
        self.best_version: int | None = None
        self.recorded_round = 0

    def resume_point(self, experiment: str) -> dict[str, Any] | None:
        """Return the registry version to resume from, if any.

        Raises
        ------
        RegistryTamperedError
            If that version's record or its run's does not verify.
        """
        if self.registry is None or not self.settings["registry.resume"]:
            return None
        return self.registry.resumable(experiment)

    def resume_state(
        self,
        server_round: int,
        strategy: Strategy,
        recorder: RoundRecorder,
        result: Result,
        decision: StopDecision | None,
    ) -> bytes:
        """Return everything a restarted ServerApp needs to continue after a round."""
        fields, arrays = capture_strategy_state(strategy)
        return ResumeState(
            round=server_round,
            strategy=fields,
            strategy_arrays=arrays,
            stop=self.stop_rule.state(),
            best=self.best.state(),
            best_version=self.best_version,
            recorder=recorder.rounds,
            history=_history(result),
            decision=decision,
        ).to_bytes()

    def resume(
        self,
        version: Mapping[str, Any],
        strategy: Strategy,
        recorder: RoundRecorder,
        result: Result,
    ) -> tuple[ArrayRecord, int, StopDecision | None]:
        """Restore the state stored with ``version``; return arrays, round, decision.

        The registry checks the state's record and SHA-256 before anything is
        parsed; the state holds JSON and arrays only.

        Raises
        ------
        RegistryError
            If the state or the weights do not verify, or do not fit the strategy
            (the message names the version and the registry).
        """
        registry = self.registry
        assert registry is not None  # resume points come from the registry
        try:
            state = ResumeState.from_bytes(registry.load_resume_state(version["id"]))
            restore_strategy_state(strategy, state.strategy, state.strategy_arrays)
        except (ResumeStateError, StrategyStateError) as err:
            raise RegistryError(
                f"Cannot resume from version {version['id']} of {registry.database}: "
                f"its resume state does not fit: {err}"
            ) from None
        arrays = ArrayRecord(registry.load_weights(version["id"]))
        self.stop_rule.restore(state.stop)
        self.best.restore(state.best)
        self.best_version = state.best_version
        if self.best_version is not None:
            self.best_arrays = ArrayRecord(registry.load_weights(self.best_version))
        recorder.rounds.update(state.recorder)
        _restore_history(result, state.history)
        result.arrays = arrays
        self.recorded_round = state.round
        log(
            INFO,
            "flower-medimg: resuming from registry version %d (registry run %d, "
            "round %d)",
            version["id"],
            version["run"],
            state.round,
        )
        return arrays, state.round, state.decision

    # pylint: disable-next=too-many-arguments
    def record(
        self,
        registry_run: int,
        report: RoundReport,
        metrics: Mapping[str, float],
        epsilon: float | None,
        is_best: bool,
        resume_state: bytes,
    ) -> StopDecision | None:
        """Record the round's version and resume state in one registry write.

        Returns
        -------
        Optional[StopDecision]
            ``registry-unavailable`` if the round could not be recorded.
        """
        registry = self.registry
        assert registry is not None
        server_round = report.server_round
        try:
            version, dropped = registry.record_round(
                registry_run,
                server_round,
                report.arrays.to_torch_state_dict(),
                metrics=metrics,
                contributors=report.contributors,
                replies=[r.as_dict() for r in report.replies],
                epsilon=epsilon,
                resume_state=resume_state,
                best=is_best,
                keep=self.keep,
                audit_head=self.audit.head,
                audit_lines=self.audit.seq,
            )
        except RegistryUnavailableError as err:
            message = (
                f"round {server_round} could not be recorded: {err}. Its model and "
                f"metrics are in {self.run_dir}; the next start resumes after round "
                f"{self.recorded_round}"
            )
            log(ERROR, "flower-medimg: %s", message)
            self.audit.append(
                "registry-unavailable", round=server_round, error=str(err)
            )
            return StopDecision(server_round, REGISTRY_UNAVAILABLE, message)
        self.recorded_round = server_round
        if is_best:
            self.best_version = version
        self.audit.append(
            "model-stored",
            round=server_round,
            version=version,
            sha256=registry.version(version)["sha256"],
            best=is_best,
        )
        if dropped:
            self.audit.append("models-pruned", versions=dropped, keep=self.keep)
        return None


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
       (``stop.*``), store the version with its provenance and resume state; a
       round the registry cannot take ends the run after it.
    4. Record the stop decision; cross-site validation (``cross-site.enabled``);
       the ``run-end`` line, whose hash the registry keeps as the log's anchor.

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
        History, stop decision, best round, registry ids and the error, if any.

    Raises
    ------
    RegistryError
        Before any training, if the registry cannot be opened or its resume point
        does not verify (the message names the database).
    ServerKeyError
        If the server key is unusable or lies inside the registry or run folders.
    StrategyStateError
        Before any training, if the registry is on and the strategy's state is not
        described (nothing could resume it).
    """
    if settings["registry.path"]:
        try:
            capture_strategy_state(strategy)
        except StrategyStateError as err:
            raise StrategyStateError(
                f"{err}; describe it there, or run without the registry "
                '(registry.path = "")'
            ) from None
    life = _Lifecycle(settings, run_dir)
    num_rounds = settings["num-server-rounds"]
    timeout = settings["round-timeout"]
    experiment = experiment_key(settings)
    # A run whose rounds all aggregate nothing still ends with a global model: the
    # initial one (Flower's Result starts with an empty ArrayRecord).
    result = Result(arrays=initial_arrays)
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
            best_version=life.best_version,
        )
    life.audit.append(
        "run-start",
        flower_run_id=context.run_id,
        registry=None if life.registry is None else str(life.registry.folder),
        registry_run=registry_run,
        key={"fingerprint": life.key.fingerprint, "path": life.key.source},
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
            rejected=stats.rejected,
            flagged=stats.flagged,
            js_distances={s.node_id: s.distance for s in stats.sites},
        )
        if hasattr(strategy, "num_examples_bounds"):  # the reply screening's bound
            strategy.num_examples_bounds = stats.num_train

    evaluate_config = ConfigRecord()
    log_start(strategy, num_rounds, arrays, train_config, evaluate_config)
    if resume is None:
        initial = recorder.end_round(0, initial_arrays)
        log(INFO, "Initial global evaluation results: %s", initial)
        if initial is not None:
            result.evaluate_metrics_serverapp[0] = initial

    error = None
    empty_rounds, max_empty_rounds = 0, settings["stop.max-empty-rounds"]
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
        # The round's decisions go here, before it is recorded: the stop rule, and
        # the empty-round limit, which also fails the run (`error`).
        decision = life.stop_rule.update(last_round, metrics)
        empty_rounds = 0 if report.contributors else empty_rounds + 1
        if empty_rounds:
            log(WARNING, "flower-medimg: %s", _empty_round(report))
        if decision is None and 0 < max_empty_rounds <= empty_rounds:
            decision = StopDecision(
                last_round,
                EMPTY_ROUNDS,
                f"{empty_rounds} rounds in a row aggregated no reply "
                f"(stop.max-empty-rounds = {max_empty_rounds}); last: "
                + _empty_round(report),
            )
            error = decision.message
        if life.registry is not None and registry_run is not None:
            epsilon = _epsilon(metrics, recorder.rounds.get(last_round, {}))
            state = life.resume_state(last_round, strategy, recorder, result, decision)
            unrecorded = life.record(
                registry_run, report, metrics, epsilon, is_best, state
            )
            if unrecorded is not None:
                decision, error = unrecorded, unrecorded.message
    if decision is None:
        decision = StopDecision(
            last_round, "num-server-rounds", f"reached num-server-rounds = {num_rounds}"
        )
    log(INFO, "flower-medimg: stopped after round %d: %s", last_round, decision.message)
    life.audit.append(
        "stop", round=decision.round, reason=decision.reason, message=decision.message
    )

    if settings["cross-site.enabled"] and error is None:
        models = {f"final (round {last_round})": arrays}
        if life.best_arrays is not None and life.best.best_round != last_round:
            models[f"best (round {life.best.best_round})"] = life.best_arrays
        matrix = cross_site_matrix(grid, models, last_round, timeout)
        write_matrix(matrix, list(models), run_dir)
        life.audit.append("cross-site", models=list(models), matrix=matrix)
    life.audit.append("run-end", last_round=last_round)
    if life.registry is not None and registry_run is not None:
        if error is None:  # an unrecorded round leaves the run to be resumed
            life.registry.finish_run(
                registry_run,
                decision.reason,
                decision.message,
                life.audit.head,
                life.audit.seq,
            )
        life.registry.close()
    return LifecycleOutcome(
        result=result,
        decision=decision,
        best_round=life.best.best_round,
        registry_run=registry_run,
        resumed_from=None if resume is None else resume["id"],
        error=error,
    )

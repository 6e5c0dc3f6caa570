"""What the warm site runtime checks before a message's code runs.

For every message, in the runtime's parent process, after the task's input is
pulled and before its FAB is installed or any of its code is loaded:

1. **approval**: the FAB's hash must be on the site's list
   (:mod:`~flower_medimg.site.approvals`);
2. **policy**: the run's settings (its run config, checked as the app checks it)
   must satisfy the site's policy (:mod:`~flower_medimg.site.policy`);
3. **privacy ledger**, for a train message: the ε the round will spend, computed
   from the run's settings and the site's own training set as the ClientApp
   trains, must keep the run within ``max-epsilon-per-run`` and the site within
   ``max-total-epsilon`` (:mod:`~flower_medimg.site.ledger`); the round is then
   charged.

A refusal is an :class:`AdmissionError` whose message goes back to the server as
the message's error reply; both refusals and admissions land in the site's audit
log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_medimg.core import protocol
from flower_medimg.site.approvals import ApprovalError, read_approvals
from flower_medimg.site.audit import site_audit_log
from flower_medimg.site.ledger import (
    DP_SGD,
    SVT,
    LedgerCharge,
    PrivacyLedger,
    compose_epsilon,
)
from flower_medimg.site.policy import (
    PolicyError,
    PolicyViolationError,
    SitePolicy,
    load_policy,
)

__all__ = ["Admission", "AdmissionError"]

_MIB = 2**20


class AdmissionError(RuntimeError):
    """The site does not run this message; the message says why."""


def _comma_items(rule: str) -> set[str]:
    return {item.strip() for item in rule.split(",") if item.strip()}


def _shared_arrays(message: Any) -> list[Any]:
    return [
        array
        for record in message.content.array_records.values()
        for array in record.values()
    ]


def _update_coordinates(message: Any) -> int:
    """Values in the arrays a train message sends (the update has as many)."""
    return sum(math.prod(array.shape) for array in _shared_arrays(message))


def _update_bytes(message: Any) -> int:
    """Bytes of the values of the update a train message asks for."""
    import numpy as np

    return sum(
        math.prod(array.shape) * np.dtype(array.dtype).itemsize
        for array in _shared_arrays(message)
    )


@dataclass
class Admission:
    """The checks of one site.

    Parameters
    ----------
    state_dir : Path
        The site's state folder (approvals, ledger, audit log).
    policy_path : Path, optional
        The site's policy file; None allows every approved app and setting.
    """

    state_dir: Path
    policy_path: Path | None = None

    def check(self, message: Any, context: Any, run: Any, fab: Any) -> None:
        """Admit ``message`` (charging the ledger for a train round) or refuse it.

        Raises
        ------
        AdmissionError
            If the app is not approved, the policy refuses the run, or the round
            would exceed a privacy budget; also if the site's approvals, policy or
            ledger cannot be read (the site never runs unchecked).
        """
        audit = site_audit_log(self.state_dir)
        event = {
            "fab_hash": fab.hash_str,
            "run_id": context.run_id,
            "message_type": message.metadata.message_type,
        }
        try:
            charges = self._check(message, context, run, fab)
        except (AdmissionError, PolicyViolationError) as err:
            audit.append("refuse", **event, reason=str(err))
            raise AdmissionError(str(err)) from err
        audit.append("admit", **event)
        if charges:
            PrivacyLedger(self.state_dir).charge(charges)

    def _check(
        self, message: Any, context: Any, run: Any, fab: Any
    ) -> list[LedgerCharge]:
        from flower_medimg.core.settings import SettingsError, resolve_settings

        try:
            approved = read_approvals(self.state_dir)
            policy = load_policy(self.policy_path)
        except (ApprovalError, PolicyError) as err:
            raise AdmissionError(f"the site cannot check this message: {err}") from err
        if fab.hash_str not in approved:
            raise AdmissionError(
                f"app {run.fab_id or '(unnamed)'} with FAB hash {fab.hash_str} is not "
                "approved at this site (flower-medimg site approve)"
            )
        try:
            settings = resolve_settings(context.run_config)
        except SettingsError as err:
            raise AdmissionError(f"the run config is not valid: {err}") from err
        _check_run(policy, settings)
        if (
            message.metadata.message_type != "train"
            or protocol.RECORD_ARRAYS not in message.content.array_records
        ):  # only a message holding the model trains (not SecAgg+'s key exchanges)
            return []
        return _check_round(policy, settings, message, context, run, self.state_dir)


def _check_run(policy: SitePolicy, settings: Any) -> None:
    """Check the policy lines that hold for a whole run."""
    if policy.get("require-dp-sgd") and not settings.dp_sgd:
        raise policy.refuse(
            "require-dp-sgd",
            "the run trains without DP-SGD (dp.noise-multiplier and "
            "dp.target-epsilon are 0)",
        )
    if policy.get("require-secure-aggregation") and not (
        settings["secagg.enabled"] or settings["he.enabled"]
    ):
        raise policy.refuse(
            "require-secure-aggregation",
            "the run sends each update to the server in the clear (secagg.enabled "
            "and he.enabled are false)",
        )
    for key, setting in (
        ("allowed-strategies", "strategy.name"),
        ("allowed-tasks", "task"),
    ):
        allowed = policy.get(key)
        if allowed is not None and settings[setting] not in allowed:
            raise policy.refuse(key, f"the run asks {setting} = {settings[setting]!r}")
    required = set(policy.get("private-params", []))
    missing = required - _comma_items(settings["private-params"])
    if missing:
        raise policy.refuse(
            "private-params",
            f"the run's private-params {settings['private-params']!r} shares "
            f"{sorted(missing)}",
        )


def _check_round(
    policy: SitePolicy,
    settings: Any,
    message: Any,
    context: Any,
    run: Any,
    state_dir: Path,
) -> list[LedgerCharge]:
    """Check the policy lines of one train round; return its ledger charges."""
    limit, size = policy.get("max-update-mib"), _update_bytes(message)
    if limit is not None and size > limit * _MIB:
        raise policy.refuse(
            "max-update-mib",
            f"the update would be {size} bytes ({size / _MIB:.4g} MiB)",
        )
    minimum = policy.get("min-train-samples")
    charges = _round_charges(settings, message, context, run, minimum)
    if minimum is not None and charges.num_examples < minimum:
        raise policy.refuse(
            "min-train-samples",
            f"the site has {charges.num_examples} training samples for this run",
        )
    if not charges.charges:
        return []
    history = PrivacyLedger(state_dir).charges()
    per_run = policy.get("max-epsilon-per-run")
    if per_run is not None:
        this_run = [c for c in history if c.run_id == context.run_id]
        epsilon = compose_epsilon([*this_run, *charges.charges], policy.delta)
        if epsilon > per_run:
            raise policy.refuse(
                "max-epsilon-per-run",
                f"this round would take run {context.run_id} to ε = {epsilon:.3f} "
                f"(δ = {policy.delta:g})",
            )
    total = policy.get("max-total-epsilon")
    if total is not None:
        epsilon = compose_epsilon([*history, *charges.charges], policy.delta)
        if epsilon > total:
            raise policy.refuse(
                "max-total-epsilon",
                f"this round would take the site's ledger to ε = {epsilon:.3f} "
                f"(δ = {policy.delta:g})",
            )
    return charges.charges


@dataclass
class _RoundCharges:
    charges: list[LedgerCharge]
    num_examples: int


def _round_charges(
    settings: Any, message: Any, context: Any, run: Any, minimum: int | None
) -> _RoundCharges:
    """Compute what a train round will spend, from the site's own training set."""
    from flower_medimg.client_apps.site_mods import svt_round_epsilon

    svt_epsilon = svt_round_epsilon(settings, _update_coordinates(message))
    if not settings.dp_sgd and not svt_epsilon and minimum is None:
        return _RoundCharges([], 0)
    from flower_medimg.data.datasets import site_datasets

    train_ds, _ = site_datasets(settings, context.node_config)
    config = message.content.config_records.get(protocol.RECORD_CONFIG, {})
    server_round = int(config.get(protocol.CONFIG_SERVER_ROUND, 0))
    common = {
        "study": run.fab_id,
        "run_id": context.run_id,
        "server_round": server_round,
    }
    charges = []
    if settings.dp_sgd:
        from flower_medimg.client_apps.dp_sgd import DPSettings, plan_round
        from flower_medimg.client_apps.training import train_batches

        dp = DPSettings.from_settings(settings)
        assert dp is not None
        epochs = int(
            config.get(protocol.CONFIG_LOCAL_EPOCHS, settings["train.local-epochs"])
        )
        spend = plan_round(
            dp,
            train_batches(len(train_ds), settings["train.batch-size"]),
            epochs=epochs,
            num_rounds=settings["num-server-rounds"],
        )
        charges.append(
            LedgerCharge(
                DP_SGD,
                **common,
                noise_multiplier=spend.noise_multiplier,
                sample_rate=spend.sample_rate,
                steps=spend.steps,
            )
        )
    if svt_epsilon:
        charges.append(LedgerCharge(SVT, **common, epsilon=svt_epsilon))
    return _RoundCharges(charges, len(train_ds))

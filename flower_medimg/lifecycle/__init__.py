"""The model's lifecycle around the training loop.

Federated data statistics before training (:mod:`.statistics`), a stop rule and
best-model selection (:mod:`.stopping`), cross-site validation (:mod:`.cross_site`),
a SQLite model registry with provenance (:mod:`.registry`), resume after a
ServerApp restart (:mod:`.strategy_state`, :mod:`.driver`) and a hash-chained audit
log (:mod:`.audit`). :func:`run_lifecycle` ties them together for the ServerApp.
"""

from .audit import AuditLog, verify_audit_log
from .driver import LifecycleOutcome, experiment_key, run_lifecycle
from .registry import ModelRegistry, RegistryError, load_exported, weights_sha256
from .stopping import BestModel, StopDecision, StopRule

__all__ = [
    "AuditLog",
    "BestModel",
    "LifecycleOutcome",
    "ModelRegistry",
    "RegistryError",
    "StopDecision",
    "StopRule",
    "experiment_key",
    "load_exported",
    "run_lifecycle",
    "verify_audit_log",
    "weights_sha256",
]

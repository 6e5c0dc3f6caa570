"""Flower mods that filter a site's update before it leaves the site.

Paper: Li et al., MLMI 2019, https://arxiv.org/abs/1910.00962

A mod wraps the ClientApp's train function (``(msg, context, call_next) ->
Message``): it remembers the global arrays it received, lets the ClientApp train,
computes the update ``delta = theta_k - theta_global`` of every floating-point array,
filters it (:mod:`flower_medimg.privacy.sparse_sharing`) and replies
``theta_global + filtered_delta`` under the same keys, shapes and dtypes, so that an
unmodified ``FedAvg`` aggregates it (a zeroed coordinate means "no change").

Order matters when mods are combined: ``ClientApp(mods=[a, b])`` runs ``a`` around
``b``, so ``a`` sees the reply last. Put a clipping mod for user-level DP first
(outermost) and the sparse-sharing mod after it::

    app = ClientApp()

    @app.train(mods=[safe_fixedclipping_mod, SVTPrivacyMod(share=0.1, epsilon=1.0)])
    def train(msg, context): ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from flower_medimg.core import protocol

from .sparse_sharing import (
    DEFAULT_MAX_PASSES,
    percentile_filter,
    shared_fraction,
    svt_filter,
)

__all__ = [
    "PercentilePrivacyMod",
    "SVTPrivacyMod",
    "SiteNormBoundMod",
    "mod_error_reply",
    "safe_fixedclipping_mod",
]


def mod_error_reply(msg: Message, reason: str) -> Message:
    """Log ``reason`` and return it as the error reply of a failed mod precondition."""
    log(ERROR, reason)
    return Message(
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
    )


def _local_steps(metrics: MetricRecord | None, name: str) -> float:
    """Read ``local-steps`` from the reply; 1 if absent or not a positive number."""
    if metrics is None or protocol.METRIC_LOCAL_STEPS not in metrics:
        return 1.0
    value = metrics[protocol.METRIC_LOCAL_STEPS]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        log(
            WARNING, "%s: '%s' is %r; using 1", name, protocol.METRIC_LOCAL_STEPS, value
        )
        return 1.0
    return float(value)


class _UpdateFilterMod:
    """Shared plumbing: received arrays -> update -> filter -> reply arrays."""

    name = "update filter"

    def _filter(
        self,
        delta: dict[str, np.ndarray],
        steps: float,
        msg: Message,
        context: Context,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        raise NotImplementedError

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Filter the update in the reply to a ``train`` message.

        Other message types, and replies carrying an error, pass through untouched.
        """
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if len(msg.content.array_records) != 1:
            return mod_error_reply(
                msg,
                f"{self.name} expects exactly one ArrayRecord in the train message, "
                f"found {len(msg.content.array_records)}",
            )
        received = next(iter(msg.content.array_records.values()))

        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if len(reply.content.array_records) != 1:
            return mod_error_reply(
                msg,
                f"{self.name} expects exactly one ArrayRecord in the reply, "
                f"found {len(reply.content.array_records)}",
            )
        if len(reply.content.metric_records) > 1:
            return mod_error_reply(
                msg,
                f"{self.name} expects at most one MetricRecord in the reply, "
                f"found {len(reply.content.metric_records)}",
            )
        record_name, sent = next(iter(reply.content.array_records.items()))
        missing = set(received.keys()) - set(sent.keys())
        extra = set(sent.keys()) - set(received.keys())
        if missing or extra:
            return mod_error_reply(
                msg,
                f"{self.name} needs the reply to carry the received array keys: "
                f"missing {sorted(missing)}, extra {sorted(extra)}",
            )

        local = {k: sent[k].numpy() for k in sent}
        global_ = {k: received[k].numpy() for k in sent}
        delta: dict[str, np.ndarray] = {}
        for key, value in local.items():
            if value.shape != global_[key].shape:
                return mod_error_reply(
                    msg,
                    f"{self.name}: array '{key}' has shape {value.shape} in the "
                    f"reply but {global_[key].shape} in the train message",
                )
            if np.issubdtype(value.dtype, np.floating):
                delta[key] = value.astype(np.float64) - global_[key].astype(np.float64)

        metrics = next(iter(reply.content.metric_records.values()), None)
        steps = _local_steps(metrics, self.name)
        try:
            filtered, extra_metrics = self._filter(delta, steps, msg, context)
        except ValueError as err:
            return mod_error_reply(msg, f"{self.name}: {err}")

        arrays = {}
        for key, value in local.items():
            if key in filtered:
                value = (global_[key].astype(np.float64) + filtered[key]).astype(
                    value.dtype
                )
            arrays[key] = Array(np.asarray(value))
        reply.content[record_name] = ArrayRecord(arrays)
        if metrics is None:
            metrics = MetricRecord()
            reply.content["metrics"] = metrics
        for key, value in extra_metrics.items():
            metrics[key] = value
        return reply


class PercentilePrivacyMod(_UpdateFilterMod):
    """Send only the largest ``share`` of the update's coordinates, clipped.

    Selective parameter sharing (Shokri & Shmatikov 2015) as in Li et al.,
    https://arxiv.org/abs/1910.00962, and NVFlare's ``PercentilePrivacy``; see
    :func:`~flower_medimg.privacy.sparse_sharing.percentile_filter`. The update is
    divided by the reply's ``local-steps`` metric (1 if absent) before the cut and
    the clip and multiplied back after. Adds ``shared-fraction`` to the reply's
    MetricRecord. Spends no ε: it is a heuristic, not a DP mechanism.

    Parameters
    ----------
    share : float (default: 0.1)
        Fraction of coordinates sent, in ``(0, 1]``.
    gamma : Optional[float] (default: None)
        Bound on the per-step update; ``None`` is data-driven (the 99th percentile of
        the non-zero ``|delta / steps|``).
    """

    name = "PercentilePrivacyMod"

    def __init__(self, share: float = 0.1, gamma: float | None = None) -> None:
        percentile_filter({}, share, gamma)  # validate now, not at the first round
        self.share = share
        self.gamma = gamma

    def __repr__(self) -> str:
        return f"PercentilePrivacyMod(share={self.share}, gamma={self.gamma})"

    def _filter(
        self,
        delta: dict[str, np.ndarray],
        steps: float,
        msg: Message,
        context: Context,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        filtered = percentile_filter(delta, self.share, self.gamma, steps)
        fraction = shared_fraction(delta, filtered)
        log(INFO, "%s: sent %.4f of the update's coordinates", self.name, fraction)
        return filtered, {protocol.METRIC_SHARED_FRACTION: fraction}


class SVTPrivacyMod(_UpdateFilterMod):
    """Release a noisy ``share`` of the update chosen with the Sparse Vector Technique.

    Li et al., https://arxiv.org/abs/1910.00962, after NVFlare's ``SVTPrivacy``
    (2026 variant with a pure-DP odometer); see
    :func:`~flower_medimg.privacy.sparse_sharing.svt_filter` for the mechanism and
    the parameters. The site's cumulative ε (the sum of every call's
    ``eps_thr + eps_query + eps_release``) is kept in ``context.state[state_key]``
    (a MetricRecord with ``epsilon`` and ``calls``) and reported in the reply's
    MetricRecord as ``svt-epsilon``, next to ``shared-fraction``.

    This ε bounds what the uploaded values reveal about the site's *update*, with
    per-coordinate sensitivity ``2 * gamma``; it is not an (ε, δ) bound on a
    training record and is not comparable with Opacus's. With ``gamma=None`` or
    ``tau=None`` the bounds depend on the update and the ε is nominal.

    ``context.state`` lives in memory on a SuperNode: a deployment that restarts
    the SuperNode must persist the state record itself, or the odometer restarts
    at 0.

    Parameters
    ----------
    share : float (default: 0.1)
        Fraction of coordinates released, in ``(0, 1]``.
    epsilon : float (default: 1.0)
        Selection budget per round (threshold plus queries).
    gamma : Optional[float] (default: None)
        Bound on the per-step update; set it for a real guarantee.
    tau : Optional[float] (default: None)
        Selection threshold on the per-step update (before noise).
    release_epsilon : Optional[float] (default: None)
        Budget of releasing the selected values per round; ``None`` spends 0.1 per
        value (NVFlare's default).
    replace : bool (default: False)
        Draw the released coordinates with replacement.
    max_passes : int (default: 1000)
        Cap on the acceptance passes.
    seed : Optional[int] (default: None)
        Seed for reproducible experiments: each call then uses
        ``default_rng([seed, node_id, server_round])``. ``None`` (the default, and
        the only sound choice in deployment) draws fresh OS entropy.
    state_key : str (default: "svt-privacy")
        Key of the odometer record in ``context.state``.
    """

    name = "SVTPrivacyMod"

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        share: float = 0.1,
        epsilon: float = 1.0,
        gamma: float | None = None,
        tau: float | None = None,
        release_epsilon: float | None = None,
        *,
        replace: bool = False,
        max_passes: int = DEFAULT_MAX_PASSES,
        seed: int | None = None,
        state_key: str = "svt-privacy",
    ) -> None:
        svt_filter(  # validate now, not at the first round
            {},
            share,
            epsilon,
            gamma,
            tau,
            release_epsilon,
            rng=np.random.default_rng(0),
            max_passes=max_passes,
        )
        self.share = share
        self.epsilon = epsilon
        self.gamma = gamma
        self.tau = tau
        self.release_epsilon = release_epsilon
        self.replace = replace
        self.max_passes = max_passes
        self.seed = seed
        self.state_key = state_key
        if gamma is None or tau is None:
            log(
                WARNING,
                "SVTPrivacyMod: gamma/tau derived from each update; the reported "
                "svt-epsilon is nominal. Set both for a formal guarantee.",
            )

    def __repr__(self) -> str:
        return (
            f"SVTPrivacyMod(share={self.share}, epsilon={self.epsilon}, "
            f"gamma={self.gamma}, tau={self.tau}, "
            f"release_epsilon={self.release_epsilon})"
        )

    def spent(self, context: Context) -> float:
        """Return the cumulative ε recorded for this site in ``context.state``."""
        record = context.state.metric_records.get(self.state_key)
        return float(record["epsilon"]) if record is not None else 0.0

    def _rng(self, msg: Message, context: Context) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        configs = msg.content.config_records
        config: Mapping = next(iter(configs.values())) if configs else {}
        server_round = int(config.get("server-round", 0))
        return np.random.default_rng([self.seed, context.node_id, server_round])

    def _filter(
        self,
        delta: dict[str, np.ndarray],
        steps: float,
        msg: Message,
        context: Context,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        filtered, spend = svt_filter(
            delta,
            self.share,
            self.epsilon,
            self.gamma,
            self.tau,
            self.release_epsilon,
            steps,
            self._rng(msg, context),
            replace=self.replace,
            max_passes=self.max_passes,
        )
        record = context.state.metric_records.get(self.state_key)
        total = (float(record["epsilon"]) if record else 0.0) + spend.epsilon
        calls = (int(record["calls"]) if record else 0) + 1
        context.state[self.state_key] = MetricRecord({"epsilon": total, "calls": calls})
        fraction = shared_fraction(delta, filtered)
        log(
            INFO,
            "%s: sent %.4f of the coordinates; epsilon %.4g this round, %.4g total",
            self.name,
            fraction,
            spend.epsilon,
            total,
        )
        return filtered, {
            protocol.METRIC_SHARED_FRACTION: fraction,
            protocol.METRIC_SVT_EPSILON: total,
        }


class _ZeroUpdate(Exception):  # noqa: N818 (control flow, not an error)
    """Carries a reply whose update is exactly zero past ``fixedclipping_mod``."""

    def __init__(self, reply: Message) -> None:
        super().__init__("zero update")
        self.reply = reply


class _NonFiniteUpdate(Exception):  # noqa: N818 (control flow, not an error)
    """Raised past ``fixedclipping_mod`` when a reply array holds NaN or inf."""


def safe_fixedclipping_mod(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``fixedclipping_mod`` without its two failure modes.

    Clipping for user-level DP with client-side clipping
    (``make_user_level_dp(..., side="client")``, McMahan et al.,
    https://arxiv.org/abs/1710.06963). It delegates to Flower's
    ``fixedclipping_mod`` and differs in two cases:

    - an update of norm exactly 0 (the ClientApp returned the arrays it received)
      is sent as it is, where Flower's clip helper divides by the norm and raises
      ``ZeroDivisionError``;
    - an update holding NaN or inf becomes an error reply (Flower's clip factor
      ``min(1, C / nan)`` is 1, so it would be sent unclipped).

    Messages other than ``train`` pass through, so the mod may sit in the
    ClientApp's app-level ``mods``. It must be the outermost mod that touches the
    arrays (first in the list).
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    received = (
        next(iter(msg.content.array_records.values()))
        if len(msg.content.array_records) == 1
        else None
    )

    def checked_call_next(message: Message, ctxt: Context) -> Message:
        reply = call_next(message, ctxt)
        if received is None or reply.has_error():
            return reply
        if len(reply.content.array_records) != 1:
            return reply  # fixedclipping_mod reports it
        sent = next(iter(reply.content.array_records.values()))
        if list(sent.keys()) != list(received.keys()):
            return reply  # fixedclipping_mod reports it
        zero = True
        for key in sent:
            local = sent[key].numpy()
            if not np.all(np.isfinite(local)):
                raise _NonFiniteUpdate(f"array '{key}' of the reply holds NaN or inf")
            zero = zero and np.array_equal(local, received[key].numpy())
        if zero:
            raise _ZeroUpdate(reply)
        return reply

    try:
        return fixedclipping_mod(msg, context, checked_call_next)
    except _ZeroUpdate as zero_update:
        log(INFO, "safe_fixedclipping_mod: zero update, nothing to clip")
        return zero_update.reply
    except _NonFiniteUpdate as err:
        return mod_error_reply(msg, f"safe_fixedclipping_mod: {err}")


class SiteNormBoundMod:
    """Clip the site's update to an L2 norm the site chose, whatever the server says.

    A site's own bound on what one round of its data may move the model
    (``node_config["max-update-norm"]``): the update ``theta_k - theta_global`` of
    every train reply is clipped to ``min(bound, the server's clipping_norm)`` by
    :func:`safe_fixedclipping_mod` (Flower's clipping), before secure aggregation,
    encryption or compression see it. With secure aggregation the server cannot
    check a single update, so this is where a hospital bounds its own contribution.

    Parameters
    ----------
    bound : float
        The largest L2 norm of an update this site sends, > 0.
    """

    def __init__(self, bound: float) -> None:
        if isinstance(bound, bool) or not (
            isinstance(bound, int | float) and math.isfinite(bound) and bound > 0
        ):
            raise ValueError(
                f"node_config '{protocol.NODE_MAX_UPDATE_NORM}' must be a positive "
                f"number, got {bound!r}"
            )
        self.bound = float(bound)

    def __repr__(self) -> str:
        return f"SiteNormBoundMod(bound={self.bound})"

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Clip a train reply's update to the site's bound."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        configs = msg.content.config_records
        if len(configs) != 1:
            return mod_error_reply(
                msg,
                f"{self!r} expects exactly one ConfigRecord in the train message, "
                f"found {len(configs)}",
            )
        name, config = next(iter(configs.items()))
        server = config.get(KEY_CLIPPING_NORM)
        bound = self.bound
        if isinstance(server, int | float) and not isinstance(server, bool):
            bound = min(bound, float(server))
        content = RecordDict(dict(msg.content.items()))
        content[name] = ConfigRecord({**dict(config), KEY_CLIPPING_NORM: bound})
        return safe_fixedclipping_mod(
            Message(content, metadata=msg.metadata), context, call_next
        )

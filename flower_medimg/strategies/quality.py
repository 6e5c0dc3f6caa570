"""Screening of train replies before aggregation: one pass, every reply on its own.

Every check returns a reason string (or None) so that the caller can log which node
was dropped and why. :func:`screen_replies` applies them in this order and reads the
accepted replies' arrays in place (see :mod:`._wire`), so the aggregation that
follows does not parse them again:

1. replies that carry an error;
2. replies without exactly one ArrayRecord and one MetricRecord, or whose record
   names differ from the other replies';
3. metrics: a key set that differs from the other replies', a missing or non-scalar
   weighting / required metric, any non-finite metric value, ``num-examples <= 0``;
4. arrays: missing or extra keys, a shape or dtype differing from the global model
   (or, without one, from the most common layout among replies), a malformed
   payload;
5. one read of each reply: its update norm ``||theta_k - theta||`` (non-finite
   values give a non-finite norm), checked against an absolute bound and a factor
   times the median update norm.

The result, :class:`ScreenedReplies`, also describes every reply of the round
(:meth:`ScreenedReplies.outcomes`) for the registry and the audit log.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from ._wire import Layout, read_blocks
from .kernels import update_sq_norms

__all__ = [
    "ReplyOutcome",
    "ScreenedReplies",
    "check_metrics",
    "check_record_structure",
    "check_update_norms",
    "log_rejection",
    "node_id_of",
    "screen_replies",
]


def node_id_of(msg: Message) -> int:
    """Return the id of the node that sent ``msg`` (-1 if it is not readable)."""
    try:
        return int(msg.metadata.src_node_id)
    except (AttributeError, TypeError, ValueError):
        return -1


def log_rejection(msg: Message, reason: str) -> None:
    """Log that the train reply ``msg`` is dropped and why."""
    log(WARNING, "\t> Rejected train reply from node %d: %s", node_id_of(msg), reason)


@dataclass(frozen=True)
class ReplyOutcome:
    """One train reply, as the registry and the audit log record it.

    Attributes
    ----------
    node_id : int
        The sending node.
    accepted : bool
        Whether the reply was aggregated.
    reason : Optional[str]
        Why it was rejected.
    update_norm : Optional[float]
        ``||theta_k - theta||`` over all float arrays (None if not measured).
    weight : Optional[float]
        The reply's share in the aggregate (accepted replies).
    """

    node_id: int
    accepted: bool
    reason: str | None
    update_norm: float | None
    weight: float | None

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


def check_record_structure(msg: Message) -> str | None:
    """Check that a reply holds exactly one ArrayRecord and one MetricRecord."""
    content = msg.content
    if len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, found {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, found {len(content.metric_records)}"
    return None


def _is_finite(value: object) -> bool:
    if isinstance(value, list):
        return all(_is_finite(v) for v in value)
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_metrics(
    metrics: MetricRecord,
    weighted_by_key: str,
    required: Sequence[str] = (),
) -> str | None:
    """Check the weighting and required metrics of a reply.

    Required metrics (and ``weighted_by_key``) must be present and scalar; every
    metric must be finite; ``weighted_by_key`` must be positive.
    """
    for key in (weighted_by_key, *required):
        if key not in metrics:
            return f"metric '{key}' is missing"
        if isinstance(metrics[key], list):
            return f"metric '{key}' must be a scalar, got a list"
    for key, value in metrics.items():
        if not _is_finite(value):
            return f"metric '{key}' is not finite ({value})"
    if metrics[weighted_by_key] <= 0:  # type: ignore[operator]
        return f"metric '{weighted_by_key}' is {metrics[weighted_by_key]} (<= 0)"
    return None


def check_update_norms(
    sq_norms: np.ndarray,
    max_update_norm: float | None = None,
    update_norm_factor: float | None = None,
    check_finite: bool = True,
) -> list[str | None]:
    """Return a rejection reason (or None) per reply from its squared update norm.

    A non-finite squared norm means the reply holds non-finite values. The factor
    test compares with the median norm of the finite replies.
    """
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0))
    finite = np.isfinite(norms)
    median = float(np.median(norms[finite])) if finite.any() else math.nan
    reasons: list[str | None] = []
    for norm, ok in zip(norms, finite, strict=True):
        if not ok:
            reasons.append("arrays contain non-finite values" if check_finite else None)
        elif max_update_norm is not None and norm > max_update_norm:
            reasons.append(
                f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}"
            )
        elif (
            update_norm_factor is not None
            and finite.sum() >= 3
            and norm > update_norm_factor * median
        ):
            reasons.append(
                f"update norm {norm:.4g} exceeds {update_norm_factor:g} x the "
                f"median update norm {median:.4g}"
            )
        else:
            reasons.append(None)
    return reasons


@dataclass
class ScreenedReplies:
    """Replies that passed the checks, with their arrays read in place.

    Attributes
    ----------
    accepted : list[Message]
        Accepted replies.
    metrics : list[MetricRecord]
        The MetricRecord of each accepted reply.
    columns : list[list[np.ndarray]]
        For each accepted reply, one flat array per block of ``layout``.
    sq_norms : list[float]
        Squared update norm of each accepted reply (w.r.t. ``reference`` if known,
        else the squared norm of its arrays); NaN until measured.
    layout : Optional[Layout]
        Layout of the model (None if nothing was accepted).
    reference : Optional[list[np.ndarray]]
        Blocks of the global arrays the replies were trained from, if known.
    rejected : list[tuple[int, str]]
        ``(node id, reason)`` of every dropped reply (including error replies).
    order : list[int]
        Node id of every reply of the round, in the order received.
    rejected_norms : dict[int, float]
        Update norms measured for replies that were then rejected.
    """

    accepted: list[Message] = field(default_factory=list)
    columns: list[list[np.ndarray]] = field(default_factory=list)
    sq_norms: list[float] = field(default_factory=list)
    layout: Layout | None = None
    reference: list[np.ndarray] | None = None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    metrics: list[MetricRecord] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    rejected_norms: dict[int, float] = field(default_factory=dict)

    def metric(self, key: str) -> np.ndarray:
        """Return a scalar metric of every accepted reply as a float64 array."""
        return np.array([float(m[key]) for m in self.metrics], dtype=np.float64)  # type: ignore[arg-type]

    def reject(self, indices: Iterable[int], reasons: Sequence[str]) -> None:
        """Move the accepted replies at ``indices`` to the rejected ones (logged)."""
        drop = dict(zip(indices, reasons, strict=True))
        if not drop:
            return
        for i, reason in drop.items():
            node_id = node_id_of(self.accepted[i])
            log_rejection(self.accepted[i], reason)
            self.rejected.append((node_id, reason))
            if not math.isnan(self.sq_norms[i]):
                self.rejected_norms[node_id] = math.sqrt(max(self.sq_norms[i], 0.0))
        keep = [i for i in range(len(self.accepted)) if i not in drop]
        self.accepted = [self.accepted[i] for i in keep]
        self.columns = [self.columns[i] for i in keep]
        self.metrics = [self.metrics[i] for i in keep]
        self.sq_norms = [self.sq_norms[i] for i in keep]

    def measure(self) -> None:
        """Measure every accepted reply's squared update norm (one read of each)."""
        self.sq_norms = [
            float(v) for v in update_sq_norms(self.columns, self.reference)
        ]

    def data_checks(
        self,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
        check_finite: bool = True,
    ) -> None:
        """Drop replies with non-finite arrays or too large updates."""
        reasons = check_update_norms(
            np.asarray(self.sq_norms), max_update_norm, update_norm_factor, check_finite
        )
        bad = [i for i, r in enumerate(reasons) if r is not None]
        self.reject(bad, [reasons[i] for i in bad])  # type: ignore[misc]

    def outcomes(
        self, weights: Mapping[int, float] | None = None
    ) -> list[ReplyOutcome]:
        """Describe every reply of the round, in the order received.

        Parameters
        ----------
        weights : Mapping[int, float], optional
            The aggregation weight of each accepted node; by default each accepted
            reply's share of the summed weighting metric is not known and None is
            recorded.
        """
        accepted_norms = {
            node_id_of(msg): math.sqrt(max(sq, 0.0))
            for msg, sq in zip(self.accepted, self.sq_norms, strict=True)
            if not math.isnan(sq)
        }
        reasons = dict(self.rejected)
        outcomes = []
        for node_id in self.order:
            accepted = node_id not in reasons
            norm = accepted_norms.get(node_id, self.rejected_norms.get(node_id))
            outcomes.append(
                ReplyOutcome(
                    node_id=node_id,
                    accepted=accepted,
                    reason=None if accepted else reasons[node_id],
                    update_norm=norm,
                    weight=(weights or {}).get(node_id) if accepted else None,
                )
            )
        return outcomes


def _majority(values: list) -> object:
    """Most common value (first seen wins ties)."""
    if not values:
        return None
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _signature(record: ArrayRecord) -> tuple:
    return tuple((k, tuple(a.shape), a.dtype) for k, a in record.items())


# pylint: disable-next=too-many-arguments,too-many-locals,too-many-branches
def screen_replies(
    replies: Iterable[Message],
    *,
    reference: ArrayRecord | None,
    weighted_by_key: str = "num-examples",
    required_metrics: Sequence[str] = (),
    check_finite: bool = True,
    max_update_norm: float | None = None,
    update_norm_factor: float | None = None,
) -> ScreenedReplies:
    """Validate train replies and read the accepted ones.

    Parameters
    ----------
    replies : Iterable[Message]
        Train replies of one round.
    reference : Optional[ArrayRecord]
        Global arrays sent in ``configure_train``; keys, shapes and dtypes of the
        replies must match them, and update norms are measured from them. If None,
        the most common layout among the replies is the reference and norms are
        those of the arrays.
    weighted_by_key : str (default: "num-examples")
        Metric holding the number of examples; must be positive.
    required_metrics : Sequence[str] (default: ())
        Further metrics a reply must carry as finite scalars.
    check_finite : bool (default: True)
        Reject replies with non-finite array values.
    max_update_norm : Optional[float] (default: None)
        Reject replies whose update norm exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Reject replies whose update norm exceeds this factor times the median
        update norm (needs at least three finite replies).

    Returns
    -------
    ScreenedReplies
        Accepted replies (with their arrays read in place and their update norms)
        and rejected node ids.
    """
    replies = list(replies)
    screened = ScreenedReplies(order=[node_id_of(msg) for msg in replies])
    candidates: list[Message] = []
    num_errors = 0
    for msg in replies:
        if msg.has_error():
            num_errors += 1
            reason = f"error reply ({msg.error.reason})"
        else:
            reason = check_record_structure(msg)
        if reason is None:
            candidates.append(msg)
        else:
            log_rejection(msg, reason)
            screened.rejected.append((node_id_of(msg), reason))
    log(
        INFO,
        "aggregate_train: Received %s results and %s failures",
        len(replies) - num_errors,
        num_errors,
    )

    # Look the records up once (RecordDict builds these views on every access)
    records = []
    for msg in candidates:
        arrays = msg.content.array_records
        metrics = msg.content.metric_records
        array_name, metric_name = next(iter(arrays)), next(iter(metrics))
        records.append(
            (msg, array_name, arrays[array_name], metric_name, metrics[metric_name])
        )
    # Record names must agree (Flower's consistency rules)
    array_name = _majority([r[1] for r in records])
    metric_name = _majority([r[3] for r in records])
    layout: Layout | None = None
    if reference is not None:
        try:
            layout = Layout.from_arrayrecord(reference)
        except ValueError as err:
            log(WARNING, "aggregate_train: cannot use the global arrays: %s", err)
    if layout is None:
        signatures = [_signature(r[2]) for r in records]
        majority = _majority(signatures)
        if majority is not None:
            try:
                layout = Layout.from_arrayrecord(records[signatures.index(majority)][2])
            except ValueError as err:
                log(WARNING, "aggregate_train: unusable arrays: %s", err)
    screened.layout = layout

    reasons: list[str | None] = []
    for _, name, _, metrics_name, metrics in records:
        if name != array_name:
            reasons.append(f"ArrayRecord is named '{name}', expected '{array_name}'")
        elif metrics_name != metric_name:
            reasons.append(
                f"MetricRecord is named '{metrics_name}', expected '{metric_name}'"
            )
        else:
            reasons.append(check_metrics(metrics, weighted_by_key, required_metrics))
    # metric key sets must agree too: the majority among the replies that passed
    metric_keys = _majority(
        [
            frozenset(r[4].keys())
            for r, why in zip(records, reasons, strict=True)
            if why is None
        ]
    )
    for (msg, _, record, _, metrics), reason in zip(records, reasons, strict=True):
        if reason is None and frozenset(metrics.keys()) != metric_keys:
            missing = sorted(metric_keys - set(metrics.keys()))  # type: ignore[operator]
            extra = sorted(set(metrics.keys()) - metric_keys)  # type: ignore[operator]
            reason = f"metric keys differ (missing {missing}, unexpected {extra})"
        columns = None
        if reason is None:
            if layout is None:
                reason = "no usable model layout"
            else:
                try:
                    columns = read_blocks(record, layout)
                except ValueError as err:
                    reason = str(err)
        if reason is not None:
            log_rejection(msg, reason)
            screened.rejected.append((node_id_of(msg), reason))
            continue
        screened.accepted.append(msg)
        screened.columns.append(columns)  # type: ignore[arg-type]
        screened.metrics.append(metrics)

    if reference is not None and layout is not None:
        try:
            screened.reference = read_blocks(reference, layout)
        except ValueError as err:
            log(WARNING, "aggregate_train: cannot read the global arrays: %s", err)

    screened.measure()
    screened.data_checks(max_update_norm, update_norm_factor, check_finite)
    return screened

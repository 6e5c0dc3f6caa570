"""Screening of replies before anything reads them: one pass, every reply on its own.

Every reply is hostile until screened (see the project's threat model). Every check
returns a reason string (or None) so that the caller can log which node was dropped
and why, and every reply is screened inside its own guard: whatever a reply holds,
it costs only itself. :func:`screen_replies` applies the checks to train replies
in this order and reads the accepted replies' arrays in place (see :mod:`._wire`),
so the aggregation that follows does not parse them again:

1. replies that carry an error;
2. replies without exactly one ArrayRecord and one MetricRecord, or whose record
   names differ from the other replies';
3. metrics (:func:`check_metrics`): every value a finite scalar, the weighting and
   required metrics present, ``num-examples`` a positive whole number within the
   bounds, metrics with a known range inside it, and the same key set as the
   other valid replies;
4. arrays: missing or extra keys, a shape, dtype or serialisation differing from
   the global model (or, without one, from the most common layout), a malformed
   payload;
5. one read of each reply: its update norm ``||theta_k - theta||`` and its largest
   value (non-finite values give a non-finite norm), checked against an absolute
   bound on the values, an absolute bound on the norm and a factor times the median
   update norm;
6. with three replies or more and ``min_cosine`` set: the cosine between every
   two updates; an update whose cosine is below ``min_cosine`` with more than
   half of the other updates is dropped. A sign-flipped or random update
   disagrees with every honest one, and an honest update disagrees at most with
   the bad one, so one bad site of three is caught. (A check against the
   coordinate-wise median update misses a sign flip with three sites: where the
   honest updates are weakly correlated, the median of ``(a, b, -3c)`` follows
   ``-3c`` for small ``c``, and the flipped update's cosine with it was positive
   in our runs.)

:func:`screen_evaluate_replies` applies 1-3 to evaluate replies. The result of a
train screening, :class:`ScreenedReplies`, also describes every reply of the round
(:meth:`ScreenedReplies.outcomes`) for the registry and the audit log.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from flower_medimg.core import protocol

from ._wire import Layout, read_blocks
from .kernels import reply_magnitudes, update_gram

__all__ = [
    "ReplyOutcome",
    "ScreenedReplies",
    "ScreeningRules",
    "check_metrics",
    "check_record_structure",
    "check_update_norms",
    "log_rejection",
    "node_id_of",
    "screen_evaluate_replies",
    "screen_replies",
]


def node_id_of(msg: Message) -> int:
    """Return the id of the node that sent ``msg`` (-1 if it is not readable)."""
    try:
        return int(msg.metadata.src_node_id)
    except (AttributeError, TypeError, ValueError):
        return -1


def log_rejection(msg: Message, reason: str, kind: str = "train") -> None:
    """Log that the reply ``msg`` is dropped and why."""
    log(
        WARNING, "\t> Rejected %s reply from node %d: %s", kind, node_id_of(msg), reason
    )


@dataclass(frozen=True)
class ScreeningRules:
    """What a reply must satisfy to be aggregated.

    Attributes
    ----------
    weighted_by_key : str
        Metric that weights the reply; must be a positive finite scalar.
    required_metrics : tuple[str, ...]
        Further metrics every reply must carry.
    check_finite : bool
        Reject replies with non-finite array values.
    max_update_norm : Optional[float]
        Reject updates whose norm exceeds this bound.
    update_norm_factor : Optional[float]
        Reject updates whose norm exceeds this factor times the median update
        norm (three finite replies or more).
    min_cosine : Optional[float]
        Reject updates whose cosine is below this with more than half of the
        other updates (three replies or more, global arrays known).
    max_abs_value : Optional[float]
        Reject replies holding a float value larger than this in magnitude.
    max_num_examples : Optional[int]
        Largest ``num-examples`` a site may claim.
    num_examples_bounds : Mapping[int, int]
        Per node, the largest ``num-examples`` it may claim (e.g. the training-set
        size it reported in the statistics phase).
    """

    weighted_by_key: str = protocol.METRIC_NUM_EXAMPLES
    required_metrics: tuple[str, ...] = ()
    check_finite: bool = True
    max_update_norm: float | None = None
    update_norm_factor: float | None = None
    min_cosine: float | None = None
    max_abs_value: float | None = None
    max_num_examples: int | None = None
    num_examples_bounds: Mapping[int, int] = field(default_factory=dict)

    def stricter(self, other: ScreeningRules) -> ScreeningRules:
        """Return the rules that both ``self`` and ``other`` demand."""
        required = list(self.required_metrics)
        required += [m for m in other.required_metrics if m not in required]
        return replace(
            self,
            required_metrics=tuple(required),
            check_finite=self.check_finite or other.check_finite,
            max_update_norm=_smaller(self.max_update_norm, other.max_update_norm),
            update_norm_factor=_smaller(
                self.update_norm_factor, other.update_norm_factor
            ),
            min_cosine=_larger(self.min_cosine, other.min_cosine),
            max_abs_value=_smaller(self.max_abs_value, other.max_abs_value),
            max_num_examples=_smaller(self.max_num_examples, other.max_num_examples),
            num_examples_bounds={
                **other.num_examples_bounds,
                **self.num_examples_bounds,
            },
        )


def _smaller(a: Any, b: Any) -> Any:
    values = [x for x in (a, b) if x is not None]
    return min(values) if values else None


def _larger(a: Any, b: Any) -> Any:
    values = [x for x in (a, b) if x is not None]
    return max(values) if values else None


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


def check_record_structure(msg: Message, with_arrays: bool = True) -> str | None:
    """Check that a reply holds one MetricRecord (and, to train, one ArrayRecord)."""
    content = msg.content
    if with_arrays and len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, found {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, found {len(content.metric_records)}"
    return None


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_metrics(
    metrics: MetricRecord, rules: ScreeningRules, node_id: int = -1
) -> str | None:
    """Check a reply's metrics against ``rules``; return why it fails, or None.

    Every value must be a finite scalar (a list is refused: nothing aggregates it
    safely); the weighting metric and the required ones must be present and the
    weighting metric positive; ``num-examples`` must be a whole number (not
    ``12.5``) within ``max_num_examples`` and the node's own bound; metrics with a
    known range (:data:`flower_medimg.core.protocol.METRIC_RANGES`) must lie in it.
    """
    for key, value in metrics.items():
        if not _is_scalar(value):
            return f"metric '{key}' must be a number, got {type(value).__name__}"
        if not math.isfinite(value):  # type: ignore[arg-type]
            return f"metric '{key}' is not finite ({value})"
        low, high = protocol.METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not low <= value <= high:  # type: ignore[operator]
            return f"metric '{key}' is {value}, outside [{low:g}, {high:g}]"
    for key in (rules.weighted_by_key, *rules.required_metrics):
        if key not in metrics:
            return f"metric '{key}' is missing"
    weight = metrics[rules.weighted_by_key]
    if weight <= 0:  # type: ignore[operator]
        return f"metric '{rules.weighted_by_key}' is {weight} (<= 0)"
    if protocol.METRIC_NUM_EXAMPLES in metrics:
        return _check_num_examples(
            metrics[protocol.METRIC_NUM_EXAMPLES], rules, node_id
        )
    return None


def _check_num_examples(value: Any, rules: ScreeningRules, node_id: int) -> str | None:
    key = protocol.METRIC_NUM_EXAMPLES
    if not isinstance(value, int) or value <= 0:
        return f"metric '{key}' must be a positive whole number, got {value!r}"
    if rules.max_num_examples is not None and value > rules.max_num_examples:
        return f"metric '{key}' is {value}, above the bound {rules.max_num_examples}"
    bound = rules.num_examples_bounds.get(node_id)
    if bound is not None and value > bound:
        return (
            f"metric '{key}' is {value}, more than the {bound} training samples the "
            "site reported in the statistics phase"
        )
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

    def reject_non_positive(self, keys: Sequence[str]) -> None:
        """Drop the accepted replies whose metric ``key`` is not above zero."""
        bad, reasons = [], []
        for i, metrics in enumerate(self.metrics):
            for key in keys:
                if not float(metrics[key]) > 0:  # type: ignore[arg-type]
                    bad.append(i)
                    reasons.append(f"metric '{key}' is {metrics[key]} (must be > 0)")
                    break
        self.reject(bad, reasons)

    def outcomes(
        self, weights: Mapping[int, float] | None = None
    ) -> list[ReplyOutcome]:
        """Describe every reply of the round, in the order received.

        Parameters
        ----------
        weights : Mapping[int, float], optional
            The aggregation weight of each accepted node (None where unknown).
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

    # ---- the data checks (one read of every reply, then the robust tests) -------

    def data_checks(self, rules: ScreeningRules) -> None:
        """Measure every accepted reply once and drop those the rules refuse."""
        self._measure(rules)
        reasons = check_update_norms(
            np.asarray(self.sq_norms),
            rules.max_update_norm,
            rules.update_norm_factor,
            rules.check_finite,
        )
        bad = [i for i, r in enumerate(reasons) if r is not None]
        self.reject(bad, [reasons[i] for i in bad])  # type: ignore[misc]
        if rules.min_cosine is not None:
            self._agreement_check(rules.min_cosine)

    def _measure(self, rules: ScreeningRules) -> None:
        """Squared update norm and largest value of each reply, each on its own."""
        self.sq_norms = []
        bad, reasons = [], []
        for i, columns in enumerate(self.columns):
            try:
                sq_norms, largest = reply_magnitudes([columns], self.reference)
                self.sq_norms.append(float(sq_norms[0]))
                if (
                    rules.max_abs_value is not None
                    and math.isfinite(largest[0])
                    and largest[0] > rules.max_abs_value
                ):
                    bad.append(i)
                    reasons.append(
                        f"holds a value of magnitude {largest[0]:.4g}, above the bound "
                        f"{rules.max_abs_value:.4g}"
                    )
            except Exception as err:  # pylint: disable=broad-exception-caught
                self.sq_norms.append(math.nan)
                bad.append(i)
                reasons.append(f"arrays could not be read ({type(err).__name__})")
        self.reject(bad, reasons)

    def _agreement_check(self, min_cosine: float) -> None:
        """Drop updates that point away from most of the other updates."""
        n = len(self.accepted)
        if self.reference is None or self.layout is None or n < 3:
            return
        gram = update_gram(self.columns, self.reference, self.layout.float_blocks)
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        moving = norms > 0.0  # a zero update has no direction
        bad, reasons = [], []
        for k in np.flatnonzero(moving):
            others = [j for j in np.flatnonzero(moving) if j != k]
            cosines = [gram[k, j] / (norms[k] * norms[j]) for j in others]
            against = sum(1 for c in cosines if not c >= min_cosine)
            if others and against > len(others) / 2:
                bad.append(int(k))
                reasons.append(
                    f"update points away from {against} of the {len(others)} other "
                    f"updates (cosines {', '.join(f'{c:.3f}' for c in cosines)} "
                    f"< {min_cosine:g})"
                )
        self.reject(bad, reasons)


def _majority(values: list) -> object:
    """Most common value (first seen wins ties)."""
    if not values:
        return None
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _signature(record: ArrayRecord) -> tuple:
    return tuple((k, tuple(a.shape), a.dtype) for k, a in record.items())


@dataclass
class _Candidate:
    """A reply that passed the first checks, with its records looked up once."""

    msg: Message
    node_id: int
    metrics_name: str
    metrics: MetricRecord
    arrays_name: str | None = None
    arrays: ArrayRecord | None = None
    reason: str | None = None


def _candidates(
    replies: Iterable[Message],
    rules: ScreeningRules,
    rejected: list[tuple[int, str]],
    *,
    with_arrays: bool,
    kind: str,
) -> tuple[list[_Candidate], int]:
    """Error, structure and metric checks of each reply, each in its own guard."""
    candidates: list[_Candidate] = []
    num_errors = 0
    for msg in replies:
        node_id = node_id_of(msg)
        try:
            if msg.has_error():
                num_errors += 1
                reason = f"error reply ({msg.error.reason})"
            else:
                reason = check_record_structure(msg, with_arrays)
            if reason is None:
                metric_records = msg.content.metric_records
                metrics_name = next(iter(metric_records))
                metrics = metric_records[metrics_name]
                candidate = _Candidate(msg, node_id, metrics_name, metrics)
                if with_arrays:
                    array_records = msg.content.array_records
                    candidate.arrays_name = next(iter(array_records))
                    candidate.arrays = array_records[candidate.arrays_name]
                candidate.reason = check_metrics(metrics, rules, node_id)
                candidates.append(candidate)
                continue
        except Exception as err:  # pylint: disable=broad-exception-caught
            reason = f"reply could not be read ({type(err).__name__}: {err})"
        log_rejection(msg, reason, kind)
        rejected.append((node_id, reason))
    # record names and metric key sets must agree among the valid replies
    valid = [c for c in candidates if c.reason is None]
    metrics_name = _majority([c.metrics_name for c in valid])
    arrays_name = _majority([c.arrays_name for c in valid])
    metric_keys = _majority([frozenset(c.metrics.keys()) for c in valid])
    for c in valid:
        if c.metrics_name != metrics_name:
            c.reason = (
                f"MetricRecord is named '{c.metrics_name}', expected '{metrics_name}'"
            )
        elif with_arrays and c.arrays_name != arrays_name:
            c.reason = (
                f"ArrayRecord is named '{c.arrays_name}', expected '{arrays_name}'"
            )
        elif frozenset(c.metrics.keys()) != metric_keys:
            missing = sorted(metric_keys - set(c.metrics.keys()))  # type: ignore[operator]
            extra = sorted(set(c.metrics.keys()) - metric_keys)  # type: ignore[operator]
            c.reason = f"metric keys differ (missing {missing}, unexpected {extra})"
    return candidates, num_errors


def _layout(
    reference: ArrayRecord | None, candidates: list[_Candidate]
) -> Layout | None:
    """Return the global model's layout, or the most common one of the replies."""
    if reference is not None:
        try:
            return Layout.from_arrayrecord(reference)
        except ValueError as err:
            log(WARNING, "aggregate_train: cannot use the global arrays: %s", err)
    records = [
        c.arrays for c in candidates if c.reason is None and c.arrays is not None
    ]
    signatures = []
    for record in records:
        try:
            signatures.append(_signature(record))
        except Exception:  # pylint: disable=broad-exception-caught
            signatures.append(None)
    majority = _majority([s for s in signatures if s is not None])
    if majority is None:
        return None
    try:
        return Layout.from_arrayrecord(records[signatures.index(majority)])
    except ValueError as err:
        log(WARNING, "aggregate_train: unusable arrays: %s", err)
        return None


def screen_replies(
    replies: Iterable[Message],
    *,
    reference: ArrayRecord | None,
    rules: ScreeningRules,
    log_received: bool = True,
) -> ScreenedReplies:
    """Screen the train replies of one round and read the accepted ones.

    Never raises for anything a reply holds: each reply is screened in its own
    guard, and a reply that fails any check is dropped with a log line naming its
    node and the reason.

    Parameters
    ----------
    replies : Iterable[Message]
        Train replies of one round.
    reference : Optional[ArrayRecord]
        Global arrays sent in ``configure_train``; keys, shapes and dtypes of the
        replies must match them, and update norms are measured from them. If None,
        the most common layout among the replies is the reference and norms are
        those of the arrays.
    rules : ScreeningRules
        What a reply must satisfy.
    log_received : bool (default: True)
        Log the round's ``Received N results and M failures`` line (off where a
        wrapped Flower strategy logs it itself).

    Returns
    -------
    ScreenedReplies
        Accepted replies (with their arrays read in place and their update norms)
        and rejected node ids.
    """
    replies = list(replies)
    screened = ScreenedReplies(order=[node_id_of(msg) for msg in replies])
    candidates, num_errors = _candidates(
        replies, rules, screened.rejected, with_arrays=True, kind="train"
    )
    if log_received:
        log(
            INFO,
            "aggregate_train: Received %s results and %s failures",
            len(replies) - num_errors,
            num_errors,
        )
    layout = _layout(reference, candidates)
    screened.layout = layout
    for c in candidates:
        columns = None
        if c.reason is None:
            if layout is None:
                c.reason = "no usable model layout"
            else:
                try:
                    columns = read_blocks(c.arrays, layout)  # type: ignore[arg-type]
                except Exception as err:  # pylint: disable=broad-exception-caught
                    c.reason = str(err) if isinstance(err, ValueError) else repr(err)
        if c.reason is not None:
            log_rejection(c.msg, c.reason)
            screened.rejected.append((c.node_id, c.reason))
            continue
        screened.accepted.append(c.msg)
        screened.columns.append(columns)  # type: ignore[arg-type]
        screened.metrics.append(c.metrics)
    if reference is not None and layout is not None:
        try:
            screened.reference = read_blocks(reference, layout)
        except ValueError as err:
            log(WARNING, "aggregate_train: cannot read the global arrays: %s", err)
    screened.data_checks(rules)
    return screened


def screen_evaluate_replies(
    replies: Iterable[Message], rules: ScreeningRules
) -> tuple[list[Message], list[tuple[int, str]]]:
    """Screen the evaluate replies of one round; return the accepted and rejected.

    The same guards and metric checks as :func:`screen_replies` (an evaluate reply
    carries one MetricRecord and needs no arrays): a non-scalar, non-finite or
    out-of-range metric, a missing or lying ``num-examples`` drops the reply
    (``num_examples_bounds`` are training-set sizes and do not apply here).
    """
    rejected: list[tuple[int, str]] = []
    rules = replace(rules, num_examples_bounds={})  # the bounds are training sets
    candidates, _ = _candidates(
        replies, rules, rejected, with_arrays=False, kind="evaluate"
    )
    accepted = []
    for c in candidates:
        if c.reason is None:
            accepted.append(c.msg)
        else:
            log_rejection(c.msg, c.reason, "evaluate")
            rejected.append((c.node_id, c.reason))
    return accepted, rejected


class ReplyScreening:
    """The reply checks a strategy (or the gate) applies, as constructor parameters.

    Shared by :class:`~flower_medimg.strategies.FastFedAvg` and
    :class:`~flower_medimg.strategies.QualityGate`; all checks default to what
    Flower's ``FedAvg`` accepts except non-finite values and malformed replies.

    Parameters
    ----------
    check_finite : bool (default: True)
        Drop replies with non-finite array values.
    max_update_norm : Optional[float] (default: None)
        Drop replies whose update norm ``||theta_k - theta||`` exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Drop replies whose update norm exceeds this factor times the round's median
        update norm (applied with at least three replies).
    min_cosine : Optional[float] (default: None)
        Drop updates whose cosine is below this with more than half of the other
        updates (three replies or more).
    max_abs_value : Optional[float] (default: None)
        Drop replies holding a value larger than this in magnitude.
    max_num_examples : Optional[int] (default: None)
        Drop replies claiming more samples than this.
    max_weight_share : Optional[float] (default: None)
        Cap every reply's aggregation weight at this share (0.5: no site weighs
        more than all the others together); the excess goes to the others in
        proportion (:func:`~flower_medimg.strategies.kernels.cap_shares`).
    """

    _screening_names = (
        "check_finite",
        "max_update_norm",
        "update_norm_factor",
        "min_cosine",
        "max_abs_value",
        "max_num_examples",
        "max_weight_share",
    )

    # pylint: disable-next=too-many-arguments
    def _setup_screening(
        self,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
        min_cosine: float | None = None,
        max_abs_value: float | None = None,
        max_num_examples: int | None = None,
        max_weight_share: float | None = None,
    ) -> None:
        for name, value in (
            ("max_update_norm", max_update_norm),
            ("update_norm_factor", update_norm_factor),
            ("max_abs_value", max_abs_value),
            ("max_num_examples", max_num_examples),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be positive, got {value}")
        if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
            raise ValueError(f"`min_cosine` must be in [-1, 1], got {min_cosine}")
        if max_weight_share is not None and not 0.0 < max_weight_share <= 1.0:
            raise ValueError(
                f"`max_weight_share` must be in (0, 1], got {max_weight_share}"
            )
        self.check_finite = check_finite
        self.max_update_norm = max_update_norm
        self.update_norm_factor = update_norm_factor
        self.min_cosine = min_cosine
        self.max_abs_value = max_abs_value
        self.max_num_examples = max_num_examples
        self.max_weight_share = max_weight_share
        #: Per node, the largest ``num-examples`` it may claim (set by the ServerApp
        #: from the statistics phase).
        self.num_examples_bounds: dict[int, int] = {}

    def screening_rules(
        self, weighted_by_key: str, required_metrics: Sequence[str] = ()
    ) -> ScreeningRules:
        """Return the rules these parameters describe."""
        return ScreeningRules(
            weighted_by_key=weighted_by_key,
            required_metrics=tuple(required_metrics),
            check_finite=self.check_finite,
            max_update_norm=self.max_update_norm,
            update_norm_factor=self.update_norm_factor,
            min_cosine=self.min_cosine,
            max_abs_value=self.max_abs_value,
            max_num_examples=self.max_num_examples,
            num_examples_bounds=dict(self.num_examples_bounds),
        )

    def _log_screening(self) -> None:
        log(INFO, "\t├──> Reply checks:")
        for name in self._screening_names:
            log(INFO, "\t│\t├── %s: %s", name, getattr(self, name))

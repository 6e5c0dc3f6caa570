"""HomomorphicFedAvg: federated averaging of CKKS ciphertexts by a server without key.

Papers: HEFL (Zhang et al., review ref. 25); FedAvg (McMahan et al. 2017,
https://arxiv.org/abs/1602.05629); CKKS (Cheon et al., ASIACRYPT 2017,
https://eprint.iacr.org/2016/421); TenSEAL (Benaissa et al. 2021,
https://arxiv.org/abs/2104.03152).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flower_medimg.core import protocol
from flower_medimg.core.homomorphic import (
    CIPHERTEXT_SUFFIX,
    SHAPE_SUFFIX,
    add_and_scale,
    check_shape,
    ciphertext_key,
    is_encrypted_key,
    layout_of,
    load_public_context,
    shape_key,
    validate_chunks,
)

from ._wire import cast_to_dtype
from .chain import DelegatingWrapper
from .fast_fedavg import FastFedAvg
from .kernels import cap_shares
from .quality import (
    ReplyOutcome,
    ReplyScreening,
    ScreeningRules,
    check_metrics,
    check_record_structure,
    log_rejection,
    node_id_of,
)

__all__ = ["HomomorphicFedAvg", "aggregation_problem"]

#: FastFedAvg's checks that read the values of individual updates.
_VALUE_CHECKS = ("max_update_norm", "update_norm_factor", "min_cosine", "max_abs_value")
_FAST_AGGREGATION = ("aggregate_train", "aggregate_screened", "_aggregation_weights")


def aggregation_problem(strategy: Strategy) -> str | None:
    """Say why ``strategy``'s aggregate cannot be computed on ciphertexts.

    Under CKKS the server may add ciphertexts and multiply them by plaintext
    scalars. That computes a weighted mean with weights from plaintext metrics,
    nothing that reads the values of individual updates (distances, norms,
    clipping, medians, Krum). Accepted: Flower's ``FedAvg`` and ``FedProx`` (and
    any ``FedAvg`` subclass keeping its ``aggregate_train``), and
    :class:`~flower_medimg.strategies.FastFedAvg` with its aggregation unchanged
    and no value checks set.

    Returns
    -------
    Optional[str]
        ``None`` if the strategy is a plain weighted mean, else the reason.
    """
    cls = type(strategy)
    if issubclass(cls, FastFedAvg):
        changed = [
            n
            for n in _FAST_AGGREGATION
            if getattr(cls, n) is not getattr(FastFedAvg, n)
        ]
        if changed or cls._combine is not FastFedAvg._combine:
            return (
                f"{cls.__name__} overrides FastFedAvg's aggregation, so its weights "
                "or its combination may read the values of individual updates"
            )
        checks = [n for n in _VALUE_CHECKS if getattr(strategy, n) is not None]
        if checks:
            return (
                f"{cls.__name__} has the reply checks {checks} set, which read the "
                "values of individual updates"
            )
        return None
    if issubclass(cls, FedAvg) and cls.aggregate_train is FedAvg.aggregate_train:
        return None
    return (
        f"{cls.__name__} is not FedAvg, FedProx or a plain FastFedAvg, so its "
        "aggregate is not known to be a weighted mean of the replies (wrappers such "
        "as QualityGate or DP clipping, DOS, medians and Krum read individual updates)"
    )


@dataclass(frozen=True)
class _Spec:
    """What the replies must carry for one model array."""

    encrypted: bool
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class _Reply:
    """A reply that passed the screening, read once."""

    msg: Message
    weight: float
    plain: dict[str, np.ndarray] = field(default_factory=dict)
    chunks: dict[str, list[bytes]] = field(default_factory=dict)


class _Rejected(Exception):  # noqa: N818 (control flow, not an error)
    """Why a reply is dropped."""


class HomomorphicFedAvg(DelegatingWrapper, Strategy):
    """Weighted federated averaging of CKKS-encrypted weights (HEFL).

    The sites (:class:`~flower_medimg.privacy.homomorphic_mod.HomomorphicEncryptionMod`)
    hold the secret key and reply ``Enc(n_k * theta_k)`` for the encrypted
    arrays. This strategy holds only the public context: it adds the
    ciphertexts of the accepted replies and multiplies the sum by the plaintext
    ``1 / sum(n_k)``, giving ``Enc(sum_k n_k theta_k / sum_k n_k)``, the next
    global entry, which only the sites can decrypt. After round 1 the server
    never holds the plaintext of an encrypted array, neither a site's nor the
    average. Arrays not selected by ``keys`` (and integer arrays) travel and are
    averaged in plaintext. Every round the sites send full weights, so no
    ciphertext is multiplied twice: the default context (moduli [60, 40, 40])
    has exactly the depth one multiplication needs.

    Sampling, train/evaluate configuration and metric aggregation are the
    wrapped strategy's (``configure_train``, ``configure_evaluate``,
    ``aggregate_evaluate``, ``train_metrics_aggr_fn``, ``weighted_by_key``); its
    ``max_num_examples``, ``num_examples_bounds`` and ``max_weight_share``
    (capped weights: each ciphertext is then multiplied by its own plaintext
    coefficient before the sum) are honoured. Each train reply is screened on its
    own and dropped, with a log line naming the node and the array, if it carries
    an error, has not exactly one ArrayRecord and one MetricRecord, a bad
    weighting metric, missing or extra keys, a plaintext array of another shape
    or dtype or non-finite, or ciphertexts that do not deserialise under the
    public context, were made under another key, or whose chunk count, sizes,
    level or scale do not match. The values inside a ciphertext cannot be checked
    (poisoning is out of reach of a server that cannot decrypt); the site mod
    refuses to encrypt non-finite values. :attr:`last_outcomes` describes every
    reply of the last round.

    Parameters
    ----------
    strategy : Strategy
        A plain weighted-mean strategy (see :func:`aggregation_problem`).
    public_context_path : str or Path
        The server's TenSEAL context, without the secret key (``he-public.ctx``).
    keys : Optional[Sequence[str]] (default: None)
        Prefixes of the array keys the sites encrypt; ``None``: every
        floating-point array. Must match the sites' ``keys``.

    Raises
    ------
    ValueError
        If ``strategy`` needs the values of individual updates, or the context
        file is missing, not a TenSEAL context, or holds the secret key.
    """

    _OWN_ATTRIBUTES = frozenset(
        {"strategy", "keys", "context", "layout", "current_arrays", "last_outcomes"}
    )

    def __init__(
        self,
        strategy: Strategy,
        public_context_path: str | Path,
        keys: Sequence[str] | None = None,
    ) -> None:
        problem = aggregation_problem(strategy)
        if problem is not None:
            raise ValueError(
                f"HomomorphicFedAvg cannot wrap {type(strategy).__name__}: {problem}. "
                "The server sees only ciphertexts, so it can compute a weighted mean "
                "and nothing else; wrap FedAvg, FedProx or FastFedAvg."
            )
        self.strategy = strategy
        self.keys = None if keys is None else tuple(keys)
        self.context = load_public_context(public_context_path)
        self.layout = layout_of(self.context)
        self.current_arrays: ArrayRecord | None = None
        self.last_outcomes: list[ReplyOutcome] = []

    @property
    def weighted_by_key(self) -> str:
        """The metric holding each reply's aggregation weight."""
        return getattr(self.strategy, "weighted_by_key", protocol.METRIC_NUM_EXAMPLES)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(
            INFO,
            "\t├──> HomomorphicFedAvg (CKKS) around %s:",
            type(self.strategy).__name__,
        )
        log(INFO, "\t│\t├── Encrypted keys: %s", self.keys or "every float array")
        log(INFO, "\t│\t├── Slots per ciphertext: %d", self.layout.slots)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays, name the weighting metric, then delegate."""
        self.current_arrays = arrays
        config = ConfigRecord(
            {**dict(config), protocol.CONFIG_HE_WEIGHT_KEY: self.weighted_by_key}
        )
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, then average them: ciphertexts homomorphically."""
        replies = list(replies)
        if self.current_arrays is None:
            log(ERROR, "HomomorphicFedAvg: aggregate_train before configure_train")
            return None, None
        specs = self._specs(self.current_arrays)
        accepted, rejected = self._screen(replies, specs)
        shares = self._shares(accepted)
        self.last_outcomes = [
            ReplyOutcome(
                node_id=node_id_of(msg),
                accepted=node_id_of(msg) in shares,
                reason=rejected.get(node_id_of(msg)),
                update_norm=None,
                weight=shares.get(node_id_of(msg)),
            )
            for msg in replies
        ]
        if not accepted:
            log(
                WARNING,
                "HomomorphicFedAvg: no valid reply in round %d (%d rejected); "
                "keeping the global model",
                server_round,
                len(rejected),
            )
            return None, None
        arrays = self._aggregate(accepted, specs, shares)
        metrics = self.strategy.train_metrics_aggr_fn(  # type: ignore[attr-defined]
            [reply.msg.content for reply in accepted], self.weighted_by_key
        )
        metrics[protocol.ROUND_GATE_ACCEPTED] = len(accepted)
        metrics[protocol.ROUND_GATE_REJECTED] = len(rejected)
        log(
            INFO,
            "HomomorphicFedAvg: %d replies aggregated under encryption, weights by "
            "node: %s",
            len(accepted),
            ", ".join(f"{k}: {w:.4f}" for k, w in shares.items()),
        )
        return arrays, metrics

    # ---- screening ------------------------------------------------------------------

    def _specs(self, arrays: ArrayRecord) -> dict[str, _Spec]:
        """Derive what the replies must carry from the global arrays sent."""
        specs = {}
        for key, array in arrays.items():
            if key.endswith(SHAPE_SUFFIX):
                continue
            if key.endswith(CIPHERTEXT_SUFFIX):
                base = key[: -len(CIPHERTEXT_SUFFIX)]
                shape = check_shape(arrays[shape_key(base)].numpy())
                specs[base] = _Spec(True, shape, np.dtype(np.float32))
                continue
            dtype = np.dtype(array.dtype)
            encrypted = is_encrypted_key(key, dtype, self.keys)
            specs[key] = _Spec(encrypted, tuple(array.shape), dtype)
        return specs

    def _rules(self) -> ScreeningRules:
        if isinstance(self.strategy, ReplyScreening):
            return self.strategy.screening_rules(self.weighted_by_key)
        return ScreeningRules(weighted_by_key=self.weighted_by_key)

    def _screen(
        self, replies: list[Message], specs: dict[str, _Spec]
    ) -> tuple[list[_Reply], dict[int, str]]:
        """Screen every reply in its own guard; log each one dropped."""
        rules = self._rules()
        accepted, rejected = [], {}
        for msg in replies:
            try:
                accepted.append(self._read(msg, specs, rules))
                continue
            except _Rejected as err:
                reason = str(err)
            except Exception as err:  # pylint: disable=broad-exception-caught
                reason = f"reply could not be read ({type(err).__name__}: {err})"
            log_rejection(msg, reason)
            rejected[node_id_of(msg)] = reason
        return accepted, rejected

    def _read(
        self, msg: Message, specs: dict[str, _Spec], rules: ScreeningRules
    ) -> _Reply:
        """Check one reply and read its arrays; raise :class:`_Rejected` if bad."""
        if msg.has_error():
            raise _Rejected(f"error reply ({msg.error.reason})")
        reason = check_record_structure(msg)
        metrics = next(iter(msg.content.metric_records.values()), None)
        if reason is None and metrics is not None:
            reason = check_metrics(metrics, rules, node_id_of(msg))
        if reason is not None:
            raise _Rejected(reason)
        record = next(iter(msg.content.array_records.values()))
        _check_keys(record, specs)
        reply = _Reply(msg, float(metrics[rules.weighted_by_key]))  # type: ignore[index,arg-type]
        for key, spec in specs.items():
            if spec.encrypted:
                reply.chunks[key] = self._read_ciphertext(record, key, spec)
            else:
                reply.plain[key] = _read_plain(record, key, spec)
        return reply

    def _read_ciphertext(
        self, record: ArrayRecord, key: str, spec: _Spec
    ) -> list[bytes]:
        try:
            shape = check_shape(record[shape_key(key)].numpy())
            if shape != spec.shape:
                raise ValueError(f"shape {list(shape)}, expected {list(spec.shape)}")
            packed = record[ciphertext_key(key)].numpy()
            return validate_chunks(
                self.context, self.layout, packed, int(np.prod(shape))
            )
        except ValueError as err:
            raise _Rejected(f"encrypted array '{key}': {err}") from err

    # ---- aggregation ----------------------------------------------------------------

    def _shares(self, accepted: list[_Reply]) -> dict[int, float]:
        """Each accepted node's share of the summed weights, capped if asked."""
        if not accepted:
            return {}
        weights = np.array([reply.weight for reply in accepted])
        shares = weights / weights.sum()
        max_share = getattr(self.strategy, "max_weight_share", None)
        if max_share is not None and len(shares) > 1:
            shares = cap_shares(shares, max_share)
        return {
            node_id_of(reply.msg): float(share)
            for reply, share in zip(accepted, shares, strict=True)
        }

    def _aggregate(
        self, accepted: list[_Reply], specs: dict[str, _Spec], shares: dict[int, float]
    ) -> ArrayRecord:
        """Build the new global arrays: ciphertexts where encrypted, else means."""
        share = np.array([shares[node_id_of(reply.msg)] for reply in accepted])
        weights = np.array([reply.weight for reply in accepted])
        uncapped = np.allclose(share, weights / weights.sum(), rtol=1e-12, atol=0)
        coefficients = (
            [1.0 / float(weights.sum())] * len(accepted)
            if uncapped
            else list(share / weights)
        )
        out = ArrayRecord()
        for key, spec in specs.items():
            if spec.encrypted:
                chunks = [reply.chunks[key] for reply in accepted]
                out[ciphertext_key(key)] = Array(
                    add_and_scale(self.context, self.layout, chunks, coefficients)
                )
                out[shape_key(key)] = Array(np.asarray(spec.shape, dtype=np.int64))
            else:
                mean = sum(
                    s * reply.plain[key].astype(np.float64)
                    for s, reply in zip(share, accepted, strict=True)
                )
                out[key] = Array(
                    np.asarray(cast_to_dtype(np.asarray(mean), spec.dtype)).reshape(
                        spec.shape
                    )
                )
        return out


def _wire_keys(specs: dict[str, _Spec]) -> set[str]:
    keys: set[str] = set()
    for key, spec in specs.items():
        keys |= {ciphertext_key(key), shape_key(key)} if spec.encrypted else {key}
    return keys


def _check_keys(record: ArrayRecord, specs: dict[str, _Spec]) -> None:
    expected = _wire_keys(specs)
    missing = sorted(expected - set(record.keys()))
    extra = sorted(set(record.keys()) - expected)
    if missing or extra:
        raise _Rejected(f"array keys differ: missing {missing}, extra {extra}")


def _read_plain(record: ArrayRecord, key: str, spec: _Spec) -> np.ndarray:
    array = record[key]
    if np.dtype(array.dtype) != spec.dtype or tuple(array.shape) != spec.shape:
        raise _Rejected(
            f"array '{key}' is {array.dtype} {list(array.shape)}, expected "
            f"{spec.dtype} {list(spec.shape)}"
        )
    values = array.numpy()
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise _Rejected(f"array '{key}' contains non-finite values")
    return values

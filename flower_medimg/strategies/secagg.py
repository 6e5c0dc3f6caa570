"""SecAgg+ for Message-API strategies: the server learns only the weighted mean.

Papers: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, https://eprint.iacr.org/2017/281 ; Bell et al.,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020,
https://eprint.iacr.org/2020/704

Flower 1.42's ``SecAggPlusWorkflow`` runs only on the legacy API.
:class:`SecAggPlus` wraps a Message-API strategy instead and runs the protocol's
exchanges inside one round (the stages and maths are in
:mod:`flower_medimg.core.secagg`, the site's side in
:class:`flower_medimg.privacy.SecAggPlusMod`):

1. ``configure_train``: the wrapped strategy samples the sites and builds their
   train messages; the wrapper then runs key advertisement and the sharing of keys
   through the grid, computes each site's weight (its bounded ``num-examples``
   share, or uniform) and returns the train messages with the routed shares and
   the weight (the collect exchange);
2. ``aggregate_train``: the masked inputs are checked, the unmask exchange asks
   the survivors for the shares, the masks are removed, and the sum divided by the
   survivors' weights is the weighted mean update. Every accepted reply is handed
   to the wrapped strategy carrying that same mean (and its own plaintext metrics),
   so FedAvg returns the mean, FedAdam steps from it and the metrics are
   aggregated as usual.

The wrapped strategy must aggregate as a (num-examples or unit) weighted mean of
the replies, with at most a server optimiser on top: FedAvg, FedProx, FedAvgM, the
FedOpt family and our FastFedAvg. Strategies that need each update (medians,
Krum, distance outlier suppression, loss-weighted or normalised averaging) are
refused at construction. If fewer than the threshold of shares can be gathered for
any secret the round fails, logged with the numbers, and the global model is kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Strategy,
)

from flower_medimg.core import protocol
from flower_medimg.core import secagg as sa

from ._wire import cast_to_dtype
from .chain import DelegatingWrapper, strategy_chain
from .kernels import cap_shares, normalise_weights
from .quality import ReplyOutcome, node_id_of
from .user_level_dp import plain_mean

__all__ = ["SecAggPlus", "secure_mean_problem"]

#: Sets of ``threshold`` shares tried to step around wrong shares of one secret.
_MAX_REBUILDS = 64

#: Server optimisers that step from the (securely aggregated) mean.
_MEAN_OPTIMISERS = (FedAdam, FedYogi, FedAdagrad, FedAvgM)
_OWN_ATTRIBUTES = frozenset(
    {
        "strategy",
        "num_shares",
        "threshold",
        "clipping_range",
        "quantization_bits",
        "timeout",
        "max_num_examples",
        "max_weight_share",
        "last_outcomes",
        "_round",
    }
)


def secure_mean_problem(strategy: Strategy) -> str | None:
    """Say why ``strategy``'s aggregate cannot be computed from a secure sum.

    Returns ``None`` when the innermost FedAvg-family strategy of the chain
    aggregates as FedAvg's weighted mean (or a server optimiser steps from it).
    """
    for level in strategy_chain(strategy):
        if isinstance(level, FedAvg):
            if plain_mean(level) or type(level) in _MEAN_OPTIMISERS:
                return None
            return (
                f"{type(level).__name__} needs each site's update or weights from "
                "it (medians, distances, losses, normalised steps), and secure "
                "aggregation shows the server only the sum"
            )
    return (
        f"{type(strategy_chain(strategy)[-1]).__name__} is not a FedAvg-family "
        "strategy, so its aggregate is not known to be a weighted mean"
    )


def _weight_key(strategy: Strategy) -> str:
    for level in strategy_chain(strategy):
        if isinstance(level, FedAvg):
            return level.weighted_by_key
    return protocol.METRIC_NUM_EXAMPLES


class _Round:
    """What the server remembers of one round's protocol."""

    def __init__(self, server_round: int, arrays: ArrayRecord, threshold: int) -> None:
        self.server_round = server_round
        self.arrays = arrays
        self.threshold = threshold
        self.graph: dict[int, list[int]] = {}
        self.mask_keys: dict[int, bytes] = {}
        self.commitments: dict[int, bytes] = {}  # SHA-256 of each site's mask seed
        self.shared: set[int] = set()  # sites whose shares were routed (U2)
        self.weights: dict[int, float] = {}
        self.modulus_bits = 0
        self.grid: Grid | None = None


class SecAggPlus(DelegatingWrapper, Strategy):
    """Wrap a strategy so the server aggregates masked updates (SecAgg+).

    Parameters
    ----------
    strategy : Strategy
        A weighted-mean strategy (see :func:`secure_mean_problem`), possibly behind
        :class:`~flower_medimg.strategies.QualityGate` or a user-level DP wrapper
        in client-side clipping mode.
    num_shares : int, optional
        Sites holding shares of one site's secrets, itself included (SecAgg+'s
        neighbourhood); ``None`` = every sampled site (Bonawitz's SecAgg).
    threshold : int, optional
        Shares needed to rebuild a secret; more than half of ``num_shares``.
        ``None`` = ``ceil(2 num_shares / 3)``.
    clipping_range : float (default: 1.0)
        Each coordinate of ``weight * update`` is clipped to ``[-c, c]``.
    quantization_bits : int (default: 24)
        Bits of a quantised coordinate; the masked inputs travel mod
        ``2^(bits + ceil(log2 n))``.
    timeout : float (default: 600.0)
        Seconds to wait for each extra exchange.
    max_num_examples : int, optional
        The largest training-set size a site may claim for its weight.
    max_weight_share : float, optional
        No site's weight exceeds this share (water-filling, as the reply gate).

    Raises
    ------
    ValueError
        If the wrapped strategy needs individual updates, or a parameter is invalid.
    """

    _OWN_ATTRIBUTES = _OWN_ATTRIBUTES

    def __init__(
        self,
        strategy: Strategy,
        *,
        num_shares: int | None = None,
        threshold: int | None = None,
        clipping_range: float = 1.0,
        quantization_bits: int = 24,
        timeout: float = 600.0,
        max_num_examples: int | None = None,
        max_weight_share: float | None = None,
    ) -> None:
        problem = secure_mean_problem(strategy)
        if problem is not None:
            raise ValueError(f"secure aggregation cannot wrap this strategy: {problem}")
        if num_shares is not None and num_shares < 2:
            raise ValueError(f"num_shares must be >= 2, got {num_shares}")
        if threshold is not None and threshold < 2:
            raise ValueError(f"threshold must be >= 2, got {threshold}")
        shares = num_shares or max(3, 2 * (threshold or 0) - 1)  # checked per round
        sa.check_parameters(
            shares,
            threshold or _default_threshold(shares),
            quantization_bits,
            clipping_range,
        )
        self.strategy = strategy
        self.num_shares = num_shares
        self.threshold = threshold
        self.clipping_range = float(clipping_range)
        self.quantization_bits = int(quantization_bits)
        self.timeout = float(timeout)
        self.max_num_examples = max_num_examples
        self.max_weight_share = max_weight_share
        self.last_outcomes: list[ReplyOutcome] = []
        self._round: _Round | None = None

    def __repr__(self) -> str:
        return f"SecAggPlus({self.strategy!r})"

    def summary(self) -> None:
        """Log the protocol's parameters, then the wrapped strategy's summary."""
        log(INFO, "\t├──> SecAgg+ in front of %s:", type(self.strategy).__name__)
        log(
            INFO,
            "\t│\t├── shares %s, threshold %s, clipping range %s, %d bits",
            self.num_shares or "all sites",
            self.threshold or "2/3 of the shares",
            self.clipping_range,
            self.quantization_bits,
        )
        self.strategy.summary()

    # ---- collect: sample, advertise keys, share keys ------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Run key advertisement and key sharing; return the masked train messages."""
        self._round = None
        messages = {
            int(m.metadata.dst_node_id): m
            for m in self.strategy.configure_train(server_round, arrays, config, grid)
        }
        nodes = sorted(messages)
        shares = min(self.num_shares or len(nodes), len(nodes))
        threshold = self.threshold or _default_threshold(shares)
        try:
            sa.check_parameters(
                shares, threshold, self.quantization_bits, self.clipping_range
            )
        except ValueError as err:
            log(
                ERROR,
                "secagg round %d: %d sites sampled: %s; no training this round",
                server_round,
                len(nodes),
                err,
            )
            return []
        state = _Round(server_round, arrays, threshold)
        state.grid = grid
        state.graph = sa.neighbours(nodes, shares)
        state.modulus_bits = sa.modulus_bits(self.quantization_bits, len(nodes))
        counts, encryption_keys = self._advertise(state, grid)
        ciphertexts = self._share_keys(state, encryption_keys, grid)
        state.weights = self._weights(counts, state.shared)
        self._round = state
        log(
            INFO,
            "secagg round %d: %d of %d sites shared keys (threshold %d, modulus 2^%d)",
            server_round,
            len(state.shared),
            len(nodes),
            threshold,
            state.modulus_bits,
        )
        return [
            _with_secagg(
                messages[node],
                server_round,
                {
                    sa.CONFIG_STAGE: sa.STAGE_COLLECT,
                    sa.CONFIG_WEIGHT: state.weights[node],
                    **ciphertexts.get(node, {}),
                },
            )
            for node in sorted(state.shared)
        ]

    def _exchange(
        self, grid: Grid, state: _Round, contents: dict[int, ConfigRecord]
    ) -> dict[int, Message]:
        """Send one exchange; return the replies that carry the protocol record."""
        sent = [
            Message(
                RecordDict({sa.RECORD_SECAGG: config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(state.server_round),
            )
            for node, config in contents.items()
        ]
        replies: dict[int, Message] = {}
        for reply in grid.send_and_receive(sent, timeout=self.timeout):
            node = node_id_of(reply)
            if reply.has_error():
                log(WARNING, "secagg: node %d: %s", node, reply.error.reason)
            elif node in contents and sa.RECORD_SECAGG in reply.content.config_records:
                replies[node] = reply
            else:
                log(WARNING, "secagg: node %d replied without the protocol", node)
        return replies

    def _advertise(
        self, state: _Round, grid: Grid
    ) -> tuple[dict[int, float], dict[int, bytes]]:
        """Key advertisement: every sampled site's two public keys and its count."""
        common = {
            sa.CONFIG_STAGE: sa.STAGE_SETUP,
            sa.CONFIG_THRESHOLD: state.threshold,
            sa.CONFIG_CLIPPING_RANGE: self.clipping_range,
            sa.CONFIG_QUANTIZATION_BITS: self.quantization_bits,
            sa.CONFIG_MODULUS_BITS: state.modulus_bits,
        }
        replies = self._exchange(
            grid,
            state,
            {
                node: ConfigRecord({**common, sa.CONFIG_NEIGHBOURS: near})
                for node, near in state.graph.items()
            },
        )
        key = _weight_key(self.strategy)
        counts, encryption_keys = {}, {}
        for node, reply in replies.items():
            config = reply.content[sa.RECORD_SECAGG]
            metrics = reply.content.metric_records.get(protocol.RECORD_METRICS, {})
            try:
                mask_key = config[sa.KEY_MASK_PUBLIC]
                encryption_key = config[sa.KEY_ENCRYPTION_PUBLIC]
                sa.load_public_key(mask_key)
                sa.load_public_key(encryption_key)
                count = float(metrics.get(key, 1))
                if not (math.isfinite(count) and count > 0):
                    raise ValueError(f"'{key}' = {count}")
            except (KeyError, ValueError, TypeError) as err:
                log(WARNING, "secagg: node %d: bad key advertisement: %s", node, err)
                continue
            state.mask_keys[node] = mask_key
            encryption_keys[node] = encryption_key
            counts[node] = count
        return counts, encryption_keys

    def _share_keys(
        self, state: _Round, encryption_keys: dict[int, bytes], grid: Grid
    ) -> dict[int, dict[str, bytes]]:
        """Send each site its neighbours' keys; route the encrypted shares."""
        advertised = set(encryption_keys)
        contents = {}
        for node in advertised:
            values: dict[str, Any] = {sa.CONFIG_STAGE: sa.STAGE_SHARE_KEYS}
            for other in advertised.intersection(state.graph[node]):
                values[sa.node_key(sa.KEY_MASK_PUBLIC, other)] = state.mask_keys[other]
                values[sa.node_key(sa.KEY_ENCRYPTION_PUBLIC, other)] = encryption_keys[
                    other
                ]
            contents[node] = ConfigRecord(values)
        replies = self._exchange(grid, state, contents)
        routed: dict[int, dict[str, bytes]] = {}
        for node, reply in replies.items():
            config = reply.content[sa.RECORD_SECAGG]
            targets = advertised.intersection(state.graph[node])
            names = {sa.node_key(sa.KEY_CIPHERTEXT, t): t for t in targets}
            expected = {*names, sa.KEY_SEED_COMMITMENT}
            if set(config.keys()) != expected or not all(
                isinstance(config[name], bytes) for name in expected
            ):
                log(WARNING, "secagg: node %d: shares missing or malformed", node)
                continue
            state.shared.add(node)
            state.commitments[node] = config[sa.KEY_SEED_COMMITMENT]
            for name, target in names.items():
                routed.setdefault(target, {})[sa.node_key(sa.KEY_CIPHERTEXT, node)] = (
                    config[name]
                )
        # a site only keeps the shares of sites that shared with it
        return {
            node: {
                name: value
                for name, value in routed.get(node, {}).items()
                if int(name.rsplit(":", 1)[1]) in state.shared
            }
            for node in state.shared
        }

    def _weights(self, counts: dict[int, float], nodes: set[int]) -> dict[int, float]:
        """Each site's share of the mean: bounded counts, normalised and capped."""
        order = sorted(nodes)
        bound = self.max_num_examples or math.inf
        bounds = getattr(self.strategy, "num_examples_bounds", {}) or {}
        raw = [min(counts[n], bound, bounds.get(n, math.inf)) for n in order]
        weights = normalise_weights(raw)
        if self.max_weight_share is not None:
            weights = cap_shares(weights, self.max_weight_share)
        return dict(zip(order, (float(w) for w in weights), strict=True))

    # ---- unmask and aggregate -----------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked inputs and let the wrapped strategy finish."""
        replies = list(replies)
        state, self._round = self._round, None
        self.last_outcomes = []
        if state is None or state.server_round != server_round:
            return self._fail(replies, "no SecAgg+ exchange ran this round")
        masked, rejected = {}, []
        for reply in replies:
            problem = self._masked_problem(reply, state)
            if problem is None:
                masked[node_id_of(reply)] = reply
            else:
                log(WARNING, "secagg: node %d: %s", node_id_of(reply), problem)
                rejected.append(_as_error(reply, problem))
        try:
            mean = self._unmasked_mean(state, masked)
        except _UnmaskError as failed:
            return self._fail(replies, str(failed))
        kept = [
            Message(
                RecordDict(
                    {
                        protocol.RECORD_ARRAYS: mean,
                        protocol.RECORD_METRICS: next(
                            iter(reply.content.metric_records.values())
                        ),
                    }
                ),
                metadata=reply.metadata,
            )
            for reply in masked.values()
        ]
        return self.strategy.aggregate_train(server_round, kept + rejected)

    def _masked_problem(self, reply: Message, state: _Round) -> str | None:
        """Say what is wrong with a masked input (``None``: nothing)."""
        node = node_id_of(reply)
        if reply.has_error():
            return f"error reply ({reply.error.reason})"
        if node not in state.shared:
            return "not a site that shared keys this round"
        records = reply.content.array_records
        if len(records) != 1 or len(reply.content.metric_records) != 1:
            return "expected one ArrayRecord and one MetricRecord"
        record = next(iter(records.values()))
        if list(record.keys()) != list(state.arrays.keys()):
            return "its array keys differ from the global model's"
        dtype, limit = sa.wire_dtype(state.modulus_bits), 1 << state.modulus_bits
        for key in record:
            value = record[key].numpy()
            if value.dtype != dtype or value.shape != tuple(state.arrays[key].shape):
                return (
                    f"array '{key}' is {value.dtype} {value.shape}, expected "
                    f"{dtype} {tuple(state.arrays[key].shape)}"
                )
            if value.size and int(value.max()) >= limit:
                return f"array '{key}' holds values beyond 2^{state.modulus_bits}"
        return None

    def _unmasked_mean(self, state: _Round, masked: dict[int, Message]) -> ArrayRecord:
        """Run the unmask exchange and return the global model plus the mean update."""
        survivors = set(masked)
        dropped = state.shared - survivors
        if len(survivors) < state.threshold:
            raise _UnmaskError(
                f"{len(survivors)} masked inputs arrived, fewer than the threshold "
                f"{state.threshold}"
            )
        contents = {}
        for node in survivors:
            near = set(state.graph[node]) & state.shared
            contents[node] = ConfigRecord(
                {
                    sa.CONFIG_STAGE: sa.STAGE_UNMASK,
                    sa.CONFIG_SURVIVORS: sorted((near | {node}) & survivors),
                    sa.CONFIG_DROPPED: sorted(near & dropped),
                }
            )
        replies = self._exchange(state.grid, state, contents)
        keys = list(state.arrays.keys())
        totals = sa.masked_sum(
            {
                node: [
                    next(iter(r.content.array_records.values()))[k].numpy()
                    for k in keys
                ]
                for node, r in masked.items()
            },
            state.modulus_bits,
        )
        for node in sorted(survivors):
            seed = self._rebuild(state, replies, sa.KEY_SEED_SHARE, node)
            sa.add_mask(totals, seed, -1, state.modulus_bits)
        for node in sorted(dropped):
            near_survivors = sorted(set(state.graph[node]) & survivors)
            if not near_survivors:
                continue
            secret = sa.private_key_from_bytes(
                self._rebuild(state, replies, sa.KEY_SECRET_SHARE, node)
            )
            for other in near_survivors:  # remove ``other``'s mask with ``node``
                seed = sa.pairwise_seed(
                    secret, sa.load_public_key(state.mask_keys[other])
                )
                sign = sa.signed_pairwise(other, node)
                sa.add_mask(totals, seed, -sign, state.modulus_bits)
        limit = len(survivors) * ((1 << self.quantization_bits) - 1)
        if any(t.size and int(t.max()) > limit for t in totals):
            raise _UnmaskError(
                "the unmasked sum lies outside the range of honest inputs: a site "
                "sent an out-of-range masked input or a share was wrong"
            )
        sums = sa.dequantize_sum(
            totals, self.clipping_range, self.quantization_bits, len(survivors)
        )
        weight = sum(state.weights[node] for node in survivors)
        mean = {}
        for key, total in zip(keys, sums, strict=True):
            old = state.arrays[key].numpy()
            mean[key] = Array(
                cast_to_dtype(old.astype(np.float64) + total / weight, old.dtype)
            )
        log(
            INFO,
            "secagg round %d: unmasked the sum of %d sites (%d dropped after sharing)",
            state.server_round,
            len(survivors),
            len(dropped),
        )
        return ArrayRecord(mean)

    def _rebuild(
        self, state: _Round, replies: dict[int, Message], kind: str, node: int
    ) -> bytes:
        """Rebuild ``node``'s secret from ``threshold`` of the shares that check out.

        A mask seed must hash to the commitment ``node`` sent with its shares, a
        mask key must match the public key it advertised; a wrong share (a lying or
        broken site) is stepped around by trying other sets of ``threshold`` shares.
        """
        what = "mask seed" if kind == sa.KEY_SEED_SHARE else "mask key"
        name = sa.node_key(kind, node)
        shares = [
            reply.content[sa.RECORD_SECAGG][name]
            for reply in replies.values()
            if isinstance(reply.content[sa.RECORD_SECAGG].get(name), bytes)
        ]
        if len(shares) < state.threshold:
            raise _UnmaskError(
                f"{len(shares)} shares of node {node}'s {what} arrived, fewer than "
                f"the threshold {state.threshold}"
            )
        for attempt, subset in enumerate(
            itertools.combinations(shares, state.threshold)
        ):
            if attempt == _MAX_REBUILDS:
                break
            secret = _combined(list(subset))
            if secret is not None and self._verifies(state, kind, node, secret):
                if attempt:
                    log(
                        WARNING, "secagg: a share of node %d's %s was wrong", node, what
                    )
                return secret
        raise _UnmaskError(
            f"no {state.threshold} of the {len(shares)} shares of node {node}'s "
            f"{what} rebuild it: sites sent wrong shares"
        )

    @staticmethod
    def _verifies(state: _Round, kind: str, node: int, secret: bytes) -> bool:
        if kind == sa.KEY_SEED_SHARE:
            return sa.seed_commitment(secret) == state.commitments[node]
        try:
            key = sa.private_key_from_bytes(secret)
        except ValueError:
            return False
        return sa.public_key_bytes(key) == state.mask_keys[node]

    def _fail(
        self, replies: list[Message], reason: str
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Log why the round aggregates nothing; every reply is recorded rejected."""
        log(ERROR, "secagg: the round is dropped, the global model kept: %s", reason)
        self.last_outcomes = [
            ReplyOutcome(node_id_of(r), False, f"secagg: {reason}", None, None)
            for r in replies
        ]
        return None, None


class _UnmaskError(Exception):
    """The round's sum cannot be unmasked."""


def _combined(shares: list[bytes]) -> bytes | None:
    """Combine Shamir shares; ``None`` if they do not combine."""
    try:
        return combine_shares(shares)
    except ValueError:
        return None


def _default_threshold(num_shares: int) -> int:
    return max(num_shares // 2 + 1, math.ceil(2 * num_shares / 3))


def _with_secagg(
    message: Message, server_round: int, values: dict[str, Any]
) -> Message:
    """Return a copy of a train message carrying the protocol record."""
    content = RecordDict(dict(message.content.items()))
    content[sa.RECORD_SECAGG] = ConfigRecord(values)
    return Message(
        content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=str(server_round),
    )


def _as_error(reply: Message, reason: str) -> Message:
    """Return ``reply`` as an error reply (the wrapped strategy records it)."""
    if reply.has_error():
        return reply
    return Message(
        Error(code=ErrorCode.UNKNOWN, reason=f"secagg: {reason}"),
        metadata=reply.metadata,
    )

"""The site's side of SecAgg+: only a masked update leaves the site.

Papers: Bonawitz et al., CCS 2017, https://eprint.iacr.org/2017/281 ; Bell et al.,
CCS 2020, https://eprint.iacr.org/2020/704 (the shared definitions are in
:mod:`flower_medimg.core.secagg`).

:class:`SecAggPlusMod` answers the protocol's exchanges itself and lets the
ClientApp train only in the collect exchange. What the site keeps between the
exchanges of a round (its two secret keys, its mask seed, the shares it holds) lives
in ``context.state`` and is erased when the round's unmasking is answered.

The site defends itself against a curious or lying server:

- it refuses a threshold of half the shareholders or less, and a train message
  without the protocol (which would expose its update);
- it refuses a repeated public key, a share addressed to someone else, and a
  ciphertext it cannot decrypt;
- when unmasking it reveals, for each neighbour, the share of its mask seed or the
  share of its secret key, never both, once per round, and only while at least the
  threshold of its shareholders survived.

Every refusal is an error reply that names the exchange and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from logging import INFO

import numpy as np
from cryptography.exceptions import InvalidKey
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from flower_medimg.core import protocol
from flower_medimg.core import secagg as sa

from .mods import mod_error_reply

__all__ = ["SecAggPlusMod"]

#: ``context.state`` entry of the round in progress.
STATE_KEY = "secagg-site"


class SecAggError(ValueError):
    """A protocol message the site refuses."""


def _ints(config: ConfigRecord, key: str) -> list[int]:
    value = config.get(key, [])
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise SecAggError(f"'{key}' must be a list of node ids")
    return [int(v) for v in value]


def _number(config: ConfigRecord, key: str, kind: type) -> float | int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SecAggError(f"'{key}' is missing or not a number ({value!r})")
    return kind(value)


def _bytes(config: ConfigRecord, key: str) -> bytes:
    value = config.get(key)
    if not isinstance(value, bytes):
        raise SecAggError(f"'{key}' is missing or not bytes")
    return value


class SecAggPlusMod:
    """Flower mod: take part in SecAgg+ so the server only sees the masked update.

    Put it first among the site's mods (outermost), so that what it masks is the
    update as every other mod left it (clipped for user-level DP, for instance)::

        app = ClientApp(mods=[SecAggPlusMod(num_examples_fn)])

    Parameters
    ----------
    num_examples_fn : Callable[[Context], int], optional
        The site's training-set size, sent in key advertisement so that the server
        can send each site its weight before training. Without it the site reports
        1 (uniform weights).
    """

    def __init__(self, num_examples_fn: Callable[[Context], int] | None = None) -> None:
        self.num_examples_fn = num_examples_fn

    def __repr__(self) -> str:
        return "SecAggPlusMod()"

    def __call__(
        self, msg: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        """Answer a SecAgg+ exchange, or train and mask the update (collect)."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        config = msg.content.config_records.get(sa.RECORD_SECAGG)
        stage = None if config is None else config.get(sa.CONFIG_STAGE)
        try:
            if stage == sa.STAGE_SETUP:
                return self._setup(msg, context, config)
            if stage == sa.STAGE_SHARE_KEYS:
                return _share_keys(msg, context, config)
            if stage == sa.STAGE_COLLECT:
                return _collect(msg, context, config, call_next)
            if stage == sa.STAGE_UNMASK:
                return _unmask(msg, context, config)
            raise SecAggError(
                "this run uses secure aggregation: a train message without a "
                f"SecAgg+ stage ({stage!r}; valid: {', '.join(sa.STAGES)}) would "
                "expose the site's update, so it is refused"
            )
        except (SecAggError, InvalidKey, InvalidToken, KeyError) as err:
            reason = f"secagg {stage or 'message'} refused: {err or type(err).__name__}"
            return mod_error_reply(msg, reason)

    def _setup(self, msg: Message, context: Context, config: ConfigRecord) -> Message:
        """Key advertisement: check the parameters, make two key pairs, reply both."""
        me = int(context.node_id)
        neighbours = _ints(config, sa.CONFIG_NEIGHBOURS)
        threshold = int(_number(config, sa.CONFIG_THRESHOLD, int))
        bits = int(_number(config, sa.CONFIG_QUANTIZATION_BITS, int))
        modulus = int(_number(config, sa.CONFIG_MODULUS_BITS, int))
        clipping = float(_number(config, sa.CONFIG_CLIPPING_RANGE, float))
        if me in neighbours or len(set(neighbours)) != len(neighbours):
            raise SecAggError("the neighbour list repeats a node or holds the site")
        try:
            sa.check_parameters(len(neighbours) + 1, threshold, bits, clipping)
        except ValueError as err:
            raise SecAggError(str(err)) from None
        if not bits < modulus <= 32:
            raise SecAggError(f"modulus bits {modulus} must be in ({bits}, 32]")
        mask_key = ec.generate_private_key(sa.CURVE)
        encryption_key = ec.generate_private_key(sa.CURVE)
        context.state[STATE_KEY] = ConfigRecord(
            {
                "stage": sa.STAGE_SETUP,
                "round": _round(msg),
                "node": me,
                "neighbours": neighbours,
                "threshold": threshold,
                "bits": bits,
                "modulus": modulus,
                "clipping": clipping,
                "mask-key": sa.private_key_bytes(mask_key),
                "encryption-key": sa.private_key_bytes(encryption_key),
            }
        )
        count = (
            1 if self.num_examples_fn is None else int(self.num_examples_fn(context))
        )
        log(
            INFO,
            "secagg: node %d advertises its keys (%d neighbours)",
            me,
            len(neighbours),
        )
        return _reply(
            msg,
            {
                sa.KEY_MASK_PUBLIC: sa.public_key_bytes(mask_key),
                sa.KEY_ENCRYPTION_PUBLIC: sa.public_key_bytes(encryption_key),
            },
            MetricRecord(
                {protocol.METRIC_NUM_EXAMPLES: count, protocol.METRIC_UNIT_WEIGHT: 1}
            ),
        )


def _round(msg: Message) -> int:
    return int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0


def _state(context: Context, stage: str, msg: Message) -> ConfigRecord:
    """Return the round's state, which must have reached ``stage``."""
    state = context.state.config_records.get(STATE_KEY)
    if state is None or state.get("stage") != stage:
        raise SecAggError(
            f"out of order: expected after '{stage}', the site is at "
            f"'{None if state is None else state.get('stage')}'"
        )
    if state.get("round") != _round(msg):
        raise SecAggError(f"message of round {_round(msg)} in round {state['round']}")
    return state


def _reply(
    msg: Message, values: dict[str, bytes], metrics: MetricRecord | None = None
) -> Message:
    content = RecordDict({sa.RECORD_SECAGG: ConfigRecord(values)})
    if metrics is not None:
        content[protocol.RECORD_METRICS] = metrics
    return Message(content, reply_to=msg)


def _share_keys(msg: Message, context: Context, config: ConfigRecord) -> Message:
    """Share the mask seed and mask key among the neighbours, encrypted to each."""
    state = _state(context, sa.STAGE_SETUP, msg)
    me = int(context.node_id)
    own_public = {
        sa.public_key_bytes(sa.private_key_from_bytes(state[name]))
        for name in ("mask-key", "encryption-key")
    }
    present: dict[int, tuple[bytes, bytes]] = {}
    for node in state["neighbours"]:
        mask_key = config.get(sa.node_key(sa.KEY_MASK_PUBLIC, node))
        encryption_key = config.get(sa.node_key(sa.KEY_ENCRYPTION_PUBLIC, node))
        if mask_key is None and encryption_key is None:
            continue  # a neighbour that did not advertise keys
        present[node] = (
            _bytes(config, sa.node_key(sa.KEY_MASK_PUBLIC, node)),
            _bytes(config, sa.node_key(sa.KEY_ENCRYPTION_PUBLIC, node)),
        )
    keys = [k for pair in present.values() for k in pair]
    if len(set(keys)) != len(keys) or own_public & set(keys):
        raise SecAggError("two sites advertise the same public key")
    threshold = state["threshold"]
    if len(present) + 1 < threshold:
        raise SecAggError(
            f"only {len(present)} neighbours advertised keys; the threshold is "
            f"{threshold} shareholders"
        )
    seed = os.urandom(32)
    holders = sorted([me, *present])
    seed_shares = create_shares(seed, threshold, len(holders))
    key_shares = create_shares(state["mask-key"], threshold, len(holders))
    encryption_key = sa.private_key_from_bytes(state["encryption-key"])
    ciphertexts: dict[str, bytes] = {}
    for position, node in enumerate(holders):
        if node == me:
            own = (seed_shares[position], key_shares[position])
            continue
        plaintext = share_keys_plaintext_concat(
            me, node, seed_shares[position], key_shares[position]
        )
        key = sa.agreed_key(encryption_key, sa.load_public_key(present[node][1]))
        ciphertexts[sa.node_key(sa.KEY_CIPHERTEXT, node)] = encrypt(key, plaintext)
    for node, (mask_key, encryption_public) in present.items():
        state[sa.node_key(sa.KEY_MASK_PUBLIC, node)] = mask_key
        state[sa.node_key(sa.KEY_ENCRYPTION_PUBLIC, node)] = encryption_public
    state["seed"] = seed
    state[sa.node_key(sa.KEY_SEED_SHARE, me)] = own[0]
    state[sa.node_key(sa.KEY_SECRET_SHARE, me)] = own[1]
    state["stage"] = sa.STAGE_SHARE_KEYS
    return _reply(
        msg, {**ciphertexts, sa.KEY_SEED_COMMITMENT: sa.seed_commitment(seed)}
    )


def _collect(
    msg: Message, context: Context, config: ConfigRecord, call_next: ClientAppCallable
) -> Message:
    """Keep the shares sent to the site, train, and reply the masked update."""
    state = _state(context, sa.STAGE_SHARE_KEYS, msg)
    me = int(context.node_id)
    encryption_key = sa.private_key_from_bytes(state["encryption-key"])
    received = []
    for node in state["neighbours"]:
        ciphertext = config.get(sa.node_key(sa.KEY_CIPHERTEXT, node))
        public = state.get(sa.node_key(sa.KEY_ENCRYPTION_PUBLIC, node))
        if ciphertext is None or public is None:
            continue  # a neighbour that dropped while sharing keys
        key = sa.agreed_key(encryption_key, sa.load_public_key(public))
        source, target, seed_share, key_share = share_keys_plaintext_separate(
            decrypt(key, _bytes(config, sa.node_key(sa.KEY_CIPHERTEXT, node)))
        )
        if (source, target) != (node, me):
            raise SecAggError(
                f"the shares from node {node} were addressed {source} -> {target}"
            )
        state[sa.node_key(sa.KEY_SEED_SHARE, node)] = seed_share
        state[sa.node_key(sa.KEY_SECRET_SHARE, node)] = key_share
        received.append(node)
    if len(received) + 1 < state["threshold"]:
        raise SecAggError(
            f"shares arrived from {len(received)} neighbours; the threshold is "
            f"{state['threshold']} shareholders"
        )
    weight = float(_number(config, sa.CONFIG_WEIGHT, float))
    if not 0 < weight <= 1:
        raise SecAggError(f"weight {weight} is not in (0, 1]")
    received_arrays = msg.content[protocol.RECORD_ARRAYS]
    del msg.content[sa.RECORD_SECAGG]  # the ClientApp sees a plain train message
    reply = call_next(msg, context)
    if reply.has_error():
        return reply  # the site drops out before sending a masked input
    masked, clipped = _masked_update(state, received, received_arrays, reply, weight)
    state["stage"] = sa.STAGE_COLLECT
    state["masked-with"] = received
    metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
    log(
        INFO,
        "secagg: node %d sends its masked update (weight %.4f, %.2f%% clipped)",
        me,
        weight,
        100 * clipped,
    )
    return Message(
        RecordDict(
            {
                protocol.RECORD_ARRAYS: masked,
                protocol.RECORD_METRICS: MetricRecord(
                    {**dict(metrics), sa.METRIC_CLIPPED: clipped}
                ),
                sa.RECORD_SECAGG: ConfigRecord({sa.CONFIG_STAGE: sa.STAGE_COLLECT}),
            }
        ),
        reply_to=msg,
    )


def _masked_update(
    state: ConfigRecord,
    received: list[int],
    sent: ArrayRecord,
    reply: Message,
    weight: float,
) -> tuple[ArrayRecord, float]:
    """Quantise ``weight * (trained - sent)`` and add the self and pairwise masks."""
    records = list(reply.content.array_records.values())
    if len(records) != 1 or list(records[0].keys()) != list(sent.keys()):
        raise SecAggError("the trained reply's arrays differ from the global model's")
    trained = records[0]
    keys = list(sent.keys())
    updates = []
    for key in keys:
        new, old = trained[key].numpy(), sent[key].numpy()
        if new.shape != old.shape:
            raise SecAggError(f"array '{key}' changed shape {old.shape} -> {new.shape}")
        updates.append(weight * (new.astype(np.float64) - old.astype(np.float64)))
    modulus = state["modulus"]
    totals, clipped = sa.quantize_update(updates, state["clipping"], state["bits"])
    sa.add_mask(totals, state["seed"], 1, modulus)
    mask_key = sa.private_key_from_bytes(state["mask-key"])
    for node in received:
        public = sa.load_public_key(state[sa.node_key(sa.KEY_MASK_PUBLIC, node)])
        sa.add_mask(
            totals,
            sa.pairwise_seed(mask_key, public),
            sa.signed_pairwise(state["node"], node),
            modulus,
        )
    dtype = sa.wire_dtype(modulus)
    masked = {
        key: Array(total.astype(dtype)) for key, total in zip(keys, totals, strict=True)
    }
    return ArrayRecord(masked), clipped


def _unmask(msg: Message, context: Context, config: ConfigRecord) -> Message:
    """Reveal survivors' seed shares and dropped sites' key shares, never both."""
    state = _state(context, sa.STAGE_COLLECT, msg)
    me = int(context.node_id)
    survivors = set(_ints(config, sa.CONFIG_SURVIVORS))
    dropped = set(_ints(config, sa.CONFIG_DROPPED))
    holders = {me, *state["masked-with"]}
    if survivors & dropped:
        raise SecAggError(
            f"nodes {sorted(survivors & dropped)} are listed as survivors and dropped"
        )
    if not (survivors | dropped) <= holders:
        raise SecAggError(
            f"nodes {sorted((survivors | dropped) - holders)} hold no shares here"
        )
    if me not in survivors:
        raise SecAggError("the site sent its masked input but is listed as dropped")
    threshold = state["threshold"]
    if len(survivors) < threshold:
        raise SecAggError(
            f"only {len(survivors)} of this site's shareholders survived, fewer than "
            f"the threshold {threshold}: nothing is revealed"
        )
    values = {
        sa.node_key(sa.KEY_SEED_SHARE, node): state[
            sa.node_key(sa.KEY_SEED_SHARE, node)
        ]
        for node in sorted(survivors)
    }
    values.update(
        {
            sa.node_key(sa.KEY_SECRET_SHARE, node): state[
                sa.node_key(sa.KEY_SECRET_SHARE, node)
            ]
            for node in sorted(dropped)
        }
    )
    del context.state[STATE_KEY]  # the round's secrets are gone
    log(
        INFO,
        "secagg: node %d reveals %d seed and %d key shares",
        me,
        len(survivors),
        len(dropped),
    )
    return _reply(msg, values)

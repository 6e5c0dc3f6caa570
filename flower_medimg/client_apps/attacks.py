"""Simulated misbehaving sites: what a faulty or malicious ClientApp would send.

Pure functions on state dicts of numpy arrays, used to test robust aggregation
(the attacks of Alkhunaizi et al., MICCAI 2022,
https://doi.org/10.1007/978-3-031-16452-1_64, reference code github.com/Naiftt/SPAFD):

- ``"sign-flip"``: the update scaled by -3, ``theta_g - 3 (theta_k - theta_g)``;
- ``"gaussian"``: random weights (standard normal, same shapes and dtypes);
- ``"nan"``: the trained arrays with every float value set to NaN;
- ``"free-rider"``: the received global arrays, unchanged (no training);
- ``"mismatched-keys"``: the trained arrays with one key renamed and one dropped;
- ``"huge"``: every float value set to 1e15 (finite, absurd);
- ``"label-flip"``: a data attack applied to the labels during training (see
  ``flip_labels``); the arrays are then sent unchanged.

Lies about everything but the arrays, applied to the reply by :func:`attack_mod`
(the threat model's probes of a hostile site):

- ``"num-examples-lie"``: ``num-examples = 10**9``;
- ``"loss-lie"``: ``train-loss-before = 1e6``, ``train-loss-after = 1e-12``;
- ``"nova-a-lie"``: ``nova-a = 1e-12`` (FedNova's normaliser);
- ``"list-metric"``: ``train-time-s`` sent as a list;
- ``"garbage-bytes"``: the first array's bytes replaced by garbage of the same
  length behind a valid-looking ``.npy`` magic, its metadata left right;
- ``"eval-lie"``: evaluate replies claim ``num-examples = 10**9`` and a perfect
  score (``dice``/``accuracy`` = 1);
- ``"crash"``: the site's process exits (``os._exit``) in its round-1 train call;
- ``"hang"``: the site's round-1 train call never returns.

The ClientApp chooses the attack from the run config (``attack.kind``,
``attack.sites``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from flower_medimg.core import protocol
from flower_medimg.core.settings import ATTACK_KINDS, Settings

__all__ = [
    "ATTACK_KINDS",
    "ARRAY_ATTACKS",
    "PROCESS_ATTACKS",
    "REPLY_ATTACKS",
    "apply_attack",
    "attack_mod",
    "attacking",
    "check_attack_kind",
    "flip_labels",
]

#: Attacks that replace the arrays a site sends.
ARRAY_ATTACKS = (
    "free-rider",
    "gaussian",
    "huge",
    "mismatched-keys",
    "nan",
    "sign-flip",
)
#: Attacks that rewrite the rest of a reply (see :func:`attack_mod`).
REPLY_ATTACKS = (
    "eval-lie",
    "garbage-bytes",
    "list-metric",
    "loss-lie",
    "nova-a-lie",
    "num-examples-lie",
)
#: Attacks on the site's process in its round-1 train call.
PROCESS_ATTACKS = ("crash", "hang")

HUGE_VALUE = 1e15
LIED_NUM_EXAMPLES = 10**9

SIGN_FLIP_SCALE = -3.0


def check_attack_kind(kind: str) -> str:
    """Return ``kind`` if it is a known attack, else raise ValueError listing them."""
    if kind not in ATTACK_KINDS:
        raise ValueError(
            f"Unknown attack kind {kind!r}; valid kinds: {', '.join(ATTACK_KINDS)}"
        )
    return kind


def apply_attack(
    kind: str,
    global_arrays: Mapping[str, np.ndarray],
    local_arrays: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Return the arrays a misbehaving site sends instead of ``local_arrays``.

    Parameters
    ----------
    kind : str
        One of ``ATTACK_KINDS``. Kinds that are not ``ARRAY_ATTACKS`` return the
        arrays unchanged (``"label-flip"`` acts on the labels with
        ``flip_labels``, the others on the rest of the reply).
    global_arrays : Mapping[str, np.ndarray]
        The global arrays the site received.
    local_arrays : Mapping[str, np.ndarray]
        The arrays after honest local training.
    rng : np.random.Generator
        Source of randomness (``"gaussian"``).

    Returns
    -------
    dict[str, np.ndarray]
        New arrays (the inputs are not modified). Integer arrays (e.g. BatchNorm
        ``num_batches_tracked``) are kept from ``local_arrays`` except for
        ``"free-rider"``.

    Raises
    ------
    ValueError
        For an unknown kind, or keys of ``local_arrays`` missing from
        ``global_arrays`` (sign-flip).
    """
    check_attack_kind(kind)
    if kind not in ARRAY_ATTACKS:
        return {k: np.array(v, copy=True) for k, v in local_arrays.items()}
    if kind == "free-rider":
        return {k: np.array(v, copy=True) for k, v in global_arrays.items()}
    if kind == "mismatched-keys":
        out = {k: np.array(v, copy=True) for k, v in local_arrays.items()}
        keys = list(out)
        if keys:
            out[f"{keys[0]}.renamed"] = out.pop(keys[0])
        if len(keys) > 1:
            del out[keys[-1]]
        return out
    out = {}
    for key, local in local_arrays.items():
        local = np.asarray(local)
        if local.dtype.kind != "f":
            out[key] = np.array(local, copy=True)
        elif kind == "sign-flip":
            if key not in global_arrays:
                raise ValueError(f"key {key!r} missing from the global arrays")
            glob = np.asarray(global_arrays[key], dtype=np.float64)
            flipped = glob + SIGN_FLIP_SCALE * (local.astype(np.float64) - glob)
            out[key] = flipped.astype(local.dtype)
        elif kind == "gaussian":
            out[key] = rng.standard_normal(local.shape).astype(local.dtype)
        elif kind == "huge":
            out[key] = np.full_like(local, HUGE_VALUE)
        else:  # "nan"
            out[key] = np.full_like(local, np.nan)
    return out


def flip_labels(labels: Any, num_classes: int | None = None) -> Any:
    """Return flipped labels (numpy array or torch tensor, same type and dtype).

    Segmentation (``num_classes`` None): binary masks are inverted, ``m -> 1 - m``
    (``~m`` for boolean masks).
    Classification: class ``c`` becomes ``num_classes - 1 - c``.

    Parameters
    ----------
    labels : np.ndarray or torch.Tensor
        Binary masks or integer class labels.
    num_classes : Optional[int] (default: None)
        Number of classes for classification labels; None for binary masks.
    """
    if num_classes is None:
        if str(labels.dtype) in ("bool", "torch.bool"):
            return ~labels
        return 1 - labels
    if num_classes < 2:
        raise ValueError("`num_classes` must be at least 2")
    return (num_classes - 1) - labels


def attacking(settings: Settings, context: Context) -> str | None:
    """Return the attack this simulated site runs, if ``attack.sites`` names it."""
    kind = settings["attack.kind"]
    sites = {int(s) for s in settings["attack.sites"].split(",") if s}
    partition = context.node_config.get(protocol.NODE_PARTITION_ID)
    if kind == "none" or partition is None or int(partition) not in sites:
        return None
    return kind


def _lie(kind: str, reply: Message) -> Message:
    """Rewrite ``reply`` as the ``kind`` of lying site would send it."""
    content = reply.content
    metrics = next(iter(content.metric_records.values()), None)
    if metrics is None:
        return reply
    if kind == "num-examples-lie":
        metrics[protocol.METRIC_NUM_EXAMPLES] = LIED_NUM_EXAMPLES
    elif kind == "loss-lie":
        metrics[protocol.METRIC_TRAIN_LOSS_BEFORE] = 1e6
        metrics[protocol.METRIC_TRAIN_LOSS_AFTER] = 1e-12
    elif kind == "nova-a-lie":
        metrics[protocol.METRIC_NOVA_A] = 1e-12
    elif kind == "list-metric":
        metrics[protocol.METRIC_TRAIN_TIME] = [1.0, 2.0]
    elif kind == "garbage-bytes":
        name, arrays = next(iter(content.array_records.items()))
        key = next(iter(arrays.keys()))
        good = arrays[key]
        garbage = b"\x93NUMPY" + os.urandom(max(len(good.data) - 6, 0))
        forged = ArrayRecord(dict(arrays.items()))
        forged[key] = Array(
            dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=garbage
        )
        content[name] = forged
    return reply


def _lie_about_evaluation(reply: Message) -> Message:
    metrics = next(iter(reply.content.metric_records.values()), None)
    if metrics is not None:
        metrics[protocol.METRIC_NUM_EXAMPLES] = LIED_NUM_EXAMPLES
        for key in ("dice", "accuracy"):
            if key in metrics:
                metrics[key] = 1.0
    return reply


def attack_mod(kind: str) -> Mod:
    """Return the Flower mod of a site that lies in its replies or breaks down.

    ``REPLY_ATTACKS`` rewrite the honest reply; ``"crash"`` ends the process and
    ``"hang"`` never returns in the round-1 train call (round 1 only, so a
    restarted site is honest again).
    """
    if kind not in REPLY_ATTACKS + PROCESS_ATTACKS:
        raise ValueError(f"{kind!r} is not an attack on replies or processes")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        train = msg.metadata.message_type == MessageType.TRAIN
        if kind in PROCESS_ATTACKS and train:
            config = msg.content.config_records.get(protocol.RECORD_CONFIG, {})
            if config.get(protocol.CONFIG_SERVER_ROUND) == 1:
                if kind == "crash":
                    os._exit(17)
                while True:  # "hang"
                    time.sleep(3600)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if kind == "eval-lie":
            evaluate = msg.metadata.message_type == MessageType.EVALUATE
            return _lie_about_evaluation(reply) if evaluate else reply
        return _lie(kind, reply) if train and kind in REPLY_ATTACKS else reply

    return mod

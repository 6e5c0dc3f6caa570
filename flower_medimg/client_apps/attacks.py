"""Simulated misbehaving sites: what a faulty or malicious ClientApp would send.

Pure functions on state dicts of numpy arrays, used to test robust aggregation
(the attacks of Alkhunaizi et al., MICCAI 2022,
https://doi.org/10.1007/978-3-031-16452-1_64, reference code github.com/Naiftt/SPAFD):

- ``"sign-flip"``: the update scaled by -3, ``theta_g - 3 (theta_k - theta_g)``;
- ``"gaussian"``: random weights (standard normal, same shapes and dtypes);
- ``"nan"``: the trained arrays with every float value set to NaN;
- ``"free-rider"``: the received global arrays, unchanged (no training);
- ``"mismatched-keys"``: the trained arrays with one key renamed and one dropped;
- ``"label-flip"``: a data attack applied to the labels during training (see
  ``flip_labels``); the arrays are then sent unchanged.

The ClientApp chooses the attack from the run config (``attack.kind``,
``attack.sites``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flower_medimg.core.settings import ATTACK_KINDS

__all__ = [
    "ATTACK_KINDS",
    "ARRAY_ATTACKS",
    "apply_attack",
    "check_attack_kind",
    "flip_labels",
]

#: Attacks that replace the arrays a site sends (``"label-flip"`` acts on labels).
ARRAY_ATTACKS: tuple[str, ...] = tuple(k for k in ATTACK_KINDS if k != "label-flip")

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
        One of ``ATTACK_KINDS``. ``"label-flip"`` returns the arrays unchanged (the
        attack is applied to the labels with ``flip_labels``).
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
    if kind == "label-flip":
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

"""Parameters that never leave the site: FLOP private heads and FedBN norm layers.

The global model holds only *shared* parameters. The ServerApp builds its initial
arrays without the private keys; each ClientApp merges the shared arrays it receives
with its own stored private values, trains, stores the private values again and
replies with the shared keys only. Every Flower strategy and mod then works unchanged
(the key set is the same in every message).

- ``"head"``: the network's final classification/segmentation layer (FLOP, Yang et
  al., KDD 2021, https://doi.org/10.1145/3447548.3467185), found as the last
  convolution or linear layer of the network.
- ``"norm"``: every normalisation layer, found by module type (BatchNorm,
  InstanceNorm with affine weights or running statistics, GroupNorm, LayerNorm),
  including running statistics. With a BatchNorm network this is FedBN (Li et al.,
  ICLR 2021, https://arxiv.org/abs/2102.07623): each site keeps its own feature
  normalisation, whereas plain FedAvg averages the BN weights *and* running
  statistics of all sites into one set that matches none of their scanners.
- ``"head+norm"``: both.
- a comma-separated list of state_dict key prefixes, e.g. ``"class_layers.,fc."``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["PRIVATE_RULES", "load_shared_state", "private_keys", "split_state"]

PRIVATE_RULES = ("none", "head", "norm", "head+norm")

_HEAD_TYPES = (_ConvNd, nn.Linear)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _InstanceNorm):
        return module.affine or module.track_running_stats
    return isinstance(module, _BatchNorm | nn.GroupNorm | nn.LayerNorm)


def _module_keys(model: nn.Module, names: Iterable[str]) -> set[str]:
    """State-dict keys (parameters and buffers) of the named modules."""
    prefixes = tuple(f"{name}." for name in names)
    return {key for key in model.state_dict() if key.startswith(prefixes)}


def private_keys(model: nn.Module, rule: str) -> list[str]:
    """Return the state_dict keys that ``rule`` keeps private, in state_dict order.

    Parameters
    ----------
    model : nn.Module
        The network (e.g. from :func:`flower_medimg.models.build_model`).
    rule : str
        ``"none"``, ``"head"``, ``"norm"``, ``"head+norm"`` or comma-separated
        state_dict key prefixes.

    Raises
    ------
    ValueError
        If the rule selects nothing (e.g. ``"norm"`` on a network without
        normalisation parameters, such as MONAI's UNet with its default
        ``InstanceNorm(affine=False)``), or a prefix matches no key, or every key
        would be private.
    """
    rule = rule.strip().lower()
    if rule in ("", "none"):
        return []
    selected: set[str] = set()
    if rule in PRIVATE_RULES:
        modules = dict(model.named_modules())
        if "head" in rule:
            heads = [n for n, m in modules.items() if isinstance(m, _HEAD_TYPES)]
            selected |= _module_keys(model, heads[-1:])
        if "norm" in rule:
            selected |= _module_keys(
                model, [n for n, m in modules.items() if _is_norm(m)]
            )
    else:
        keys = list(model.state_dict())
        for prefix in (p.strip() for p in rule.split(",") if p.strip()):
            matched = {k for k in keys if k.startswith(prefix)}
            if not matched:
                raise ValueError(
                    f"private-params prefix {prefix!r} matches no key of "
                    f"{type(model).__name__} (first keys: {', '.join(keys[:5])}, ...)"
                )
            selected |= matched
    if not selected:
        raise ValueError(
            f"private-params={rule!r} selects no parameter of {type(model).__name__}; "
            "for 'norm' build the network with norm='batch', 'group' or 'instance'"
        )
    ordered = [k for k in model.state_dict() if k in selected]
    if len(ordered) == len(model.state_dict()):
        raise ValueError(f"private-params={rule!r} would keep every parameter private")
    return ordered


def split_state(
    state: Mapping[str, torch.Tensor], private: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state_dict into its shared and private parts."""
    private = set(private)
    shared = {k: v for k, v in state.items() if k not in private}
    own = {k: v for k, v in state.items() if k in private}
    return shared, own


def load_shared_state(
    model: nn.Module, shared: Mapping[str, torch.Tensor], rule: str
) -> nn.Module:
    """Load the shared part of a model's weights, strictly, into ``model``.

    A global model trained with private parameters holds every key except the
    private ones (they never left the sites); those keep ``model``'s values.

    Raises
    ------
    ValueError
        If ``shared`` lacks a shared key, holds a private key or a key the network
        does not have (the message lists them).
    """
    private = set(private_keys(model, rule))
    expected = set(model.state_dict()) - private
    missing = sorted(expected - set(shared))
    unexpected = sorted(set(shared) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The weights do not hold the shared parameters of "
            f"{type(model).__name__} (private-params={rule!r}): missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(dict(shared), strict=not private)
    return model

"""FedProx's proximal term, computed at the site.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127. Each site minimises
``L_k(w) + (mu / 2) * sum_p ||w_p - w_p^t||_2^2`` over its trainable *shared*
parameters ``p``, where ``w^t`` is the global model received this round. Private
parameters (a FLOP head, FedBN norm layers) have no global value and buffers are not
trained, so both are left out. ``mu`` comes from the ``proximal-mu`` entry that
Flower's :class:`flwr.serverapp.strategy.FedProx` adds to every train message.

The norm is *squared*, as in the paper and Flower's FedProx baseline; the docstring
of Flower's FedProx strategy (1.42) shows an unsquared norm, which would give a
different gradient (a unit vector scaled by ``mu / 2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from flower_medimg.core import protocol

__all__ = ["proximal_mu", "proximal_penalty", "proximal_term"]


def proximal_term(
    params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """Return ``(mu / 2) * sum ||w - w^t||_2^2`` over matching tensors.

    Parameters
    ----------
    params : Iterable[torch.Tensor]
        The parameters being trained.
    anchors : Iterable[torch.Tensor]
        Their values at the start of the round (the received global model).
    mu : float
        Proximal weight, ``>= 0``.

    Returns
    -------
    torch.Tensor
        The scalar term (float32), differentiable in ``params``.
    """
    pairs = list(zip(params, anchors, strict=True))
    if not pairs:
        return torch.zeros(())
    squared = sum((w.float() - a.float()).pow(2).sum() for w, a in pairs)
    return 0.5 * mu * squared


def proximal_mu(train_config: dict) -> float:
    """Return the ``proximal-mu`` of a train message's config (0 when absent).

    Raises
    ------
    ValueError
        If ``proximal-mu`` is negative or not finite.
    """
    mu = train_config.get(protocol.CONFIG_PROXIMAL_MU, 0.0)
    if (
        isinstance(mu, bool)
        or not isinstance(mu, int | float)
        or not (math.isfinite(mu) and mu >= 0.0)
    ):
        raise ValueError(f"proximal-mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def proximal_penalty(
    model: nn.Module, private: Iterable[str], mu: float
) -> Callable[[], torch.Tensor] | None:
    """Anchor ``model``'s current shared parameters; return the penalty to add.

    Call it after the global weights are loaded and before the first local step.

    Parameters
    ----------
    model : nn.Module
        The site's network holding the received global weights.
    private : Iterable[str]
        State-dict keys that never leave the site (excluded).
    mu : float
        Proximal weight; ``0`` returns None (plain local training).

    Returns
    -------
    callable or None
        ``() -> tensor``: the proximal term at the current weights.
    """
    if mu == 0.0:
        return None
    private = set(private)
    params = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and name not in private
    ]
    anchors = [p.detach().clone() for p in params]
    return lambda: proximal_term(params, anchors, mu)

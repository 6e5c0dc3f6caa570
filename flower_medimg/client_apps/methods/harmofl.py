"""HarmoFL at the site: weight perturbation and fixing the shared amplitude.

Jiang, Wang and Dou, "HarmoFL: Harmonizing Local and Global Drifts in Federated
Learning on Heterogeneous Medical Images", AAAI 2022,
https://arxiv.org/abs/2112.10775 (reference code: github.com/med-air/HarmoFL).

*Local drift* (each scanner's own appearance) is reduced by the amplitude
normalisation layer (:mod:`flower_medimg.core.amp_norm`), which is part of the
network. *Global drift* is reduced by weight perturbation: every step evaluates the
gradient at weights moved a small distance ``alpha`` along the normalised gradient
(a flat-minimum search, as in SAM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from flower_medimg.core.amp_norm import amp_norms

__all__ = ["perturbed_step", "running_statistics_frozen"]


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm and :class:`AmpNorm` running statistics fixed inside the block.

    Weight perturbation runs a second forward pass on the same batch; without this
    the batch would be counted twice in the running statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    amps = [(m, m.fixed) for m in amp_norms(model)]
    for m in norms:
        m.momentum = 0.0
    for m, _ in amps:
        m.fixed = True
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, fixed in amps:
            m.fixed = fixed


def perturbed_step(
    model: nn.Module,
    objective: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    alpha: float,
) -> torch.Tensor:
    """One optimizer step with HarmoFL's weight perturbation (WPOptim).

    ``g = grad L(w)``; ``delta = alpha g / (||g|| + 1e-12)`` with the norm over all
    parameters jointly; ``g~ = grad L(w + delta)`` on the same batch; ``delta`` is
    removed and the base optimizer steps with ``g~``.

    Parameters
    ----------
    model : nn.Module
        The network whose trainable parameters are perturbed.
    objective : callable
        Computes the loss of the current batch (forward pass included).
    optimizer : torch.optim.Optimizer
        The base optimizer over ``model``'s parameters.
    alpha : float
        Perturbation radius (0.05 in the paper).

    Returns
    -------
    torch.Tensor
        The loss at the unperturbed weights (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = objective()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        optimizer.step()
        return loss.detach()
    with torch.no_grad():
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        deltas = [alpha * p.grad / (norm + 1e-12) for p in params]
        for p, delta in zip(params, deltas, strict=True):
            p.add_(delta)
    optimizer.zero_grad(set_to_none=True)
    with running_statistics_frozen(model):
        objective().backward()
    with torch.no_grad():
        for p, delta in zip(params, deltas, strict=True):
            p.sub_(delta)
    optimizer.step()
    return loss.detach()

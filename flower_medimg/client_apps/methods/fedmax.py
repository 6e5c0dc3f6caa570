"""FedMax: a maximum-entropy prior on the penultimate activations.

Chen, Bhardwaj and Marculescu, "FedMAX: Mitigating Activation Divergence for
Accurate and Communication-Efficient Federated Learning", ECML-PKDD 2020,
https://arxiv.org/abs/2004.03657 (reference code: github.com/weichennone/FedMAX).
Each site adds ``beta * KL(U || softmax(a))`` to its loss, where ``a`` (B x D) is
the input of the network's final linear layer and ``U`` the uniform distribution
over the D features; like the reference's ``KLDivLoss`` the KL divergence is
averaged over all B x D elements (hence the large ``beta``).

Classification networks only: for segmentation the paper leaves the features open.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["fedmax_penalty", "fedmax_term"]


def fedmax_term(activations: torch.Tensor, beta: float) -> torch.Tensor:
    """Return ``beta * mean_{b,j} U_j (ln U_j - log_softmax(a_b)_j)``.

    Parameters
    ----------
    activations : torch.Tensor
        Penultimate activations, ``(B, ...)``; flattened to ``(B, D)``.
    beta : float
        Weight of the term, ``>= 0``.
    """
    flat = activations.flatten(1).float()
    uniform = torch.full_like(flat, 1.0 / flat.shape[1])
    kl = nn.functional.kl_div(torch.log_softmax(flat, dim=1), uniform, reduction="mean")
    return beta * kl


def fedmax_penalty(model: nn.Module, beta: float) -> Callable[[], torch.Tensor]:
    """Capture the input of ``model``'s last linear layer; return the FedMax term.

    The returned callable computes :func:`fedmax_term` on the activations of the
    most recent forward pass (the local loop calls it right after the batch's
    forward pass).

    Raises
    ------
    ValueError
        If ``beta`` is negative or not finite, or the network has no linear layer
        (a segmentation network).
    """
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"method.fedmax-beta must be a finite number >= 0, got {beta}")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"FedMax needs a classification network with a final linear layer; "
            f"{type(model).__name__} has none"
        )
    captured: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["a"] = args[0]

    linears[-1].register_forward_pre_hook(capture)
    return lambda: fedmax_term(captured["a"], beta)

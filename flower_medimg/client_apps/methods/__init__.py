"""Client-side methods against data heterogeneity, switched on from the run config.

Each method changes only what happens at the site, so it composes with any server
strategy (Flower's or ours):

- ``harmofl`` (:mod:`.harmofl`): amplitude normalisation of the inputs in the
  Fourier domain, the running amplitude shared through the global model (key
  ``amp_norm.running_amp``) and fixed after the first aggregation, plus weight
  perturbation during local training (run-config ``method.harmofl-*``).
- ``class-weights`` (:mod:`.class_weights`): balanced class-weighted loss from the
  site's own class counts, against label skew.
- ``fedmax`` (:mod:`.fedmax`): a maximum-entropy prior on the penultimate
  activations (classification networks; ``method.fedmax-beta``).
- FedProx (:mod:`.fedprox`) needs no switch: the site adds the proximal term
  whenever the train message carries a ``proximal-mu`` (Flower's ``FedProx``
  strategy sends it).

``method.names`` lists the switched-on methods, comma-separated. MOON (Li et al.,
CVPR 2021) is not offered: it needs a projection head (parameters the global model
would have to carry) and forward passes of the previous local model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flower_medimg.config import DEFAULTS

from .class_weights import balanced_class_weights, class_counts, weighted_loss
from .fedmax import fedmax_penalty, fedmax_term
from .fedprox import proximal_mu, proximal_penalty, proximal_term
from .harmofl import (
    AMP_NORM,
    AmpNorm,
    amp_norms,
    amplitude_normalize,
    attach_amp_norm,
    perturbed_step,
)

__all__ = [
    "AMP_NORM",
    "METHODS",
    "AmpNorm",
    "ClientMethods",
    "amp_norms",
    "amplitude_normalize",
    "attach_amp_norm",
    "balanced_class_weights",
    "class_counts",
    "combine_penalties",
    "fedmax_penalty",
    "fedmax_term",
    "perturbed_step",
    "proximal_mu",
    "proximal_penalty",
    "proximal_term",
    "weighted_loss",
]

#: Names accepted in the run config's ``method.names``.
METHODS = ("harmofl", "class-weights", "fedmax")


def _dp_on(config: Mapping[str, Any]) -> bool:
    return bool(
        float(config.get("dp.noise-multiplier", 0))
        or float(config.get("dp.target-epsilon", 0))
    )


@dataclass(frozen=True)
class ClientMethods:
    """The client-side methods a run switched on, with their settings.

    Parameters
    ----------
    harmofl : bool
        Amplitude normalisation (+ weight perturbation when ``harmofl_alpha > 0``).
    class_weights : bool
        Balanced class-weighted loss.
    fedmax : bool
        FedMax's maximum-entropy term on the penultimate activations.
    harmofl_window : float
        Amplitude window ratio ``L`` (0 = DC only, 0.5 = whole spectrum).
    harmofl_momentum : float
        Momentum of the running amplitude.
    harmofl_alpha : float
        Weight-perturbation radius; 0 switches the perturbation off.
    fedmax_beta : float
        Weight of the FedMax term.
    """

    harmofl: bool = False
    class_weights: bool = False
    harmofl_window: float = 0.0
    harmofl_momentum: float = 0.1
    harmofl_alpha: float = 0.05
    fedmax: bool = False
    fedmax_beta: float = 1000.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClientMethods:
        """Read ``method.*`` from a resolved run config.

        Raises
        ------
        ValueError
            For an unknown method name (the valid ones are listed), a negative
            HarmoFL setting, or a method that cannot run under DP-SGD.
        """
        config = {**DEFAULTS, **config}  # a run saved before these keys existed
        names = [n.strip().lower() for n in str(config["method.names"]).split(",")]
        names = [n for n in names if n and n != "none"]
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise ValueError(
                f"Unknown client method {unknown[0]!r} in method.names; valid "
                f"methods: {', '.join(METHODS)} (FedProx is on whenever the strategy "
                "sends proximal-mu)"
            )
        methods = cls(
            harmofl="harmofl" in names,
            class_weights="class-weights" in names,
            harmofl_window=float(config["method.harmofl-window"]),
            harmofl_momentum=float(config["method.harmofl-momentum"]),
            harmofl_alpha=float(config["method.harmofl-alpha"]),
            fedmax="fedmax" in names,
            fedmax_beta=float(config["method.fedmax-beta"]),
        )
        if methods.harmofl_alpha < 0:
            raise ValueError(
                f"method.harmofl-alpha must be >= 0, got {methods.harmofl_alpha}"
            )
        if names and _dp_on(config):
            raise ValueError(
                f"Client methods {', '.join(names)} cannot run with DP-SGD: their "
                "extra passes and data statistics are outside Opacus's accounting"
            )
        return methods

    @property
    def perturbation(self) -> float:
        """Weight-perturbation radius used by the local loop (0 = plain steps)."""
        return self.harmofl_alpha if self.harmofl else 0.0

    def adapt_model(self, model: nn.Module, config: Mapping[str, Any]) -> nn.Module:
        """Add what the methods need to the network (HarmoFL's :class:`AmpNorm`)."""
        if not self.harmofl:
            return model
        size = int(config["data.image-size"])
        spatial = (size,) * int(config["model.spatial-dims"])
        amp_norm = AmpNorm(1, spatial, self.harmofl_window, self.harmofl_momentum)
        return attach_amp_norm(model, amp_norm)


def combine_penalties(
    *penalties: Callable[[], torch.Tensor] | None,
) -> Callable[[], torch.Tensor] | None:
    """Sum the loss terms that are switched on (None when none is)."""
    active = [p for p in penalties if p is not None]
    if not active:
        return None
    return lambda: sum(p() for p in active)

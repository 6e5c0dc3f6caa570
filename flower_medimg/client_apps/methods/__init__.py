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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flower_medimg.core.settings import Settings

from .class_weights import balanced_class_weights, class_counts, weighted_loss
from .fedmax import fedmax_penalty, fedmax_term
from .fedprox import proximal_mu, proximal_penalty, proximal_term
from .harmofl import perturbed_step

__all__ = [
    "ClientMethods",
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
    def from_settings(cls, settings: Settings) -> ClientMethods:
        """Read ``method.*`` from the run's settings.

        Raises
        ------
        ValueError
            For a method that cannot run under DP-SGD.
        """
        names = settings.client_methods
        if names and settings.dp_sgd:
            raise ValueError(
                f"Client methods {', '.join(names)} cannot run with DP-SGD: their "
                "extra passes and data statistics are outside Opacus's accounting"
            )
        return cls(
            harmofl="harmofl" in names,
            class_weights="class-weights" in names,
            harmofl_window=settings["method.harmofl-window"],
            harmofl_momentum=settings["method.harmofl-momentum"],
            harmofl_alpha=settings["method.harmofl-alpha"],
            fedmax="fedmax" in names,
            fedmax_beta=settings["method.fedmax-beta"],
        )

    @property
    def perturbation(self) -> float:
        """Weight-perturbation radius used by the local loop (0 = plain steps)."""
        return self.harmofl_alpha if self.harmofl else 0.0


def combine_penalties(
    *penalties: Callable[[], torch.Tensor] | None,
) -> Callable[[], torch.Tensor] | None:
    """Sum the loss terms that are switched on (None when none is)."""
    active = [p for p in penalties if p is not None]
    if not active:
        return None
    return lambda: sum(p() for p in active)

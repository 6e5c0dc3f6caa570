"""Privacy accounting for user-level (client-level) DP-FedAvg releases.

Paper: McMahan et al., "Learning Differentially Private Recurrent Language Models",
https://arxiv.org/abs/1710.06963; Rényi DP accounting, Mironov,
https://arxiv.org/abs/1702.07476 (Opacus's ``RDPAccountant``).

Each round releases one Gaussian mechanism on the mean of the clipped updates, with
noise multiplier ``z = std / (C / m)``. Clients are treated as always sampled
(sample rate 1, no amplification by sampling), which is what Flower's central-DP
wrappers guarantee when ``num_sampled_clients`` is the whole cohort.
"""

from __future__ import annotations

import math

from flower_medimg.core.quiet_imports import root_logger_kept

__all__ = ["UserLevelAccountant", "user_level_epsilon"]


def user_level_epsilon(
    noise_multiplier: float, num_releases: int, delta: float
) -> float:
    """Return ε of ``num_releases`` Gaussian releases at sample rate 1 (RDP).

    Parameters
    ----------
    noise_multiplier : float
        Noise std divided by the sensitivity (``z``); 0 means no noise (ε = inf).
    num_releases : int
        Number of noisy aggregates released.
    delta : float
        Target δ.

    Returns
    -------
    float
        ε from Opacus's RDP accountant; 0 before any release, inf without noise.
    """
    if num_releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    with root_logger_kept():
        from opacus.accountants import RDPAccountant  # Opacus only when DP is on

    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(num_releases))]
    return float(accountant.get_epsilon(delta=delta))


class UserLevelAccountant:
    """Count noisy releases and report the cumulative user-level (ε, δ).

    Parameters
    ----------
    noise_multiplier : float
        Noise multiplier ``z`` of every release.
    delta : float
        Target δ, in (0, 1).
    """

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
            )
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.num_releases = 0

    def step(self) -> None:
        """Record one noisy release."""
        self.num_releases += 1

    @property
    def epsilon(self) -> float:
        """Cumulative ε at :attr:`delta` after :attr:`num_releases` releases."""
        return user_level_epsilon(self.noise_multiplier, self.num_releases, self.delta)

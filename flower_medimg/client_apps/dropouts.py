"""Simulated site failures: a fixed fraction of the sites fails every round.

With ``sim.dropout = f`` (simulation only: the sites are Flower's partitions) the
``round(f * num-partitions)`` sites of a seeded random draw per round raise
:class:`SimulatedDropoutError` instead of training, so Flower records an error reply for
them, as for a hospital whose node crashed mid-round. The draw depends only on the
run's seed and the round, so every site agrees on who fails without talking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context

__all__ = ["SimulatedDropoutError", "dropped_out", "failing_sites"]


class SimulatedDropoutError(RuntimeError):
    """A site that the ``sim.dropout`` setting makes fail this round."""


def failing_sites(
    fraction: float, num_sites: int, seed: int, server_round: int
) -> set[int]:
    """Return the partition ids that fail in ``server_round``.

    Parameters
    ----------
    fraction : float
        Share of the sites that fail, in ``[0, 1)``.
    num_sites : int
        Number of partitions.
    seed : int
        The run's seed.
    server_round : int
        The round.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"sim.dropout must be in [0, 1), got {fraction}")
    count = round(fraction * num_sites)
    order = np.random.default_rng([int(seed), int(server_round)]).permutation(num_sites)
    return {int(k) for k in order[:count]}


def dropped_out(config: Mapping[str, Any], context: Context, server_round: int) -> bool:
    """Whether this simulated site fails ``server_round`` (``sim.dropout``)."""
    fraction = float(config["sim.dropout"])
    node = context.node_config
    if fraction == 0.0 or "partition-id" not in node or "num-partitions" not in node:
        return False
    failing = failing_sites(
        fraction, int(node["num-partitions"]), int(config["seed"]), server_round
    )
    return int(node["partition-id"]) in failing

"""Simulated site failures: a fixed fraction of the sites fails every round.

With ``sim.dropout = f`` (simulation only: the sites are Flower's partitions) the
``round(f * num-partitions)`` sites of a seeded random draw per round raise
:class:`SimulatedDropoutError` instead of training, so Flower records an error reply for
them, as for a hospital whose node crashed mid-round. The draw depends only on the
run's seed and the round, so every site agrees on who fails without talking.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context

from flower_medimg.core import protocol
from flower_medimg.core.settings import Settings

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


def dropped_out(settings: Settings, context: Context, server_round: int) -> bool:
    """Whether this simulated site fails ``server_round`` (``sim.dropout``)."""
    fraction = settings["sim.dropout"]
    node = context.node_config
    partition = node.get(protocol.NODE_PARTITION_ID)
    num_partitions = node.get(protocol.NODE_NUM_PARTITIONS)
    if fraction == 0.0 or partition is None or num_partitions is None:
        return False
    failing = failing_sites(
        fraction, int(num_partitions), settings["seed"], server_round
    )
    return int(partition) in failing

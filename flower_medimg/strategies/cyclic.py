"""Cyclic institutional incremental learning (IIL / CIIL) [Sheller et al., 2020].

Paper: doi.org/10.1038/s41598-020-69250-1 (Scientific Reports 2020)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from .fast_fedavg import FastFedAvg


# pylint: disable=too-many-instance-attributes
class CyclicIncremental(FastFedAvg):
    """Cyclic institutional incremental learning (CIIL) strategy.

    Implementation based on https://doi.org/10.1038/s41598-020-69250-1

    The model travels from institution to institution: each round exactly one node
    trains the current global model, and its reply becomes the new global model
    (no averaging). Nodes are visited in ascending node-id order (nodes that
    connect later are appended; ``shuffle=True`` reshuffles the order at the start of
    every cycle, as FLamby's ``Cyclic(deterministic_cycle=False)``): with ``K``
    nodes, rounds 1..2K train nodes 1, 2, ..., K, 1, 2, ..., K. A node whose reply
    fails or is rejected leaves the model unchanged and the next round moves on to
    the next node (the cycle never stalls); disconnected nodes are skipped. One
    cycle through all nodes with
    ``num_rounds = K`` is IIL. Evaluation is federated over ``fraction_evaluate`` of
    the nodes, as in FedAvg, so that the best model across institutions can be
    tracked.

    Parameters
    ----------
    shuffle : bool (default: False)
        Reshuffle the visiting order at the start of every cycle.
    seed : Optional[int] (default: None)
        Seed of the reshuffling.
    *args, **kwargs
        The arguments of :class:`FastFedAvg` (Flower's ``FedAvg`` arguments, also
        positionally, and the reply checks).
    """

    def __init__(
        self,
        *args: Any,
        shuffle: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shuffle = shuffle
        self.order: list[int] = []
        self.position = 0
        self._rng = random.Random(seed)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> CyclicIncremental settings:")
        log(INFO, "\t│\t└── Reshuffle order every cycle: %s", self.shuffle)
        super().summary()

    def _next_node(self, connected: list[int]) -> int:
        """Return the next connected node in the visiting order."""
        for node_id in connected:
            if node_id not in self.order:
                self.order.append(node_id)
        available = set(connected)
        for _ in range(len(self.order)):
            index = self.position % len(self.order)
            if index == 0 and self.shuffle and self.position > 0:
                self._rng.shuffle(self.order)
            self.position += 1
            if self.order[index] in available:
                return self.order[index]
        raise RuntimeError("no connected node to train")  # unreachable

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round: one node trains the current model."""
        self.current_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        _, connected = sample_nodes(grid, self.min_available_nodes, 1)
        node_id = self._next_node(sorted(connected))
        log(
            INFO,
            "configure_train: Sampled node %d (position %d of %d in the cycle)",
            node_id,
            (self.position - 1) % len(self.order) + 1,
            len(self.order),
        )
        config["server-round"] = server_round
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        return self._construct_messages(record, [node_id], MessageType.TRAIN)

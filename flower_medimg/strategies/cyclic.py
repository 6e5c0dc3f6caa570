"""Cyclic institutional incremental learning (IIL / CIIL) [Sheller et al., 2020].

Paper: doi.org/10.1038/s41598-020-69250-1 (Scientific Reports 2020)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
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
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes`
        is larger than `fraction_train * total_connected_nodes`, `min_train_nodes`
        will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation. In case `min_evaluate_nodes`
        is larger than `fraction_evaluate * total_connected_nodes`,
        `min_evaluate_nodes` will still be sampled.
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    weighted_by_key : str (default: "num-examples")
        The key within each MetricRecord whose value is used as the weight when
        computing weighted averages for both ArrayRecords and MetricRecords.
    arrayrecord_key : str (default: "arrays")
        Key used to store the ArrayRecord when constructing Messages.
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from training round replies.
        If `None`, defaults to `aggregate_metricrecords`, which performs a weighted
        average using the provided weight factor key.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from training round replies.
        If `None`, defaults to `aggregate_metricrecords`, which performs a weighted
        average using the provided weight factor key.
    shuffle : bool (default: False)
        Reshuffle the visiting order at the start of every cycle.
    seed : Optional[int] (default: None)
        Seed of the reshuffling.
    check_finite : bool (default: True)
        Drop replies with non-finite array values. Linear aggregators check the
        aggregate and only search for the culprits when it is not finite.
    max_update_norm : Optional[float] (default: None)
        Drop replies whose update norm ``||theta_k - theta||`` exceeds this bound.
    update_norm_factor : Optional[float] (default: None)
        Drop replies whose update norm exceeds this factor times the round's median
        update norm (applied with at least three replies).
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        evaluate_metrics_aggr_fn: (
            Callable[[list[RecordDict], str], MetricRecord] | None
        ) = None,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        check_finite: bool = True,
        max_update_norm: float | None = None,
        update_norm_factor: float | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            check_finite=check_finite,
            max_update_norm=max_update_norm,
            update_norm_factor=update_norm_factor,
        )
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

"""Every strategy, 2 rounds each, inside Flower's Ray simulation runtime.

One ``run_simulation`` call (about 7 s of runtime start/stop) whose ServerApp runs
``strategy.start(...)`` for each strategy in turn, against a numpy-only ClientApp:
site ``p`` (partition id) adds ``0.1 (p + 1)`` to every float array, increments the
integer array, and reports ``10 (p + 1)`` examples.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg, Krum
from flwr.simulation import run_simulation

from flower_medimg.strategies import (
    CyclicIncremental,
    DistanceOutlierSuppression,
    FastFedAvg,
    FastFedMedian,
    FastFedTrimmedAvg,
    FedCostWAvg,
    FedFocus,
    FedNova,
    QualityGate,
)

NUM_SITES = 3
NAN_SITE = 2  # sends NaN arrays when the train config asks for it
#: Every strategy samples all sites: Flower sizes round 1's sample from the nodes
#: connected before it waits for ``min_available_nodes``, so on a slow machine it
#: would otherwise train on ``min_train_nodes`` sites only
ALL = {"min_available_nodes": NUM_SITES, "min_train_nodes": NUM_SITES}
STRATEGIES = {
    "FastFedAvg": lambda: FastFedAvg(**ALL),
    "FedCostWAvg": lambda: FedCostWAvg(**ALL),
    "FedFocus": lambda: FedFocus(**ALL),
    "DistanceOutlierSuppression": lambda: DistanceOutlierSuppression(**ALL),
    "FedNova": lambda: FedNova(**ALL),
    "CyclicIncremental": lambda: CyclicIncremental(**ALL),
    "FastFedMedian": lambda: FastFedMedian(**ALL),
    "FastFedTrimmedAvg": lambda: FastFedTrimmedAvg(**ALL),
    "QualityGate(FedAvg)": lambda: QualityGate(FedAvg(**ALL)),
    "QualityGate(Krum)": lambda: QualityGate(Krum(**ALL)),
}
GATED = {"QualityGate(FedAvg)", "QualityGate(Krum)", "FastFedAvg"}

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context) -> Message:
    site = int(context.node_config["partition-id"])
    poison = site == msg.content["config"].get("nan-site", -1)
    arrays = {}
    for key, array in msg.content["arrays"].items():
        x = array.numpy()
        if x.dtype.kind == "f":
            x = (
                np.full_like(x, np.nan)
                if poison
                else x + x.dtype.type(0.1 * (site + 1))
            )
        else:
            x = x + 1
        arrays[key] = Array(np.asarray(x))
    metrics = MetricRecord(
        {
            "num-examples": 10 * (site + 1),
            "train-loss-before": 1.0,
            "train-loss-after": 1.0 / (site + 2),
            "nova-a": float(site + 1),
            "local-steps": site + 1,
        }
    )
    return Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg
    )


@client_app.evaluate()
def evaluate(msg: Message, context) -> Message:
    metrics = MetricRecord({"num-examples": 5, "eval-loss": 0.1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def initial_arrays():
    return ArrayRecord(
        {
            "conv.weight": Array(np.zeros((4, 2, 3, 3), np.float32)),
            "conv.bias": Array(np.zeros(4, np.float32)),
            "bn.num_batches_tracked": Array(np.array(0, np.int64)),
        }
    )


@pytest.fixture(scope="module")
def results():
    out = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        for name, factory in STRATEGIES.items():
            config = ConfigRecord({"nan-site": NAN_SITE if name in GATED else -1})
            strategy = factory()
            try:
                out[name] = strategy.start(
                    grid=grid,
                    initial_arrays=initial_arrays(),
                    num_rounds=2,
                    train_config=config,
                )
            except Exception as err:  # noqa: BLE001 (reported by the test)
                out[name] = err

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_runs_two_rounds_in_the_simulation_runtime(results, name):
    result = results[name]
    assert not isinstance(result, Exception), repr(result)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    weight = result.arrays["conv.weight"].numpy()
    assert weight.shape == (4, 2, 3, 3) and np.all(np.isfinite(weight))
    assert np.all(weight > 0)  # every site moved the model up
    if not name.startswith("QualityGate"):
        assert weight.dtype == np.float32
        counter = result.arrays["bn.num_batches_tracked"].numpy()
        assert counter.dtype == np.int64 and counter == 2
    if name in GATED:
        metrics = result.train_metrics_clientapp[2]
        assert metrics["gate-accepted"] == NUM_SITES - 1
        assert metrics["gate-rejected"] == 1


@pytest.mark.slow
def test_weighted_results_are_exact(results):
    # healthy sites 0 and 1 (10 and 20 examples) move by 0.1 and 0.2 per round
    for name in ("FastFedAvg", "QualityGate(FedAvg)"):
        weight = results[name].arrays["conv.weight"].numpy()
        np.testing.assert_allclose(weight, 2 * (10 * 0.1 + 20 * 0.2) / 30, atol=1e-6)
    # CIIL: two different sites trained in turn (node ids, hence order, are random)
    weight = results["CyclicIncremental"].arrays["conv.weight"].numpy()
    assert np.ptp(weight) == 0
    assert min(abs(weight.flat[0] - s) for s in (0.3, 0.4, 0.5)) < 1e-6

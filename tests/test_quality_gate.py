"""QualityGate in front of Flower's own strategies and ours."""

import logging

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, Krum, Strategy
from flwr.supercore.task_identity import TaskIdentity
from reply_messages import train_reply

from flower_medimg.strategies import DistanceOutlierSuppression, QualityGate

ATOL = 1e-6


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def flwr_log(caplog):
    """Capture Flower's logger whether or not it propagates to the root logger."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


def reply(node_id, arrays, num_examples=10):
    return train_reply(node_id, arrays, {"num-examples": num_examples, "loss": 0.5})


def model(seed):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
    }


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


def _configure(gate):
    arrays = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in model(0).items()})
    return list(gate.configure_train(1, arrays, ConfigRecord(), FakeGrid()))


def test_gate_drops_malformed_and_nan_replies_from_fedavg(flwr_log):
    healthy = [reply(i, model(i), num_examples=10 * i) for i in (1, 2, 3)]
    renamed = model(7)
    renamed["conv.renamed"] = renamed.pop("conv.bias")
    poisoned = model(8)
    poisoned["conv.weight"][0, 0, 0, 0] = np.nan
    gate = QualityGate(FedAvg())
    _configure(gate)
    replies = [healthy[0], reply(41, renamed), healthy[1], reply(42, poisoned)]
    replies.append(healthy[2])
    arrays, metrics = gate.aggregate_train(1, replies)

    expected, _ = FedAvg().aggregate_train(1, healthy)
    for key in expected:
        got = arrays[key].numpy()
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected[key].numpy(), atol=ATOL)
    assert metrics["gate-accepted"] == 3 and metrics["gate-rejected"] == 2
    assert metrics["loss"] == pytest.approx(0.5)
    text = flwr_log.text
    assert "node 41: array keys differ" in text and "conv.renamed" in text
    assert "node 42: arrays contain non-finite values" in text


def test_without_gate_flower_fedavg_raises_or_goes_nan():
    renamed = model(7)
    renamed["conv.renamed"] = renamed.pop("conv.bias")
    with pytest.raises(Exception):  # noqa: B017 (Flower's InconsistentMessageReplies)
        FedAvg().aggregate_train(1, [reply(1, model(1)), reply(2, renamed)])


def test_gate_works_without_configure_train_using_majority_layout(flwr_log):
    short = model(9)
    short["conv.bias"] = short["conv.bias"][:3]
    gate = QualityGate(FedMedian())
    arrays, metrics = gate.aggregate_train(
        1, [reply(1, model(1)), reply(2, model(2)), reply(3, short)]
    )
    assert arrays is not None and metrics["gate-rejected"] == 1
    assert "node 3: array 'conv.bias' has shape (3,)" in flwr_log.text


def test_gate_in_front_of_krum_and_dos():
    replies = [reply(i, model(i)) for i in range(1, 6)]
    for inner in (Krum(num_malicious_nodes=1), DistanceOutlierSuppression()):
        gate = QualityGate(inner)
        _configure(gate)
        arrays, metrics = gate.aggregate_train(1, replies)
        assert arrays is not None and metrics["gate-accepted"] == 5


class Exploding(FedAvg):
    def aggregate_train(self, server_round, replies):
        raise RuntimeError("inner strategy failed")


def test_inner_exception_keeps_previous_model(flwr_log):
    gate = QualityGate(Exploding())
    assert gate.aggregate_train(1, [reply(1, model(1))]) == (None, None)
    assert "inner strategy failed" in flwr_log.text


def test_all_rejected_keeps_previous_model():
    gate = QualityGate(FedAvg())
    _configure(gate)
    bad = model(1)
    bad["conv.bias"][:] = np.inf
    assert gate.aggregate_train(1, [reply(1, bad), reply(2, model(2), 0)]) == (
        None,
        None,
    )


def test_required_metrics_and_norm_factor():
    gate = QualityGate(FedAvg(), required_metrics=("train-loss-after",))
    _configure(gate)
    assert gate.aggregate_train(1, [reply(1, model(1))]) == (None, None)
    big = {k: 1000 * v for k, v in model(5).items()}
    gate = QualityGate(FedAvg(), update_norm_factor=10.0)
    _configure(gate)
    replies = [reply(i, model(i)) for i in range(1, 5)] + [reply(5, big)]
    _, metrics = gate.aggregate_train(1, replies)
    assert metrics["gate-rejected"] == 1


def test_gate_delegates_everything_else():
    inner = FedAvg(fraction_evaluate=0.4)
    gate = QualityGate(inner)
    assert isinstance(gate, Strategy) and gate.fraction_evaluate == 0.4
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    evaluate = list(gate.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid()))
    assert len(evaluate) == 2
    with pytest.raises(TypeError):
        QualityGate(object())


def test_gate_keeps_integer_buffers_integer_across_rounds():
    # Flower's FedAvg returns int64 BatchNorm counters as float64; the gate casts
    # them back so the next round's int64 replies still match the global model
    gate = QualityGate(FedAvg())
    arrays = ArrayRecord(
        {"w": Array(np.zeros(3, np.float32)), "n": Array(np.array(4, np.int64))}
    )
    for server_round in (1, 2):
        gate.current_arrays = arrays
        replies = [
            reply(node, {"w": np.full(3, node, np.float32), "n": np.array(5, np.int64)})
            for node in (1, 2)
        ]
        arrays, metrics = gate.aggregate_train(server_round, replies)
        assert metrics["gate-accepted"] == 2
        assert metrics["gate-rejected"] == 0
        assert arrays["n"].dtype == "int64"
        assert tuple(arrays["n"].shape) == ()
        assert arrays["n"].numpy() == 5
        np.testing.assert_allclose(arrays["w"].numpy(), 1.5)

"""Strategies of flower_medimg.strategies on hand-built reply Messages."""

import logging
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore.task_identity import TaskIdentity
from reply_messages import reply_metadata, train_reply

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
from flower_medimg.strategies.fast_fedavg import MissingMetricError
from flower_medimg.strategies.registry import build_strategy, strategy_parameters

ATOL = 1e-6
METRICS = {
    "num-examples": 10,
    "train-loss-before": 1.0,
    "train-loss-after": 0.5,
    "nova-a": 2.0,
    "local-steps": 2,
}
ALL = [
    FastFedAvg,
    FedCostWAvg,
    FedFocus,
    DistanceOutlierSuppression,
    FedNova,
    CyclicIncremental,
    FastFedMedian,
    FastFedTrimmedAvg,
]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """configure_* builds Messages, which need the identity of the running task."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def reply(node_id, arrays, **metrics):
    """A train reply from ``node_id`` as a ClientApp would send it."""
    return train_reply(node_id, arrays, {**METRICS, **metrics})


def error_reply(node_id):
    return Message(Error(code=1, reason="boom"), metadata=reply_metadata(node_id))


def theta(*values):
    return {"w": np.asarray(values, dtype=np.float64)}


def numpy_of(record):
    return {k: record[k].numpy() for k in record}


class FakeGrid:
    """The part of a Grid that configure_* uses."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def _with_global(strategy, arrays):
    """Let the strategy see ``arrays`` as the global model of the round."""
    messages = strategy.configure_train(
        1, ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        ConfigRecord(), FakeGrid([1, 2, 3, 4]),
    )  # fmt: skip
    return list(messages)


# --- worked examples (spec) -------------------------------------------------------


def test_fedcostwavg_worked_example():
    replies = [
        reply(1, theta(1, 0), **{"num-examples": 10, "train-loss-before": 1.0,
                                  "train-loss-after": 0.5}),
        reply(2, theta(0, 1), **{"num-examples": 30, "train-loss-before": 0.8,
                                  "train-loss-after": 0.4}),
        reply(3, theta(1, 1), **{"num-examples": 60, "train-loss-before": 0.5,
                                  "train-loss-after": 0.4}),
    ]  # fmt: skip
    strategy = FedCostWAvg(alpha=0.5)
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.659524, 0.759524], atol=ATOL)
    np.testing.assert_allclose(
        list(strategy.last_weights.values()), [0.240476, 0.340476, 0.419048], atol=ATOL
    )
    assert metrics["gate-accepted"] == 3 and metrics["gate-rejected"] == 0
    # alpha = 1 is FedAvg
    arrays, _ = FedCostWAvg(alpha=1.0).aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.7, 0.9], atol=ATOL)


def test_fedcostwavg_across_rounds_uses_previous_loss():
    strategy = FedCostWAvg(alpha=0.0, mode="across-rounds")
    first = [
        reply(1, theta(1.0), **{"train-loss-after": 1.0}),
        reply(2, theta(0.0), **{"train-loss-after": 1.0}),
    ]
    arrays, _ = strategy.aggregate_train(1, first)  # first participation: k = 1
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5])
    second = [
        reply(1, theta(1.0), **{"train-loss-after": 0.25}),  # k = 4
        reply(2, theta(0.0), **{"train-loss-after": 1.0}),  # k = 1
    ]
    arrays, _ = strategy.aggregate_train(2, second)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.8])


@pytest.mark.parametrize(
    ("server_round", "expected"), [(1, [0.766667, 0.5]), (5, [0.727307, 0.5])]
)
def test_fedfocus_worked_example(server_round, expected):
    replies = [
        reply(1, theta(1, 0), **{"num-examples": 50, "train-loss-after": 0.9}),
        reply(2, theta(0, 1), **{"num-examples": 30, "train-loss-after": 0.3}),
        reply(3, theta(1, 1), **{"num-examples": 20, "train-loss-after": 0.6}),
    ]
    arrays, _ = FedFocus().aggregate_train(server_round, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=ATOL)


def test_fedmix_preset():
    replies = [
        reply(1, theta(1.0), **{"num-examples": 100, "train-loss-after": 0.5}),
        reply(2, theta(0.0), **{"num-examples": 100, "train-loss-after": 0.2}),
        reply(3, theta(0.0), **{"num-examples": 200, "train-loss-after": 0.1}),
    ]
    arrays, _ = FedFocus.fedmix().aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.699928], atol=ATOL)


U = [[1.0, 0.0, 0.5], [0.9, 0.1, 0.4], [1.1, -0.1, 0.6], [-3.0, 2.0, -2.0]]


def test_dos_worked_example_on_updates():
    base = np.array([0.5, -1.0, 2.0])
    strategy = DistanceOutlierSuppression()
    _with_global(strategy, {"w": base})
    replies = [reply(i + 1, {"w": base + np.asarray(u)}) for i, u in enumerate(U)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(
        list(strategy.last_weights.values()),
        [0.579062, 0.210134, 0.210134, 0.000670],
        atol=ATOL,
    )
    np.testing.assert_allclose(
        arrays["w"].numpy() - base, [0.997319, 0.001340, 0.498324], atol=ATOL
    )


def test_dos_fewer_than_three_clients_gets_equal_weights(caplog):
    strategy = DistanceOutlierSuppression()
    _with_global(strategy, {"w": np.zeros(3)})
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, {"w": U[0]}), reply(2, {"w": U[3]})]
    )
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean([U[0], U[3]], axis=0))
    assert "fewer than 3" in caplog.text


def test_dos_identical_updates_fall_back_to_equal_weights():
    strategy = DistanceOutlierSuppression()
    _with_global(strategy, {"w": np.zeros(3)})
    replies = [reply(i, {"w": U[0]}) for i in range(1, 5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), U[0])
    assert set(strategy.last_weights.values()) == {0.25}


def test_fednova_worked_example_is_a_sum():
    strategy = FedNova()
    base = np.array([3.0, 5.0])
    _with_global(strategy, {"w": base})
    # d_k = theta - theta_k: d_1 = [1, 0] (tau 1), d_2 = [0, 4] (tau 4)
    replies = [
        reply(1, {"w": base - [1.0, 0.0]}, **{"nova-a": 1.0, "local-steps": 1}),
        reply(2, {"w": base - [0.0, 4.0]}, **{"nova-a": 4.0, "local-steps": 4}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), base - [1.25, 1.25], atol=ATOL)
    assert strategy.last_tau_eff == pytest.approx(2.5)


def test_fednova_drops_client_without_steps_and_sends_mu():
    strategy = FedNova(proximal_mu=0.1)
    messages = _with_global(strategy, {"w": np.zeros(2)})
    assert messages[0].content["config"]["proximal-mu"] == pytest.approx(0.1)
    replies = [
        reply(1, {"w": [1.0, 1.0]}, **{"nova-a": 2.0, "local-steps": 2}),
        reply(2, {"w": [9.0, 9.0]}, **{"nova-a": 0.0, "local-steps": 0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0])
    assert metrics["gate-rejected"] == 1


def test_cyclic_worked_example_visits_nodes_in_turn():
    strategy = CyclicIncremental()
    grid = FakeGrid([3, 1, 2])
    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    visited = []
    for server_round in range(1, 7):
        (msg,) = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        node = msg.metadata.dst_node_id
        visited.append(node)
        sent = reply(node, {"w": np.array([node, server_round], dtype=np.float64)})
        new, _ = strategy.aggregate_train(server_round, [sent])
        np.testing.assert_array_equal(new["w"].numpy(), [node, server_round])
        assert new["w"].data == sent.content["arrays"]["w"].data
        arrays = new
    assert visited == [1, 2, 3, 1, 2, 3]


def test_cyclic_failed_node_keeps_model_and_moves_on():
    strategy = CyclicIncremental()
    grid = FakeGrid([1, 2, 3])
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    assert strategy.aggregate_train(1, [error_reply(msg.metadata.dst_node_id)]) == (
        None,
        None,
    )
    (msg,) = strategy.configure_train(2, arrays, ConfigRecord(), grid)
    assert msg.metadata.dst_node_id == 2
    grid.node_ids = [1, 2]  # node 3 disconnected: skipped
    (msg,) = strategy.configure_train(3, arrays, ConfigRecord(), grid)
    assert msg.metadata.dst_node_id == 1


def test_cyclic_shuffle_visits_every_node_once_per_cycle():
    strategy = CyclicIncremental(shuffle=True, seed=0)
    grid = FakeGrid(range(1, 6))
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    nodes = [
        next(
            iter(strategy.configure_train(r, arrays, ConfigRecord(), grid))
        ).metadata.dst_node_id
        for r in range(1, 16)
    ]
    for cycle in range(3):
        assert sorted(nodes[5 * cycle : 5 * cycle + 5]) == [1, 2, 3, 4, 5]


# --- common edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_one_client_result_equals_its_arrays(cls):
    strategy = cls()
    arrays = {"w": np.array([[0.25, -1.5]], np.float32), "n": np.array(7, np.int64)}
    _with_global(strategy, {"w": np.zeros((1, 2), np.float32), "n": np.array(0)})
    result, _ = strategy.aggregate_train(1, [reply(4, arrays)])
    for key, value in arrays.items():
        got = result[key].numpy()
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got, value)


@pytest.mark.parametrize("cls", ALL)
def test_all_equal_replies_give_the_same_arrays(cls):
    strategy = cls()
    arrays = {"w": np.array([0.5, 2.0, -3.0], np.float32)}
    _with_global(strategy, {"w": np.zeros(3, np.float32)})
    replies = [reply(i, arrays) for i in range(1, 5)]
    result, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(result["w"].numpy(), arrays["w"], atol=ATOL)


@pytest.mark.parametrize("cls", ALL)
def test_bad_replies_are_dropped_not_raised(cls, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    strategy = cls()
    _with_global(strategy, {"w": np.zeros(2)})
    good = reply(1, {"w": [1.0, 2.0]})
    bad = [
        error_reply(2),
        reply(3, {"w": [1.0, 2.0]}, **{"num-examples": 0}),
        reply(4, {"w": [np.nan, 2.0]}),
        reply(5, {"v": [1.0, 2.0]}),
        reply(6, {"w": [1.0, 2.0, 3.0]}),
        reply(7, {"w": [1.0, 2.0]}, **{"train-loss-after": float("inf")}),
    ]
    result, metrics = strategy.aggregate_train(1, [good, *bad])
    np.testing.assert_allclose(result["w"].numpy(), [1.0, 2.0])
    assert metrics["gate-accepted"] == 1 and metrics["gate-rejected"] == 6
    for node in range(2, 8):
        assert f"node {node}:" in caplog.text


@pytest.mark.parametrize("cls", ALL)
def test_nothing_valid_keeps_the_global_model(cls):
    strategy = cls()
    assert strategy.aggregate_train(1, [error_reply(1)]) == (None, None)
    assert strategy.aggregate_train(1, []) == (None, None)


def test_missing_required_metric_drops_the_reply(caplog):
    metrics = dict(METRICS)
    del metrics["train-loss-before"]
    odd = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.array([9.0]))}),
                "metrics": MetricRecord(metrics),
            }
        ),
        metadata=reply_metadata(8),
    )
    result, metrics_out = FedCostWAvg().aggregate_train(
        1, [reply(1, theta(1.0)), reply(2, theta(3.0)), odd]
    )
    np.testing.assert_allclose(result["w"].numpy(), [2.0])
    assert metrics_out["gate-rejected"] == 1
    assert "node 8: metric 'train-loss-before' is missing" in caplog.text


def test_a_loss_of_zero_is_refused_not_trusted(caplog):
    # a loss of exactly 0 gave an unbounded cost improvement: now such a reply is
    # dropped (the kernel's fallback for all-zero ratios is in test_kernels)
    replies = [
        reply(1, theta(1.0), **{"num-examples": 10, "train-loss-before": 0.0}),
        reply(2, theta(0.0), **{"num-examples": 30, "train-loss-after": 0.0}),
        reply(3, theta(3.0), **{"num-examples": 30}),
    ]
    arrays, metrics = FedCostWAvg(alpha=0.0).aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0])
    assert metrics["gate-rejected"] == 2
    assert "node 1: metric 'train-loss-before' is 0.0 (must be > 0)" in caplog.text
    assert "node 2: metric 'train-loss-after' is 0.0 (must be > 0)" in caplog.text


def test_fast_fedavg_matches_flower_fedavg():
    rng = np.random.default_rng(0)
    models = [
        {
            "a": rng.standard_normal((20, 30)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
        }
        for _ in range(4)
    ]
    replies = [reply(i + 1, m, **{"num-examples": i + 1}) for i, m in enumerate(models)]
    ours, ours_metrics = FastFedAvg().aggregate_train(1, replies)
    flower, flower_metrics = FedAvg().aggregate_train(1, replies)
    for key in flower:
        np.testing.assert_allclose(
            ours[key].numpy(), flower[key].numpy(), rtol=1e-6, atol=ATOL
        )
        assert ours[key].numpy().dtype == flower[key].numpy().dtype
    for key in flower_metrics:
        assert ours_metrics[key] == pytest.approx(flower_metrics[key])


def test_update_norm_bounds():
    base = {"w": np.zeros(2)}
    replies = [reply(i, {"w": [0.1 * i, 0.0]}) for i in range(1, 5)]
    replies.append(reply(9, {"w": [100.0, 0.0]}))
    strategy = FastFedAvg(update_norm_factor=5.0)
    _with_global(strategy, base)
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["gate-rejected"] == 1 and 9 not in strategy.last_weights
    strategy = FastFedAvg(max_update_norm=0.25)
    _with_global(strategy, base)
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["gate-accepted"] == 2


@pytest.mark.parametrize("cls", ALL)
def test_configure_train_honours_fraction_and_min_nodes(cls):
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    grid = FakeGrid(range(1, 11))
    expected = 1 if cls is CyclicIncremental else 5
    messages = list(
        cls(fraction_train=0.5).configure_train(1, arrays, ConfigRecord(), grid)
    )
    assert len(messages) == expected
    assert all(m.content["config"]["server-round"] == 1 for m in messages)
    if cls is not CyclicIncremental:
        messages = cls(fraction_train=0.1, min_train_nodes=4).configure_train(
            1, arrays, ConfigRecord(), grid
        )
        assert len(list(messages)) == 4
    assert (
        list(cls(fraction_train=0.0).configure_train(1, arrays, ConfigRecord(), grid))
        == []
    )


def test_strategies_accept_fedavg_arguments_positionally():
    args = (0.5, 0.25, 3, 4, 5, "n", "arr", "cfg")
    for cls in ALL:
        strategy = cls(*args)
        assert (
            strategy.fraction_train,
            strategy.min_available_nodes,
            strategy.weighted_by_key,
            strategy.configrecord_key,
        ) == (0.5, 5, "n", "cfg")
        assert isinstance(strategy, FedAvg)


def test_quality_gate_is_a_drop_in():
    gate = QualityGate(FedAvg(fraction_train=0.5))
    assert gate.fraction_train == 0.5  # attributes are delegated
    messages = gate.configure_train(
        1, ArrayRecord({"w": Array(np.zeros(1))}), ConfigRecord(), FakeGrid(range(4))
    )
    assert len(list(messages)) == 2


# --- the drop-in contract ---------------------------------------------------------


def _bare_reply(node_id, arrays, metrics):
    """A reply carrying exactly ``metrics`` (no defaults added)."""
    return train_reply(node_id, arrays, metrics)


def test_quality_gate_forwards_attribute_writes_to_the_wrapped_strategy():
    inner = FedAdam()
    gate = QualityGate(inner, max_update_norm=5.0)
    gate.server_learning_rate = 0.5  # the wrapped FedOpt's parameter
    assert inner.server_learning_rate == 0.5
    assert gate.server_learning_rate == 0.5
    gate.max_update_norm = 3.0  # the gate's own
    assert gate.max_update_norm == 3.0 and not hasattr(inner, "max_update_norm")
    assert not isinstance(gate, FedAvg)
    assert gate.strategy is inner


def test_fedcostwavg_with_alpha_one_is_fedavg_without_losses():
    plain = {"num-examples": 1}
    replies = [
        _bare_reply(1, theta(1.0), plain),
        _bare_reply(2, theta(3.0), {"num-examples": 3}),
    ]
    strategy = FedCostWAvg(alpha=1.0)
    assert strategy.required_metrics == () == strategy.requested_metrics
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [2.5])  # (1 * 1 + 3 * 3) / 4
    assert metrics["gate-rejected"] == 0


@pytest.mark.parametrize(
    ("strategy", "missing"),
    [
        (FedNova(), "nova-a"),
        (FedCostWAvg(), "train-loss-before"),
        (FedFocus(), "train-loss-after"),
    ],
)
def test_every_reply_without_the_needed_metric_stops_with_the_contract(
    strategy, missing
):
    replies = [_bare_reply(n, theta(float(n)), {"num-examples": 1}) for n in (1, 2)]
    with pytest.raises(MissingMetricError, match=f"'{missing}'.*ClientApp"):
        strategy.aggregate_train(1, replies)
    # one reply without it is only dropped
    replies.append(reply(3, theta(3.0)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["gate-rejected"] == 2


def test_loss_weighted_strategies_ask_the_sites_for_their_losses():
    for strategy, wanted in (
        (FedCostWAvg(), ["train-loss-after", "train-loss-before"]),
        (FedCostWAvg(mode="across-rounds"), ["train-loss-after"]),
        (FedFocus(), ["train-loss-after"]),
    ):
        (message, *_) = _with_global(strategy, theta(0.0))
        assert list(message.content["config"]["request-metrics"]) == wanted
    (message, *_) = _with_global(FastFedAvg(), theta(0.0))
    assert "request-metrics" not in message.content["config"]


def test_fast_fedtrimmedavg_takes_flowers_positional_order():
    args = (1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None, None, 0.25)
    ours, theirs = FastFedTrimmedAvg(*args), FedTrimmedAvg(*args)
    assert ours.beta == theirs.beta == 0.25
    assert isinstance(ours, FedTrimmedAvg) and isinstance(FastFedMedian(), FedMedian)
    replies = [reply(n, theta(float(n), -float(n))) for n in range(1, 9)]
    mine, _ = ours.aggregate_train(1, replies)
    flower, _ = theirs.aggregate_train(1, replies)
    np.testing.assert_allclose(mine["w"].numpy(), flower["w"].numpy())


def test_a_reply_without_a_usable_source_node_is_still_screened(caplog):
    good = reply(1, theta(1.0))
    odd = Mock(spec=Message)  # as Flower's own strategy tests build replies
    odd.has_error.return_value = False
    odd.content = reply(2, theta(float("nan"))).content
    arrays, metrics = FastFedAvg().aggregate_train(1, [good, odd])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])
    assert metrics["gate-rejected"] == 1
    assert "node -1: arrays contain non-finite values" in caplog.text


def test_strategy_parameters_are_collected_across_the_hierarchy():
    params = strategy_parameters("fedcostwavg")
    assert params[:3] == ["alpha", "mode", "loss-floor"]
    for name in (
        "check-finite",
        "max-update-norm",
        "fraction-train",
        "min-train-nodes",
    ):
        assert name in params
    built = build_strategy("fedcostwavg", {"fraction-train": 0.5, "alpha": 0.25})
    assert (built.fraction_train, built.alpha) == (0.5, 0.25)
    assert "beta" in strategy_parameters("fast-fedtrimmedavg")

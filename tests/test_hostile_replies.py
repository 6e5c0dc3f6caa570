"""Every probe of the threat model, as a hostile site would send it, on hand-built
replies: every strategy and the gate drop the reply (naming the node and the reason)
or bound its influence, and never raise."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp.strategy import FedAdam, FedAvg, Krum
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
from flower_medimg.strategies import quality as quality_module
from flower_medimg.strategies.fedcostwavg import fedcostwavg_weights
from flower_medimg.strategies.kernels import cap_shares

HONEST = {
    "num-examples": 10,
    "train-loss-before": 1.0,
    "train-loss-after": 0.5,
    "nova-a": 2.0,
    "local-steps": 2,
}
SAFE = {  # the ServerApp's default reply checks
    "update_norm_factor": 3.0,
    "min_cosine": 0.0,
    "max_abs_value": 1e6,
    "max_num_examples": 1_000_000,
    "max_weight_share": 0.5,
}


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


@pytest.fixture
def flwr_log(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


def start(strategy, w):
    """Let the strategy send ``w`` as the round's global model."""
    arrays = ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid()))
    return strategy


def honest(node, w, **metrics):
    return train_reply(
        node, {"w": np.asarray(w, dtype=np.float32)}, {**HONEST, **metrics}
    )


def scalar(node, value, metrics=None):
    """An honest reply with a one-value model, ``metrics`` overriding the honest."""
    model = {"w": np.array([value], np.float32)}
    return train_reply(node, model, {**HONEST, **(metrics or {})})


def with_array(node, array, **metrics):
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": array}),
            "metrics": MetricRecord({**HONEST, **metrics}),
        }
    )
    return Message(content, metadata=reply_metadata(node))


def all_strategies():
    return [
        FastFedAvg(**SAFE),
        FedCostWAvg(**SAFE),
        FedFocus(**SAFE),
        FedNova(**SAFE),
        DistanceOutlierSuppression(**SAFE),
        FastFedMedian(**SAFE),
        FastFedTrimmedAvg(**SAFE),
        CyclicIncremental(**SAFE),
        QualityGate(FedAvg(), **SAFE),
        QualityGate(Krum(), **SAFE),
        QualityGate(FastFedAvg(), **SAFE),
    ]


GOOD = np.array([1.0, 1.0, 1.0], dtype=np.float32)


def _garbage(length):
    return Array(
        dtype="float32",
        shape=(3,),
        stype=SType.NUMPY,
        data=b"\x93NUMPY" + bytes(length),
    )


PROBES = {
    "bytes are not npy (metadata right)": lambda n: with_array(
        n, Array(dtype="float32", shape=(3,), stype=SType.NUMPY, data=bytes(140))
    ),
    "six-byte payload": lambda n: with_array(
        n, Array(dtype="float32", shape=(3,), stype=SType.NUMPY, data=b"\x93NUMPY")
    ),
    "header claims more than it holds": lambda n: with_array(n, _garbage(200)),
    "stype torch.Tensor": lambda n: with_array(
        n,
        Array(
            dtype="float32",
            shape=(3,),
            stype="torch.Tensor",
            data=Array(GOOD).data,
        ),
    ),
    "values of 3e38": lambda n: honest(n, np.full(3, 3e38, np.float32)),
    "update of 1e15": lambda n: honest(n, np.full(3, 1e15, np.float32)),
    "NaN": lambda n: honest(n, [np.nan, 0, 0]),
    "list metric": lambda n: honest(n, GOOD, **{"train-time-s": [1.0, 2.0]}),
    "num-examples 12.5": lambda n: honest(n, GOOD, **{"num-examples": 12.5}),
    "num-examples 1e9": lambda n: honest(n, GOOD, **{"num-examples": 10**9}),
    "negative loss": lambda n: honest(n, GOOD, **{"train-loss-after": -1.0}),
    "wrong shape": lambda n: train_reply(
        n, {"w": np.ones(4, np.float32)}, dict(HONEST)
    ),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_every_probe_is_dropped_by_every_strategy_without_raising(probe, flwr_log):
    for strategy in all_strategies():
        start(strategy, np.zeros(3))
        hostile = PROBES[probe](7)
        replies = [
            honest(1, GOOD),
            honest(2, GOOD * 1.1),
            hostile,
            honest(3, GOOD * 0.9),
        ]
        if isinstance(strategy, CyclicIncremental):
            replies = [hostile]
        arrays, metrics = strategy.aggregate_train(1, replies)
        name = type(strategy).__name__
        assert "node 7:" in flwr_log.text, (probe, name)
        if arrays is not None:
            values = arrays["w"].numpy()
            assert np.all(np.isfinite(values)) and np.all(np.abs(values) < 2), name
        flwr_log.clear()


def test_a_round_of_garbage_only_keeps_the_model_and_says_so(flwr_log):
    strategy = start(FastFedAvg(**SAFE), np.zeros(3))
    replies = [PROBES[p](n) for n, p in enumerate(list(PROBES)[:3], start=1)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert "no valid reply in round 1 (3 rejected)" in flwr_log.text


def test_one_site_weighs_no_more_than_all_others_together():
    # hand-computed: weights 0.9/0.05/0.05 -> the cap 0.5, the rest 0.25 each
    np.testing.assert_allclose(cap_shares([0.9, 0.05, 0.05], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(
        cap_shares([0.7, 0.2, 0.1], 0.5), [0.5, 1 / 3, 1 / 6], atol=1e-12
    )
    np.testing.assert_allclose(cap_shares([0.6, 0.4], 0.5), [0.5, 0.5])
    np.testing.assert_array_equal(cap_shares([0.3, 0.3, 0.4], 0.5), [0.3, 0.3, 0.4])
    strategy = start(FastFedAvg(max_weight_share=0.5), np.zeros(1))
    replies = [
        train_reply(1, {"w": np.array([9.0], np.float32)}, {"num-examples": 90}),
        train_reply(2, {"w": np.array([1.0], np.float32)}, {"num-examples": 5}),
        train_reply(3, {"w": np.array([3.0], np.float32)}, {"num-examples": 5}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5 * 9 + 0.25 * 1 + 0.25 * 3])
    assert strategy.last_weights == pytest.approx({1: 0.5, 2: 0.25, 3: 0.25})


def test_the_gate_caps_a_flower_strategy_through_its_weighting_metric():
    gate = start(QualityGate(FedAvg(), max_weight_share=0.5), np.zeros(1))
    replies = [
        train_reply(1, {"w": np.array([9.0], np.float32)}, {"num-examples": 900}),
        train_reply(2, {"w": np.array([1.0], np.float32)}, {"num-examples": 50}),
        train_reply(3, {"w": np.array([3.0], np.float32)}, {"num-examples": 50}),
    ]
    arrays, _ = gate.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [5.5], rtol=1e-6)
    # the replies themselves are not changed
    assert replies[0].content["metrics"]["num-examples"] == 900


def test_a_lie_about_losses_is_bounded():
    # k = before / after: 1e6 / 1e-12 is clipped to 10, an honest 2.0 stays
    p = fedcostwavg_weights([1, 1], [1e6, 1.0], [1e-12, 0.5], alpha=0.0, max_ratio=10)
    np.testing.assert_allclose(p, [10 / 12, 2 / 12])
    strategy = start(FedCostWAvg(alpha=0.0, max_weight_share=0.5), np.zeros(1))
    replies = [
        scalar(1, 9.0, {"train-loss-before": 1e6, "train-loss-after": 1e-12}),
        scalar(2, 0.0),
        scalar(3, 0.0),
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.last_weights[1] == pytest.approx(0.5)
    # FedFocus: a loss of 1e6 counts as 10 x the median loss at most
    focus = start(FedFocus(lambda0=1.0, gamma=1.0), np.zeros(1))
    focus.aggregate_train(
        1,
        [
            train_reply(
                1,
                {"w": np.array([9.0], np.float32)},
                {**HONEST, "train-loss-after": 1e6},
            ),
            scalar(2, 0.0),
            scalar(3, 0.0),
        ],
    )
    np.testing.assert_allclose(focus.last_weights[1], 5 / 6)  # 5 / (5 + 0.5 + 0.5)


def test_fednova_refuses_inconsistent_steps_and_bounds_the_amplification(flwr_log):
    strategy = start(FedNova(max_steps_per_example=2.0), np.zeros(1))
    replies = [
        scalar(1, 0.01, {"nova-a": 1e-12}),
        scalar(2, 1.0, {"local-steps": 10**9, "nova-a": 1e9}),
        scalar(3, 1.0, {"local-steps": 2.5}),
        scalar(4, 1.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["gate-rejected"] == 3
    assert "node 1: metric 'nova-a' is 1e-12, outside [2, 200]" in flwr_log.text
    assert "more than 2 x 10 examples allow" in flwr_log.text
    assert "node 3: metric 'local-steps' must be a whole number" in flwr_log.text
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])
    # honest heterogeneity: tau = 20 next to tau = 1 is amplified at most 10 x
    capped = start(FedNova(max_amplification=10.0), np.zeros(1))
    replies = [
        scalar(1, 1.0, {"local-steps": 1, "nova-a": 1.0}),
        scalar(2, 1.0, {"local-steps": 39, "nova-a": 39.0}),
    ]
    capped.aggregate_train(1, replies)
    # p = 1/2 each, tau_eff = 20: c_1 = 0.5 * 20 / 1 = 10, capped at 10 * 0.5 = 5
    assert capped.last_weights == pytest.approx({1: 5.0, 2: 0.5 * 20 / 39})


def test_a_sign_flipped_update_points_away_from_the_others(flwr_log):
    strategy = start(FastFedAvg(min_cosine=0.0), np.zeros(3))
    replies = [
        honest(1, [1.0, 1.0, 0.5]),
        honest(2, [0.8, 1.2, 0.4]),
        honest(3, [-3.0, -3.3, -1.3]),  # -3 x an honest update
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["gate-rejected"] == 1
    assert "node 3: update points away from 2 of the 2 other updates" in flwr_log.text
    np.testing.assert_allclose(arrays["w"].numpy(), [0.9, 1.1, 0.45], rtol=1e-6)


def test_the_gate_and_our_strategy_share_one_screening_pass(monkeypatch):
    calls = []
    real = quality_module.screen_replies

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(
        "flower_medimg.strategies.quality_gate.screen_replies", counting
    )
    monkeypatch.setattr("flower_medimg.strategies.fast_fedavg.screen_replies", counting)
    gate = start(QualityGate(FedNova(), max_update_norm=100.0), np.zeros(3))
    # the gate applies the wrapped strategy's required metrics in its single pass
    missing = dict(HONEST)
    del missing["nova-a"]
    replies = [honest(1, GOOD), train_reply(2, {"w": GOOD}, missing), honest(3, GOOD)]
    _, metrics = gate.aggregate_train(1, replies)
    assert calls == [1]
    assert metrics["gate-rejected"] == 1


EVALUATE = {"num-examples": 5, "eval-loss": 0.5, "dice": 0.6}


def evaluate_reply(node, **metrics):
    content = RecordDict({"metrics": MetricRecord({**EVALUATE, **metrics})})
    return Message(content, metadata=reply_metadata(node, message_type="evaluate"))


@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        ({"dice": [1.0, 1.0]}, "metric 'dice' must be a number, got list"),
        ({"dice": float("nan")}, "metric 'dice' is not finite"),
        ({"dice": 1.5}, "metric 'dice' is 1.5, outside [0, 1]"),
        (
            {"num-examples": 10**9, "dice": 1.0},
            "metric 'num-examples' is 1000000000, above the bound 1000000",
        ),
        ({"eval-loss": -1.0}, "metric 'eval-loss' is -1.0, outside [0, inf]"),
    ],
)
def test_evaluate_replies_are_screened_too(lie, reason, flwr_log):
    for strategy in (FastFedAvg(**SAFE), QualityGate(FedAvg(), **SAFE)):
        replies = [
            evaluate_reply(1),
            evaluate_reply(2, dice=0.8),
            evaluate_reply(9, **lie),
        ]
        metrics = strategy.aggregate_evaluate(1, replies)
        assert metrics["dice"] == pytest.approx(0.7), type(strategy).__name__
        assert f"Rejected evaluate reply from node 9: {reason}" in flwr_log.text
        flwr_log.clear()


def test_a_site_may_not_claim_more_than_it_reported(flwr_log):
    strategy = start(FastFedAvg(), np.zeros(1))
    strategy.num_examples_bounds = {1: 10, 2: 8}
    replies = [
        train_reply(1, {"w": np.array([1.0], np.float32)}, {"num-examples": 10}),
        train_reply(2, {"w": np.array([5.0], np.float32)}, {"num-examples": 9}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0])
    assert "node 2: metric 'num-examples' is 9, more than the 8" in flwr_log.text


def test_gate_never_accepts_a_non_finite_aggregate_of_a_flower_strategy(flwr_log):
    # finite replies, but FedAdam's step (eta = 1e39) overflows float32; the
    # weights are matrices, as a real model's are
    ones = np.ones((2, 3))
    gate = start(QualityGate(FedAdam(eta=1e39)), 0 * ones)
    arrays, metrics = gate.aggregate_train(1, [honest(1, ones), honest(2, 3 * ones)])
    assert (arrays, metrics) == (None, None)
    assert "FedAdam's aggregate is not finite" in flwr_log.text
    # a gate in front of a sane strategy aggregates the same replies
    gate = start(QualityGate(FedAvg()), 0 * ones)
    arrays, _ = gate.aggregate_train(1, [honest(1, ones), honest(2, 3 * ones)])
    np.testing.assert_array_equal(arrays["w"].numpy(), 2 * ones)

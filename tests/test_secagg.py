"""SecAgg+ on the Message API: the protocol between the server wrapper and the mods.

These tests deliver the server's messages to each site's mod in this process (the
Flower runtimes run the same pair in tests/test_secagg_simulation.py and in the
deployment test), so that a reply can be lost at a chosen exchange.
"""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, Krum

from flower_medimg.core import secagg as sa
from flower_medimg.privacy import safe_fixedclipping_mod
from flower_medimg.privacy.secagg_mod import STATE_KEY, SecAggPlusMod
from flower_medimg.strategies import (
    FastFedAvg,
    FastFedMedian,
    QualityGate,
    make_user_level_dp,
)
from flower_medimg.strategies.secagg import SecAggPlus


class Loopback:
    """A grid whose sites are SecAggPlusMods in this process; replies can be lost."""

    def __init__(self, updates, counts, lose=None, fail_training=()):
        self.updates, self.counts = updates, counts
        self.contexts = {
            node: Context(1, node, {}, RecordDict(), {}) for node in updates
        }
        self.mods = {
            node: SecAggPlusMod(lambda c: counts[c.node_id]) for node in updates
        }
        self.lose = lose or {}  # stage -> nodes whose reply never arrives
        self.fail_training = set(fail_training)
        self.tamper = {}  # (stage, node) -> edits that reply
        self.received = []  # every reply the server got

    def get_node_ids(self):
        return list(self.updates)

    def _train(self, msg, context):
        node = context.node_id
        if node in self.fail_training:
            raise RuntimeError("site crashed while training")
        sent = msg.content["arrays"]
        trained = {
            key: Array(sent[key].numpy() + self.updates[node][key]) for key in sent
        }
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(trained),
                    "metrics": MetricRecord(
                        {"num-examples": self.counts[node], "unit-weight": 1}
                    ),
                }
            ),
            reply_to=msg,
        )

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records["secagg"].get("stage")
            try:
                reply = self.mods[node](msg, self.contexts[node], self._train)
            except RuntimeError:
                continue  # the site is gone
            if (stage, node) in self.tamper:
                self.tamper[stage, node](reply)
            if node not in self.lose.get(stage, ()):
                replies.append(reply)
        self.received.extend(replies)
        return replies


def _round(strategy, grid, arrays, server_round=1):
    messages = list(
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    )
    replies = grid.send_and_receive(messages)
    return strategy.aggregate_train(server_round, replies)


def _global(values):
    return ArrayRecord(
        {k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()}
    )


def _fedavg(n):
    return FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_train=1.0)


UPDATES = {
    1: {"w": np.array([0.1, -0.2, 0.3], np.float32)},
    2: {"w": np.array([0.3, 0.0, -0.1], np.float32)},
    3: {"w": np.array([-0.2, 0.4, 0.0], np.float32)},
}


def test_unmasked_aggregate_is_the_weighted_mean_hand_checked():
    # weights 1:1:2 -> 0.25, 0.25, 0.5; mean update by hand:
    # 0.25*[.1,-.2,.3] + 0.25*[.3,0,-.1] + 0.5*[-.2,.4,0] = [0.0, 0.15, 0.05]
    grid = Loopback(UPDATES, {1: 10, 2: 10, 3: 20})
    strategy = SecAggPlus(_fedavg(3), quantization_bits=16, clipping_range=1.0)
    arrays, _ = _round(strategy, grid, _global({"w": [1.0, 2.0, 3.0]}))
    # each site's error is at most one quantisation step 2c / (2^16 - 1)
    step = 2.0 / (2**16 - 1)
    np.testing.assert_allclose(
        arrays["w"].numpy(), [1.0, 2.15, 3.05], atol=3 * step + 1e-6
    )
    # the sites' secrets are erased after the round
    assert all(STATE_KEY not in c.state.config_records for c in grid.contexts.values())


def _five_sites():
    rng = np.random.default_rng(0)
    updates = {
        n: {"w": rng.uniform(-0.5, 0.5, 50).astype(np.float32)} for n in range(1, 6)
    }
    counts = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    return updates, counts


def _mean(updates, counts, nodes):
    total = sum(counts[n] for n in nodes)
    return sum(counts[n] / total * updates[n]["w"].astype(np.float64) for n in nodes)


def test_a_site_lost_before_and_one_after_its_masked_input_still_aggregate():
    updates, counts = _five_sites()
    # node 2 crashes while training (no masked input); node 4 sends its masked input
    # and then never answers the unmask exchange
    grid = Loopback(updates, counts, lose={"unmask": {4}}, fail_training={2})
    strategy = SecAggPlus(_fedavg(5), threshold=3, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    expected = _mean(updates, counts, [1, 3, 4, 5])  # node 4's input counts
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)


def test_a_site_lost_while_sharing_keys_is_left_out():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts, lose={"share-keys": {5}})
    strategy = SecAggPlus(_fedavg(5), threshold=3, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    expected = _mean(updates, counts, [1, 2, 3, 4])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)


def test_fewer_survivors_than_the_threshold_fail_the_round_and_keep_the_model():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts, fail_training={1, 2, 3})
    strategy = SecAggPlus(QualityGate(_fedavg(5)), threshold=3)
    arrays, metrics = _round(strategy, grid, _global({"w": np.zeros(50)}))
    assert arrays is None and metrics is None  # the driver keeps the global model
    assert strategy.last_outcomes and not any(
        o.accepted for o in strategy.last_outcomes
    )
    assert "fewer than the threshold 3" in strategy.last_outcomes[0].reason


def test_too_few_unmask_answers_fail_the_round():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts, lose={"unmask": {1, 2, 3}})
    strategy = SecAggPlus(_fedavg(5), threshold=3)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    assert arrays is None
    assert "shares of node" in strategy.last_outcomes[0].reason


def test_what_the_server_receives_is_uncorrelated_with_the_update():
    rng = np.random.default_rng(1)
    updates = {
        n: {"w": rng.normal(0, 0.2, 20000).astype(np.float32)} for n in (1, 2, 3)
    }
    grid = Loopback(updates, {1: 1, 2: 1, 3: 1})
    strategy = SecAggPlus(_fedavg(3), quantization_bits=16)
    _round(strategy, grid, _global({"w": np.zeros(20000)}))
    masked = next(
        r
        for r in grid.received
        if r.metadata.src_node_id == 1 and "arrays" in r.content.array_records
    )
    seen = masked.content["arrays"]["w"].numpy().astype(np.float64)
    own = updates[1]["w"].astype(np.float64)
    assert abs(np.corrcoef(seen, own)[0, 1]) < 0.05
    # uniform over [0, 2^m): mean near the middle of the range
    top = 2.0 ** sa.modulus_bits(16, 3)
    assert abs(seen.mean() / top - 0.5) < 0.02
    # while the unmasked mean follows the updates closely
    quantised, _ = sa.quantize_update([own / 3], 1.0, 16)
    assert np.corrcoef(quantised[0].astype(np.float64), own)[0, 1] > 0.99


def test_secagg_with_8_bit_quantisation_sends_two_byte_values():
    grid = Loopback(UPDATES, {1: 1, 2: 1, 3: 1})
    strategy = SecAggPlus(_fedavg(3), quantization_bits=8, clipping_range=0.5)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(3)}))
    masked = [r for r in grid.received if "arrays" in r.content.array_records]
    assert {r.content["arrays"]["w"].numpy().dtype for r in masked} == {
        np.dtype(np.uint16)
    }
    expected = _mean(UPDATES, {1: 1, 2: 1, 3: 1}, [1, 2, 3])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=3 * 1.0 / 255)


def test_fedadam_steps_from_the_secure_mean():
    grid = Loopback(UPDATES, {1: 1, 2: 1, 3: 1})
    plain = FedAdam(min_available_nodes=3, min_train_nodes=3)
    secure = SecAggPlus(
        FedAdam(min_available_nodes=3, min_train_nodes=3), quantization_bits=24
    )
    start = _global({"w": [1.0, 2.0, 3.0]})
    secure_arrays, _ = _round(secure, grid, start)
    mean = _mean(UPDATES, {1: 1, 2: 1, 3: 1}, [1, 2, 3])
    reply = Message(
        RecordDict(
            {
                "arrays": _global({"w": np.array([1.0, 2.0, 3.0]) + mean}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=next(iter(plain.configure_train(1, start, ConfigRecord(), grid))),
    )
    plain_arrays, _ = plain.aggregate_train(1, [reply])
    np.testing.assert_allclose(
        secure_arrays["w"].numpy(), plain_arrays["w"].numpy(), atol=1e-5
    )


@pytest.mark.parametrize(
    "inner", [FedMedian(), Krum(), FastFedMedian(), QualityGate(FedMedian())]
)
def test_strategies_that_need_each_update_are_refused(inner):
    with pytest.raises(ValueError, match="secure aggregation cannot wrap"):
        SecAggPlus(inner)


def test_plain_mean_strategies_are_accepted():
    for inner in (FedAvg(), FastFedAvg(), QualityGate(FedAvg()), FedAdam()):
        SecAggPlus(inner)


# ---- the site refuses a lying server -------------------------------------------------
def _stage_message(node, values, round_id=1):
    return Message(
        RecordDict({"secagg": ConfigRecord(values)}),
        dst_node_id=node,
        message_type="train",
        group_id=str(round_id),
    )


def _setup(threshold, neighbours=(2, 3, 4)):
    return _stage_message(
        1,
        {
            "stage": "setup",
            "neighbours": list(neighbours),
            "threshold": threshold,
            "clipping-range": 1.0,
            "quantization-bits": 16,
            "modulus-bits": 19,
        },
    )


def _call(mod, context, msg):
    return mod(msg, context, lambda m, c: pytest.fail("the site must not train"))


def test_the_site_refuses_a_threshold_of_half_its_shareholders():
    reply = _call(SecAggPlusMod(), Context(1, 1, {}, RecordDict(), {}), _setup(2))
    assert reply.has_error()
    assert "more than half" in reply.error.reason


def test_the_site_refuses_a_train_message_without_the_protocol():
    plain = Message(
        RecordDict({"config": ConfigRecord({"lr": 0.1})}),
        dst_node_id=1,
        message_type="train",
    )
    reply = _call(SecAggPlusMod(), Context(1, 1, {}, RecordDict(), {}), plain)
    assert reply.has_error() and "would expose the site's update" in reply.error.reason


def test_the_site_reveals_one_share_per_node_once_and_only_above_threshold():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts)
    strategy = SecAggPlus(_fedavg(5), threshold=3)
    messages = list(
        strategy.configure_train(1, _global({"w": np.zeros(50)}), ConfigRecord(), grid)
    )
    collect = [grid.send_and_receive([m])[0] for m in messages]
    assert not any(r.has_error() for r in collect)
    mod, context = grid.mods[1], grid.contexts[1]

    def unmask(survivors, dropped):
        return _call(
            mod,
            context,
            _stage_message(
                1, {"stage": "unmask", "survivors": survivors, "dropped": dropped}
            ),
        )

    both = unmask([1, 2, 3], [2])
    assert both.has_error() and "survivors and dropped" in both.error.reason
    few = unmask([1, 2], [3, 4, 5])
    assert few.has_error() and "fewer than the threshold" in few.error.reason
    good = unmask([1, 2, 3, 4], [5])
    assert not good.has_error()
    revealed = set(good.content["secagg"].keys())
    assert revealed == {
        "seed-share:1",
        "seed-share:2",
        "seed-share:3",
        "seed-share:4",
        "secret-share:5",
    }
    again = unmask([1, 2, 3, 4, 5], [])
    assert again.has_error() and "out of order" in again.error.reason


def test_the_site_refuses_shares_addressed_to_another_site():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts)
    strategy = SecAggPlus(_fedavg(5), threshold=3)
    messages = list(
        strategy.configure_train(1, _global({"w": np.zeros(50)}), ConfigRecord(), grid)
    )
    to_one = next(m for m in messages if m.metadata.dst_node_id == 1)
    config = to_one.content["secagg"]
    # the server swaps two ciphertexts meant for node 1
    config["ciphertext:2"], config["ciphertext:3"] = (
        config["ciphertext:3"],
        config["ciphertext:2"],
    )
    reply = grid.send_and_receive([to_one])[0]
    assert reply.has_error() and "secagg collect refused" in reply.error.reason


def test_neighbourhoods_of_secagg_plus_are_symmetric_rings():
    graph = sa.neighbours([5, 1, 9, 3, 7], 3)
    assert graph == {1: [3, 9], 3: [1, 5], 5: [3, 7], 7: [5, 9], 9: [1, 7]}
    assert sa.neighbours([1, 2, 3], 5) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}


def test_a_sparse_neighbourhood_still_aggregates_with_a_dropout():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts, fail_training={3})
    strategy = SecAggPlus(_fedavg(5), num_shares=3, threshold=2, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    expected = _mean(updates, counts, [1, 2, 4, 5])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)


def test_user_level_dp_clipped_at_the_sites_composes_with_secagg():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts)
    for node, secagg in grid.mods.items():  # clip inside, mask outside
        grid.mods[node] = lambda m, c, nxt, s=secagg: s(
            m, c, lambda m2, c2: safe_fixedclipping_mod(m2, c2, nxt)
        )
    inner = FedAvg(
        min_available_nodes=5, min_train_nodes=5, weighted_by_key="unit-weight"
    )
    dp = make_user_level_dp(
        inner,
        side="client",
        noise_multiplier=0.0,
        clipping_norm=0.5,
        num_sampled_clients=5,
    )
    strategy = SecAggPlus(dp, threshold=3, quantization_bits=20)
    arrays, metrics = _round(strategy, grid, _global({"w": np.zeros(50)}))
    # by hand: every update clipped to norm 0.5, then their unweighted mean
    clipped = [
        updates[n]["w"] * min(1.0, 0.5 / np.linalg.norm(updates[n]["w"]))
        for n in range(1, 6)
    ]
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean(clipped, 0), atol=1e-4)
    assert "user-epsilon" in metrics


def _flip(reply, key):
    config = reply.content["secagg"]
    share = bytearray(config[key])
    share[-1] ^= 0xFF
    config[key] = bytes(share)


def test_a_wrong_share_is_stepped_around_and_the_round_aggregates():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts, fail_training={5})
    # node 2 lies about its share of node 1's seed and of node 5's mask key
    grid.tamper["unmask", 2] = lambda c: (
        _flip(c, "seed-share:1"),
        _flip(c, "secret-share:5"),
    )
    strategy = SecAggPlus(_fedavg(5), threshold=3, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    expected = _mean(updates, counts, [1, 2, 3, 4])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)


def test_too_many_wrong_shares_fail_the_round_naming_the_secret():
    updates, counts = _five_sites()
    grid = Loopback(updates, counts)
    for liar in (2, 3):
        grid.tamper["unmask", liar] = lambda c: _flip(c, "seed-share:1")
    strategy = SecAggPlus(_fedavg(5), threshold=4, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    assert arrays is None
    assert "shares of node 1's mask seed rebuild it" in strategy.last_outcomes[0].reason


def test_too_few_sampled_sites_for_the_threshold_train_nothing():
    updates = {n: UPDATES[n] for n in (1, 2)}
    grid = Loopback(updates, {1: 1, 2: 1})
    strategy = SecAggPlus(_fedavg(2), threshold=3)
    assert (
        list(
            strategy.configure_train(
                1, _global({"w": np.zeros(3)}), ConfigRecord(), grid
            )
        )
        == []
    )
    assert grid.received == []  # not even keys were asked for


@pytest.mark.parametrize(
    ("forged", "named"),
    [
        (np.zeros(50, np.float32), "expected uint"),
        (np.full(50, 2**30, np.uint32), "beyond 2^"),
        (np.zeros(7, np.uint32), "expected uint"),
    ],
)
def test_a_malformed_masked_input_costs_only_its_site(forged, named):
    updates, counts = _five_sites()
    grid = Loopback(updates, counts)

    def forge(reply):
        reply.content["arrays"]["w"] = Array(forged)

    grid.tamper["collect", 3] = forge
    strategy = SecAggPlus(QualityGate(_fedavg(4)), threshold=3, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    # node 3 is unmasked out as a site that dropped after sharing its keys
    expected = _mean(updates, counts, [1, 2, 4, 5])
    np.testing.assert_allclose(arrays["w"].numpy(), expected, atol=1e-4)
    outcome = {o.node_id: o for o in strategy.strategy.last_outcomes}
    assert not outcome[3].accepted and named in outcome[3].reason
    assert all(outcome[n].accepted for n in (1, 2, 4, 5))


def test_the_sites_own_norm_bound_composes_with_secagg():
    from flower_medimg.privacy import SiteNormBoundMod

    updates, counts = _five_sites()
    grid = Loopback(updates, counts)
    for node, secagg in grid.mods.items():
        grid.mods[node] = lambda m, c, nxt, s=secagg: s(
            m, c, lambda m2, c2: SiteNormBoundMod(0.5)(m2, c2, nxt)
        )
    strategy = SecAggPlus(_fedavg(5), threshold=3, quantization_bits=20)
    arrays, _ = _round(strategy, grid, _global({"w": np.zeros(50)}))
    clipped = {
        n: {"w": updates[n]["w"] * min(1.0, 0.5 / np.linalg.norm(updates[n]["w"]))}
        for n in updates
    }
    np.testing.assert_allclose(
        arrays["w"].numpy(), _mean(clipped, counts, [1, 2, 3, 4, 5]), atol=1e-4
    )


def test_quantisation_of_a_sum_by_hand():
    # c = 1, 2 bits: Q = 3 levels above 0; -1 -> 0, 1 -> 3 (exact grid points)
    ((low, high),), _ = sa.quantize_update([np.array([-1.0, 1.0])], 1.0, 2)
    assert (low, high) == (0, 3)
    # two sites sending -1 and 1: sum 3 -> 3 * 2c / Q - c - (2 - 1) c = 0
    np.testing.assert_allclose(sa.dequantize_sum([np.array([3])], 1.0, 2, 2), [[0.0]])
    # two sites sending 1 and 1: sum 6 -> 4 - 1 - 1 = 2
    np.testing.assert_allclose(sa.dequantize_sum([np.array([6])], 1.0, 2, 2), [[2.0]])
    # a value beyond c is clipped and counted
    _, fraction = sa.quantize_update([np.array([5.0, 0.0, -0.5, -9.0])], 1.0, 8)
    assert fraction == 0.5
    assert sa.modulus_bits(24, 30) == 29 and sa.wire_dtype(29) == np.uint32
    assert sa.modulus_bits(8, 4) == 10 and sa.wire_dtype(10) == np.uint16

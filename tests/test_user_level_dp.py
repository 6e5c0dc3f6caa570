"""User-level DP around a strategy (spec section 1.6): clipping, noise, ε, refusals."""

import logging

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
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
    FedMedian,
    FedProx,
)
from flwr.simulation import run_simulation
from opacus.accountants import RDPAccountant
from reply_messages import error_reply, train_reply

from flower_medimg.strategies import (
    DistanceOutlierSuppression,
    FastFedAvg,
    FedCostWAvg,
    FedFocus,
    QualityGate,
)
from flower_medimg.strategies.accounting import user_level_epsilon
from flower_medimg.strategies.user_level_dp import (
    UserLevelDPClientSideFixedClipping,
    UserLevelDPServerSideFixedClipping,
    clip_update,
    make_user_level_dp,
    uniform_weighting_problem,
)

ATOL = 1e-6
UNIFORM = {"weighted_by_key": "unit-weight"}


@pytest.fixture
def flwr_log(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


def reply(node_id, arrays, unit_weight=1, error=False):
    if error:
        return error_reply(node_id)
    metrics = {"num-examples": 10 * node_id, "unit-weight": unit_weight}
    return train_reply(node_id, arrays, metrics)


def run_round(strategy, server_round, global_, locals_):
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in global_.items()})
    messages = list(
        strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid())
    )
    replies = [reply(i + 1, a) for i, a in enumerate(locals_)]
    return messages, strategy.aggregate_train(server_round, replies)


def dp(strategy=None, **kwargs):
    args = {
        "noise_multiplier": 1.0,
        "clipping_norm": 1.0,
        "num_sampled_clients": 4,
        **kwargs,
    }
    return make_user_level_dp(strategy or FedAvg(**UNIFORM), **args)


# ----------------------------------------------------------------------------------
# Clipping and noise (worked examples)
# ----------------------------------------------------------------------------------


def test_clip_worked_example_and_zero_update():
    (clipped,), norm = clip_update([np.array([3.0, 4.0])], [np.zeros(2)], 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8], atol=ATOL)
    assert norm == pytest.approx(5.0)
    # the norm is joint over arrays; a small update is untouched
    clipped, norm = clip_update(
        [np.array([1.3]), np.array([[1.4]], dtype=np.float32)],
        [np.array([1.0]), np.array([[1.0]], dtype=np.float32)],
        1.0,
    )
    assert norm == pytest.approx(0.5, rel=1e-6) and clipped[1].dtype == np.float32
    np.testing.assert_allclose(clipped[0], [1.3])
    (clipped,), norm = clip_update([np.ones(3)], [np.ones(3)], 1.0)
    assert norm == 0.0
    np.testing.assert_array_equal(clipped, np.ones(3))


def test_server_side_clips_each_reply_to_worked_example():
    strategy = dp(noise_multiplier=0.0, num_sampled_clients=1)
    _, (arrays, _) = run_round(strategy, 1, {"w": np.zeros(2)}, [{"w": [3.0, 4.0]}])
    np.testing.assert_allclose(arrays["w"].numpy(), [0.6, 0.8], atol=ATOL)


def test_noise_std_and_zero_norm_guard():
    # sigma = 1, C = 1, m = 4 -> std 0.25 (spec 1.6). Four zero updates also check
    # that a zero update is not divided by its norm (Flower's helper raises).
    # With n = 200_000 draws the sample std has relative s.e. 1/sqrt(2n) = 0.16%;
    # rel=1% is about six standard errors, and the seed makes the run repeat.
    n = 200_000
    global_ = {"w": np.zeros(n)}
    np.random.seed(1234)  # Flower draws the noise from numpy's global generator
    strategy = dp()
    _, (arrays, metrics) = run_round(strategy, 1, global_, [global_] * 4)
    noise = arrays["w"].numpy()
    assert noise.std() == pytest.approx(0.25, rel=0.01)
    assert abs(noise.mean()) < 5 * 0.25 / np.sqrt(n)
    assert metrics["user-epsilon"] > 0


# ----------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("z, expected", [(1.0, 19.054), (2.0, 8.079), (5.0, 2.814)])
def test_epsilon_matches_spec_numbers(z, expected):
    assert user_level_epsilon(z, 10, 1e-5) == pytest.approx(expected, rel=1e-3)


def test_reported_epsilon_after_ten_rounds_equals_accountant():
    strategy = dp(noise_multiplier=1.0, num_sampled_clients=2)
    global_ = {"w": np.zeros(3, dtype=np.float32)}
    locals_ = [{"w": np.full(3, 0.1, np.float32)}, {"w": np.full(3, -0.2, np.float32)}]
    reported = []
    for server_round in range(1, 11):
        _, (arrays, metrics) = run_round(strategy, server_round, global_, locals_)
        assert arrays is not None
        reported.append(metrics["user-epsilon"])
        assert metrics["user-delta"] == 1e-5
        assert metrics["num-examples"] == pytest.approx(15)  # inner metrics kept
    accountant = RDPAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert reported[-1] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert reported[-1] == pytest.approx(19.054, rel=0.01)
    assert all(a < b for a, b in zip(reported, reported[1:], strict=False))


def test_error_reply_skips_release_but_reports_epsilon():
    strategy = dp(num_sampled_clients=2)
    global_ = {"w": np.zeros(2)}
    run_round(strategy, 1, global_, [global_, global_])
    arrays = ArrayRecord({"w": Array(np.zeros(2))})
    list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid()))
    result, metrics = strategy.aggregate_train(
        2, [reply(1, global_), reply(2, global_, error=True)]
    )
    assert result is None
    assert metrics["user-epsilon"] == pytest.approx(user_level_epsilon(1.0, 1, 1e-5))


def test_zero_noise_reports_infinite_epsilon():
    strategy = dp(noise_multiplier=0.0, num_sampled_clients=1)
    _, (_, metrics) = run_round(strategy, 1, {"w": np.zeros(2)}, [{"w": [0.1, 0]}])
    assert metrics["user-epsilon"] == float("inf")


# ----------------------------------------------------------------------------------
# Weighting checks
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inner",
    [
        FedAvg(),  # num-examples
        FedProx(),
        FastFedAvg(),
        FedCostWAvg(**UNIFORM),
        FedFocus(**UNIFORM),
        DistanceOutlierSuppression(**UNIFORM),
        FedMedian(**UNIFORM),
        QualityGate(FedAvg()),
    ],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize("side", ["server", "client"])
def test_data_dependent_weights_are_refused(inner, side):
    with pytest.raises(ValueError, match="allow_data_dependent_weights"):
        dp(inner, side=side)


@pytest.mark.parametrize(
    "inner",
    [FedAvg(**UNIFORM), FedProx(**UNIFORM), FastFedAvg(**UNIFORM)],
    ids=lambda s: type(s).__name__,
)
def test_uniform_strategies_are_accepted(inner):
    assert uniform_weighting_problem(inner) == (None, "unit-weight")
    assert uniform_weighting_problem(QualityGate(inner)) == (None, "unit-weight")
    assert isinstance(dp(inner), UserLevelDPServerSideFixedClipping)
    assert isinstance(dp(inner, side="client"), UserLevelDPClientSideFixedClipping)


def test_refusal_message_names_the_problem():
    with pytest.raises(ValueError, match="'num-examples'.*unit-weight"):
        dp(FedAvg())
    with pytest.raises(ValueError, match="FedCostWAvg overrides"):
        dp(FedCostWAvg(**UNIFORM))

    class Declared(FedAvg):
        data_dependent_weights = True

    with pytest.raises(ValueError, match="Declared declares"):
        dp(Declared(**UNIFORM))


def test_opt_in_warns_and_aggregates(flwr_log):
    strategy = dp(FedAvg(), allow_data_dependent_weights=True, num_sampled_clients=2)
    assert "C*max_k p_k" in flwr_log.text
    global_ = {"w": np.zeros(2)}
    _, (arrays, metrics) = run_round(strategy, 1, global_, [global_, global_])
    assert arrays is not None and "user-epsilon" in metrics


def test_unit_weight_is_forced_to_one(flwr_log):
    strategy = dp(noise_multiplier=0.0, num_sampled_clients=2)
    arrays = ArrayRecord({"w": Array(np.zeros(1))})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid()))
    replies = [reply(1, {"w": [0.2]}, unit_weight=9), reply(2, {"w": [0.4]})]
    result, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(result["w"].numpy(), [0.3])
    assert "node 1 sent unit-weight=9" in flwr_log.text


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="side"):
        dp(side="both")
    with pytest.raises(ValueError):
        dp(noise_multiplier=-1.0)
    with pytest.raises(ValueError):
        dp(clipping_norm=0.0)
    with pytest.raises(ValueError):
        dp(num_sampled_clients=0)
    with pytest.raises(ValueError, match="delta"):
        dp(delta=0.0)


# ----------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------


def test_client_side_sends_norm_and_clips_unclipped_replies(flwr_log):
    strategy = dp(side="client", noise_multiplier=0.0, num_sampled_clients=2)
    messages, (arrays, metrics) = run_round(
        strategy, 1, {"w": np.zeros(2)}, [{"w": [3.0, 4.0]}, {"w": [0.3, 0.4]}]
    )
    assert all(m.content["config"]["clipping_norm"] == 1.0 for m in messages)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.45, 0.6], atol=ATOL)
    assert "node 1 sent an update of norm 5" in flwr_log.text
    assert "node 2 sent" not in flwr_log.text
    assert metrics["user-epsilon"] == float("inf")


# ----------------------------------------------------------------------------------
# Flower's adaptive clipping: the sign finding (spec 1.6), as documentation
# ----------------------------------------------------------------------------------


def test_flower_adaptive_clipping_shrinks_when_every_update_is_clipped():
    """flwr 1.42 counts *clipped* clients; Andrew et al. count *unclipped* ones.

    With every update clipped the paper's rule grows the bound
    (C <- C exp(-lr (0 - 0.5)): 0.110517, 0.122140) while Flower shrinks it
    (0.090484, 0.081873). This is why the package exposes no adaptive wrapper.
    """
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=4
    )
    norms = []
    for _ in range(2):
        clipped_fraction = wrapper._noisy_fraction(4, 4)  # all four clipped
        wrapper._geometric_update(clipped_fraction)
        norms.append(wrapper.clipping_norm)
    np.testing.assert_allclose(norms, [0.090484, 0.081873], atol=ATOL)
    andrew = 0.1 * np.exp(-0.2 * (0.0 - 0.5) * np.arange(1, 3))
    np.testing.assert_allclose(andrew, [0.110517, 0.122140], atol=ATOL)


# ----------------------------------------------------------------------------------
# Flower's Ray simulation runtime
# ----------------------------------------------------------------------------------


def make_apps(results):
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        step = np.full_like(w, 0.5 * (1 + context.node_id % 3))
        metrics = MetricRecord({"num-examples": 3, "unit-weight": 1})
        arrays = ArrayRecord({"w": Array(w + step)})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 3, "unit-weight": 1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_user_level_dp(
            FedAvg(weighted_by_key="unit-weight"),
            side="server",
            noise_multiplier=2.0,
            clipping_norm=1.0,
            num_sampled_clients=2,
        )
        initial = ArrayRecord({"w": Array(np.zeros(8, dtype=np.float32))})
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=2)
        results.update(result.train_metrics_clientapp)
        results["arrays"] = result.arrays["w"].numpy()

    return server, client


@pytest.mark.slow
def test_user_level_dp_in_ray_simulation():
    results = {}
    server, client = make_apps(results)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert set(results) >= {1, 2}
    for server_round in (1, 2):
        assert results[server_round]["user-epsilon"] == pytest.approx(
            user_level_epsilon(2.0, server_round, 1e-5)
        )
        assert results[server_round]["user-delta"] == 1e-5
    assert results["arrays"].shape == (8,) and np.all(np.isfinite(results["arrays"]))

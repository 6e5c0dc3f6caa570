"""Selective sharing and SVT (spec section 1.5): kernels and Flower mods."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from flower_medimg.privacy import (
    PercentilePrivacyMod,
    SVTPrivacyMod,
    percentile_filter,
    safe_fixedclipping_mod,
    svt_filter,
)
from flower_medimg.privacy.sparse_sharing import (
    default_gamma,
    num_released,
    shared_fraction,
    svt_noise_scales,
)

ATOL = 1e-6
DELTA = np.array([0.5, -0.02, 0.003, -0.3, 0.1, 0.0001, 0.05, -0.2, 0.01, 0.6])
# |clip(DELTA, -0.25, 0.25)| >= 0.04 at these indices (spec 1.5 worked example)
ACCEPTED = {0, 3, 4, 6, 7, 9}
CLIPPED = np.clip(DELTA, -0.25, 0.25)


def zero_laplace(scale, size):
    return np.zeros(size)


# ----------------------------------------------------------------------------------
# percentile_filter
# ----------------------------------------------------------------------------------


def test_percentile_worked_example():
    out = percentile_filter({"w": DELTA}, share=0.5, gamma=0.1, steps=2)
    expected = [0.2, 0, 0, -0.2, 0.1, 0, 0, -0.2, 0, 0.2]
    np.testing.assert_allclose(out["w"], expected, atol=ATOL)


def test_percentile_cut_is_joint_over_arrays_and_keeps_ties():
    delta = {"a": DELTA[:4].reshape(2, 2), "b": DELTA[4:]}
    out = percentile_filter(delta, share=0.5, gamma=0.1, steps=2)
    joint = np.concatenate([out["a"].ravel(), out["b"]])
    np.testing.assert_allclose(joint, [0.2, 0, 0, -0.2, 0.1, 0, 0, -0.2, 0, 0.2])
    assert out["a"].shape == (2, 2)
    # a value exactly at the cut is kept (strict inequality drops only the inside)
    out = percentile_filter({"w": np.array([1.0, 2.0, 3.0])}, share=0.5, gamma=10)
    np.testing.assert_allclose(out["w"], [0.0, 2.0, 3.0])


def test_percentile_share_one_keeps_everything_and_clips():
    out = percentile_filter({"w": DELTA}, share=1.0, gamma=0.25)
    np.testing.assert_allclose(out["w"], CLIPPED)


def test_percentile_passes_scalars_and_integers_and_keeps_dtypes():
    delta = {
        "w": DELTA.astype(np.float32),
        "count": np.array(7, dtype=np.int64),
        "scale": np.array(0.5, dtype=np.float32),
        "ids": np.arange(3, dtype=np.int32),
    }
    out = percentile_filter(delta, share=0.5, gamma=0.1, steps=2)
    assert out.keys() == delta.keys()
    assert {k: v.dtype for k, v in out.items()} == {
        k: v.dtype for k, v in delta.items()
    }
    assert out["count"] == 7 and out["scale"] == np.float32(0.5)
    np.testing.assert_array_equal(out["ids"], [0, 1, 2])
    # only scalars: unchanged
    only = {"s": np.array(1.5)}
    assert percentile_filter(only, 0.1)["s"] == 1.5


def test_percentile_default_gamma_is_99th_percentile_of_nonzero():
    delta = np.concatenate([np.zeros(900), np.linspace(0.01, 1.0, 100)])
    gamma = default_gamma(np.abs(delta))
    assert gamma == pytest.approx(np.percentile(np.linspace(0.01, 1.0, 100), 99))
    out = percentile_filter({"w": delta}, share=0.1)
    assert np.max(np.abs(out["w"])) == pytest.approx(gamma)
    assert shared_fraction({"w": delta}, out) == pytest.approx(0.1)


def test_nan_update_is_rejected_with_its_name():
    bad = DELTA.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="'conv.weight'.*NaN"):
        percentile_filter({"conv.weight": bad}, 0.5, 0.1)
    with pytest.raises(ValueError, match="'conv.weight'"):
        svt_filter({"conv.weight": bad}, 0.5, 1.0, 0.1, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"share": 0.0},
        {"share": 1.5},
        {"share": float("nan")},
        {"gamma": 0.0},
        {"gamma": -1.0},
        {"gamma": float("inf")},
        {"steps": 0},
        {"steps": True},
    ],
)
def test_percentile_invalid_parameters_raise(kwargs):
    args = {"share": 0.1, "gamma": 0.1, "steps": 1, **kwargs}
    with pytest.raises(ValueError):
        percentile_filter({"w": DELTA}, **args)


# ----------------------------------------------------------------------------------
# svt_filter
# ----------------------------------------------------------------------------------


def test_svt_count_and_scales_match_spec():
    assert num_released(0.3, 10) == 3
    assert num_released(0.1, 30) == 3
    assert num_released(1.0, 7) == 7
    assert num_released(0.01, 5) == 1
    thr_eps, query_eps, release_eps, thr, query, release = svt_noise_scales(
        1000, 0.1, 1e-5
    )
    assert thr == pytest.approx(1.597401e-2, rel=1e-6)
    assert query == pytest.approx(0.201260, rel=1e-5)
    assert release == pytest.approx(2e-4, rel=1e-9)
    assert thr_eps + query_eps == pytest.approx(0.1)
    assert release_eps == pytest.approx(100.0)


def test_svt_worked_example_with_zero_noise():
    for seed in range(20):
        out, spend = svt_filter(
            {"w": DELTA},
            share=0.3,
            epsilon=0.1,
            gamma=0.25,
            tau=0.04,
            rng=np.random.default_rng(seed),
            laplace=zero_laplace,
        )
        nonzero = set(np.flatnonzero(out["w"]).tolist())
        assert len(nonzero) == 3  # replace=False: exactly c distinct coordinates
        assert nonzero <= ACCEPTED
        np.testing.assert_allclose(out["w"][list(nonzero)], CLIPPED[list(nonzero)])
        assert spend.num_released == 3 and spend.num_passes == 1
        assert not spend.fallback


def test_svt_with_replacement_releases_at_most_c():
    sizes = set()
    for seed in range(30):
        out, _ = svt_filter(
            {"w": DELTA},
            0.3,
            0.1,
            0.25,
            0.04,
            rng=np.random.default_rng(seed),
            replace=True,
            laplace=zero_laplace,
        )
        nonzero = set(np.flatnonzero(out["w"]).tolist())
        assert nonzero <= ACCEPTED
        sizes.add(len(nonzero))
    assert max(sizes) <= 3 and min(sizes) < 3


def test_svt_odometer_arithmetic():
    _, spend = svt_filter(
        {"w": DELTA}, 0.3, 0.1, 0.25, 0.04, release_epsilon=0.5, laplace=zero_laplace
    )
    c = 3
    eps_thr = 0.1 / (1 + (2 * c) ** (2 / 3))
    assert spend.epsilon_threshold == pytest.approx(eps_thr)
    assert spend.epsilon_query == pytest.approx(0.1 - eps_thr)
    assert spend.epsilon_release == pytest.approx(0.5)
    assert spend.epsilon == pytest.approx(0.6)
    # default release budget: 0.1 per released value
    _, spend = svt_filter({"w": DELTA}, 0.3, 0.1, 0.25, 0.04, laplace=zero_laplace)
    assert spend.epsilon == pytest.approx(0.1 + 0.3)


def test_svt_structure_with_real_noise_and_seeded_repeat():
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(0, 0.1, (20, 30)), "b": rng.normal(0, 0.1, 50)}
    kwargs = {"share": 0.1, "epsilon": 1.0, "gamma": 0.2, "tau": 0.1, "steps": 4}
    out, spend = svt_filter(delta, **kwargs, rng=np.random.default_rng(7))
    again, _ = svt_filter(delta, **kwargs, rng=np.random.default_rng(7))
    other, _ = svt_filter(delta, **kwargs, rng=np.random.default_rng(8))
    c = spend.num_released
    assert c == 65
    nonzero = sum(np.count_nonzero(v) for v in out.values())
    assert 0 < nonzero <= c
    for key in delta:
        assert out[key].shape == delta[key].shape
        np.testing.assert_array_equal(out[key], again[key])
    assert any(not np.array_equal(out[k], other[k]) for k in delta)

    # without release noise the released values are the clipped per-step update
    out, _ = svt_filter(
        delta, **kwargs, release_epsilon=float("inf"), rng=np.random.default_rng(7)
    )
    for key in delta:
        idx = np.flatnonzero(out[key])
        expected = np.clip(delta[key].ravel()[idx] / 4, -0.2, 0.2) * 4
        np.testing.assert_allclose(out[key].ravel()[idx], expected, atol=1e-12)
        assert np.all(np.abs(out[key]) <= 0.2 * 4 + 1e-12)


def test_svt_real_noise_releases_only_coordinates_that_passed():
    """Record the real Laplace draws and replay the acceptance test independently."""
    rng = np.random.default_rng(11)
    flat = rng.normal(0, 0.1, 400)
    draws = []

    def recording(scale, size):
        values = rng.laplace(0.0, scale, size)
        draws.append(values)
        return values

    gamma, tau = 0.15, 0.12
    out, spend = svt_filter(
        {"w": flat}, 0.05, 2.0, gamma, tau, rng=rng, laplace=recording
    )
    magnitude = np.abs(np.clip(flat, -gamma, gamma))
    threshold = tau + draws[0][0]
    candidates, passed = np.arange(flat.size), set()
    for noise in draws[1 : 1 + spend.num_passes]:
        above = magnitude[candidates] + noise >= threshold
        passed |= set(candidates[above].tolist())
        candidates = candidates[~above]
    released = set(np.flatnonzero(out["w"]).tolist())
    assert released <= passed
    assert len(released) <= spend.num_released == 20
    assert len(draws) == 2 + spend.num_passes  # threshold, passes, release


def test_svt_pass_guard_accepts_top_magnitudes(caplog):
    out, spend = svt_filter(
        {"w": DELTA},
        0.3,
        0.1,
        gamma=0.25,
        tau=10.0,  # nothing ever passes without noise
        max_passes=5,
        laplace=zero_laplace,
    )
    assert spend.fallback and spend.num_passes == 5
    assert set(np.flatnonzero(out["w"]).tolist()) == {0, 3, 9}
    np.testing.assert_allclose(out["w"][[0, 3, 9]], [0.25, -0.25, 0.25])


def test_svt_scalars_only_and_data_driven_defaults():
    out, spend = svt_filter({"s": np.array(2.0)}, 0.1, 1.0)
    assert out["s"] == 2.0 and spend.epsilon == 0.0
    out, spend = svt_filter({"w": DELTA}, 0.3, 1.0, laplace=zero_laplace)
    assert spend.gamma == pytest.approx(np.percentile(np.abs(DELTA), 99))
    assert spend.tau == pytest.approx(
        np.percentile(np.abs(np.clip(DELTA, -spend.gamma, spend.gamma)), 70)
    )
    assert np.count_nonzero(out["w"]) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"share": 0.0},
        {"epsilon": 0.0},
        {"epsilon": float("inf")},
        {"gamma": -0.1},
        {"tau": -1.0},
        {"release_epsilon": 0.0},
        {"steps": -1},
        {"max_passes": 0},
        {"max_passes": 1.5},
    ],
)
def test_svt_invalid_parameters_raise(kwargs):
    args = {"share": 0.1, "epsilon": 1.0, "gamma": 0.1, "tau": 0.0, **kwargs}
    with pytest.raises(ValueError):
        svt_filter({"w": DELTA}, **args)


def test_mod_constructors_validate():
    with pytest.raises(ValueError):
        PercentilePrivacyMod(share=0.0)
    with pytest.raises(ValueError):
        PercentilePrivacyMod(gamma=-1.0)
    with pytest.raises(ValueError):
        SVTPrivacyMod(share=2.0)
    with pytest.raises(ValueError):
        SVTPrivacyMod(epsilon=0.0)


# ----------------------------------------------------------------------------------
# Mods on real Messages
# ----------------------------------------------------------------------------------


def global_arrays():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=4).astype(np.float32),
        "bn.num_batches_tracked": np.array(10, dtype=np.int64),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float64),
    }


def local_arrays(global_, scale=0.05):
    rng = np.random.default_rng(1)
    out = {}
    for key, value in global_.items():
        if np.issubdtype(value.dtype, np.floating):
            step = rng.normal(scale=scale, size=value.shape)
            out[key] = (value + step).astype(value.dtype)
        else:
            out[key] = value + 3
    return out


def to_record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def train_message(arrays, config=None, message_type="train"):
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "config": ConfigRecord({"server-round": 1, **(config or {})}),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=message_type)


def context():
    return Context(
        run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={}
    )


def client(arrays, metrics=None):
    """A ClientApp train function replying with fixed arrays and metrics."""

    def call_next(msg, ctxt):
        content = RecordDict(
            {
                "arrays": to_record(arrays),
                "metrics": MetricRecord(
                    {"num-examples": 8, "unit-weight": 1, **(metrics or {})}
                ),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def reply_arrays(reply):
    record = reply.content["arrays"]
    return {k: record[k].numpy() for k in record}


def test_percentile_mod_filters_reply_and_keeps_keys_and_dtypes():
    g, k = global_arrays(), local_arrays(global_arrays())
    mod = PercentilePrivacyMod(share=0.25, gamma=0.05)
    reply = mod(train_message(g), context(), client(k, {"local-steps": 5}))
    assert not reply.has_error()
    out = reply_arrays(reply)
    assert list(out) == list(g)
    assert {n: v.dtype for n, v in out.items()} == {n: v.dtype for n, v in g.items()}
    assert {n: v.shape for n, v in out.items()} == {n: v.shape for n, v in g.items()}
    # integer buffers travel unchanged (the client's value)
    assert out["bn.num_batches_tracked"] == 13
    delta = {
        n: k[n].astype(np.float64) - g[n].astype(np.float64)
        for n in g
        if np.issubdtype(g[n].dtype, np.floating)
    }
    expected = percentile_filter(delta, 0.25, 0.05, steps=5)
    for name in delta:
        np.testing.assert_allclose(
            out[name], (g[name] + expected[name]).astype(g[name].dtype), atol=ATOL
        )
    metrics = reply.content["metrics"]
    assert metrics["shared-fraction"] == pytest.approx(0.25, abs=0.02)
    assert metrics["num-examples"] == 8


def test_mods_pass_error_replies_and_other_messages_through():
    g = global_arrays()
    error_reply = None

    def failing(msg, ctxt):
        nonlocal error_reply
        error_reply = Message(Error(code=0, reason="boom"), reply_to=msg)
        return error_reply

    for mod in (PercentilePrivacyMod(), SVTPrivacyMod(gamma=0.1, tau=0.01)):
        assert mod(train_message(g), context(), failing) is error_reply
        msg = train_message(g, message_type="evaluate")
        reply = mod(msg, context(), client(local_arrays(g)))
        np.testing.assert_array_equal(
            reply_arrays(reply)["conv.bias"], local_arrays(g)["conv.bias"]
        )


def test_mod_reports_key_mismatch_and_nan_as_error_replies():
    g = global_arrays()
    k = local_arrays(g)
    del k["head.weight"]
    reply = PercentilePrivacyMod()(train_message(g), context(), client(k))
    assert reply.has_error() and "head.weight" in reply.error.reason
    k = local_arrays(g)
    k["conv.bias"][0] = np.nan
    reply = PercentilePrivacyMod()(train_message(g), context(), client(k))
    assert reply.has_error() and "conv.bias" in reply.error.reason


def test_svt_mod_odometer_accumulates_in_context_state():
    g, k = global_arrays(), local_arrays(global_arrays())
    mod = SVTPrivacyMod(share=0.1, epsilon=0.5, gamma=0.05, tau=0.02, seed=3)
    ctxt = context()
    n = sum(v.size for v in g.values() if v.dtype.kind == "f")
    c = num_released(0.1, n)
    per_round = 0.5 + 0.1 * c
    for round_ in (1, 2):
        msg = train_message(g, {"server-round": round_})
        reply = mod(msg, ctxt, client(k))
        assert not reply.has_error()
        metrics = reply.content["metrics"]
        assert metrics["svt-epsilon"] == pytest.approx(round_ * per_round)
        assert 0 < metrics["shared-fraction"] <= c / n
        assert mod.spent(ctxt) == pytest.approx(round_ * per_round)
        assert ctxt.state["svt-privacy"]["calls"] == round_
        out = reply_arrays(reply)
        assert {n: v.dtype for n, v in out.items()} == {
            n: v.dtype for n, v in g.items()
        }
    # the seed makes a (node, round) repeat exactly
    first = mod(train_message(g), context(), client(k))
    second = mod(train_message(g), context(), client(k))
    for name in g:
        np.testing.assert_array_equal(
            reply_arrays(first)[name], reply_arrays(second)[name]
        )


def test_safe_fixedclipping_mod_clips_and_survives_a_zero_update():
    g = {"w": np.zeros(2, dtype=np.float64)}
    msg = train_message(g, {"clipping_norm": 1.0})
    reply = safe_fixedclipping_mod(msg, context(), client({"w": np.array([3.0, 4.0])}))
    np.testing.assert_allclose(reply_arrays(reply)["w"], [0.6, 0.8], atol=ATOL)
    # Flower's own mod divides by the update norm
    with pytest.raises(ZeroDivisionError):
        fixedclipping_mod(msg, context(), client(g))
    reply = safe_fixedclipping_mod(msg, context(), client(g))
    assert not reply.has_error()
    np.testing.assert_array_equal(reply_arrays(reply)["w"], [0.0, 0.0])
    reply = safe_fixedclipping_mod(msg, context(), client({"w": np.array([np.nan, 1])}))
    assert reply.has_error() and "'w'" in reply.error.reason


def test_mods_compose_in_a_client_app_with_clipping_outermost():
    # no integer buffer here: Flower's clip turns a 0-d int update into a float
    g = {k: v for k, v in global_arrays().items() if v.dtype.kind == "f"}
    k = local_arrays(g, scale=1.0)
    app = ClientApp(mods=[safe_fixedclipping_mod, PercentilePrivacyMod(share=0.2)])

    @app.train()
    def train(msg, ctxt):
        return client(k, {"local-steps": 3})(msg, ctxt)

    msg = train_message(g, {"clipping_norm": 0.5})
    reply = app(msg, context())
    assert not reply.has_error()
    out = reply_arrays(reply)
    assert {n: v.dtype for n, v in out.items()} == {n: v.dtype for n, v in g.items()}
    update = np.concatenate([(out[n] - g[n]).ravel() for n in g])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-4)
    assert np.mean(update != 0) == pytest.approx(0.2, abs=0.02)
    assert reply.content["metrics"]["shared-fraction"] == pytest.approx(0.2, abs=0.02)


def test_percentile_filter_keeps_exactly_the_share_when_magnitudes_tie():
    # Adam-like update: every coordinate moved by +-lr; NVFlare's percentile cut
    # would keep them all (ties at the cut), "share=0.1" must send 10 of 100
    rng = np.random.default_rng(0)
    delta = {"w": (rng.choice([-1.0, 1.0], size=(10, 10)) * 1e-3).astype(np.float32)}
    out = percentile_filter(delta, share=0.1, gamma=1.0)
    assert np.count_nonzero(out["w"]) == 10
    kept = out["w"] != 0
    np.testing.assert_array_equal(out["w"][kept], delta["w"][kept])

"""Update compression: kernels, the site mod and the server-side decoder."""

import logging

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
from flwr.serverapp.strategy import FedAvg

from flower_medimg.core import compression as cmp
from flower_medimg.core import protocol
from flower_medimg.privacy.compression_mod import STATE_RESIDUAL, CompressionMod
from flower_medimg.strategies.compressed import DecompressUpdates

W = "conv.weight"


@pytest.fixture
def flwr_log(caplog):
    """Capture Flower's logger whether or not it propagates to the root logger."""
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------


def test_fp16_round_trip_within_stated_bound():
    x = np.array([1 / 3, 1000.1, -2e-6, 0.0, -65504.0, 1e-9])
    enc = cmp.encode_fp16(x)
    assert enc.data.dtype == np.float16 and enc.side == {}
    out = cmp.decode_fp16(enc.data, x.shape, W)
    assert out.shape == x.shape
    assert np.all(np.abs(out - x) <= np.maximum(2.0**-11 * np.abs(x), 2.0**-25))


@pytest.mark.parametrize("bad", [65520.0, np.inf, np.nan])
def test_fp16_refuses_overflow_and_non_finite(bad):
    with pytest.raises(ValueError):
        cmp.encode_fp16(np.array([1.0, bad]))


def test_int8_hand_example():
    np.random.seed(0)
    x = np.array([0.5, -1.27, 0.0])
    enc = cmp.encode_int8(x)
    np.testing.assert_array_equal(enc.data, np.array([50, -127, 0], np.int8))
    assert enc.side["scale"].dtype == np.float32 and enc.side["scale"].shape == (1,)
    scale = float(enc.side["scale"][0])
    assert scale == pytest.approx(0.01, rel=1e-6) and 127 * scale >= 1.27  # rounded up
    out = cmp.decode_int8(enc.data, enc.side["scale"], (3,), W)
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_int8_is_unbiased_and_within_one_scale():
    np.random.seed(1)
    row = np.array([0.3, -1.0, 0.0123, 0.77])
    x = np.tile(row, (4000, 1))  # one tensor: one scale, 4000 draws per value
    enc = cmp.encode_int8(x)
    scale = float(enc.side["scale"][0])
    assert scale == pytest.approx(1.0 / 127, rel=1e-6)
    out = cmp.decode_int8(enc.data, enc.side["scale"], x.shape, W)
    assert np.all(np.abs(out - x) <= scale * (1 + 1e-6))
    # stochastic rounding: std <= scale / 2, so 4 sigma of the mean of 4000 draws
    np.testing.assert_allclose(out.mean(axis=0), row, atol=4 * scale / 2 / 63)
    assert len(np.unique(out[:, 0])) == 2  # 0.3 is not on the grid: rounded both ways


def test_int8_all_zero_tensor_has_scale_zero():
    enc = cmp.encode_int8(np.zeros((2, 2)))
    assert enc.side["scale"][0] == 0 and not enc.data.any()
    np.testing.assert_array_equal(
        cmp.decode_int8(enc.data, enc.side["scale"], (2, 2), W), np.zeros((2, 2))
    )


def test_topk_keeps_k_largest_and_residual_carries_the_rest():
    # round 1: k = ceil(0.5 * 4) = 2 -> 3 and 2 are sent, -1 and 0.5 kept back
    r1 = cmp.encode_topk(np.array([3.0, -1.0, 2.0, 0.5]), None, 0.5)
    np.testing.assert_array_equal(r1.side["indices"], np.array([0, 2], np.int32))
    np.testing.assert_array_equal(r1.data, np.array([3.0, 2.0], np.float32))
    np.testing.assert_allclose(r1.residual, [0.0, -1.0, 0.0, 0.5])
    # round 2: the -1 dropped in round 1 (now -1.2) and the 0.5 (now 0.7) are sent
    r2 = cmp.encode_topk(np.array([0.1, -0.2, 0.1, 0.2]), r1.residual, 0.5)
    np.testing.assert_array_equal(r2.side["indices"], [1, 3])
    np.testing.assert_allclose(r2.data, [-1.2, 0.7], rtol=1e-7)
    np.testing.assert_allclose(r2.residual, [0.1, 0.0, 0.1, 0.0], atol=1e-7)
    out = cmp.decode_topk(r2.data, r2.side["indices"], (2, 2), W, max_count=2)
    np.testing.assert_allclose(out, [[0.0, -1.2], [0.0, 0.7]], rtol=1e-7)


def test_topk_count():
    assert cmp.topk_count(30, 0.1) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    assert cmp.topk_count(10, 0.15) == 2
    assert cmp.topk_count(1000, 1e-9) == 1
    assert cmp.topk_count(0, 0.5) == 0
    assert cmp.topk_count(7, 1.0) == 7


def test_payload_bytes():
    assert cmp.payload_bytes([np.zeros(3, np.int8), np.zeros(2, np.float32)]) == 11


F32, I32 = np.float32, np.int32
HOSTILE = {
    "fp16 dtype": lambda: cmp.decode_fp16(np.zeros(4, F32), (4,), W),
    "fp16 length": lambda: cmp.decode_fp16(np.zeros(5, np.float16), (4,), W),
    "fp16 nan": lambda: cmp.decode_fp16(np.array([np.nan] * 4, np.float16), (4,), W),
    "int8 dtype": lambda: cmp.decode_int8(np.zeros(4, I32), np.ones(1, F32), (4,), W),
    "int8 length": lambda: cmp.decode_int8(
        np.zeros(3, np.int8), np.ones(1, F32), (4,), W
    ),
    "int8 -128": lambda: cmp.decode_int8(
        np.array([-128, 0, 0, 0], np.int8), np.ones(1, F32), (4,), W
    ),
    "scale nan": lambda: cmp.decode_int8(
        np.zeros(4, np.int8), np.array([np.nan], F32), (4,), W
    ),
    "scale negative": lambda: cmp.decode_int8(
        np.zeros(4, np.int8), np.array([-1.0], F32), (4,), W
    ),
    "scale float64": lambda: cmp.decode_int8(np.zeros(4, np.int8), np.ones(1), (4,), W),
    "scale shape": lambda: cmp.decode_int8(
        np.zeros(4, np.int8), np.ones(2, F32), (4,), W
    ),
    "topk out of range": lambda: cmp.decode_topk(
        np.ones(2, F32), np.array([0, 4], I32), (4,), W
    ),
    "topk negative": lambda: cmp.decode_topk(
        np.ones(2, F32), np.array([-1, 2], I32), (4,), W
    ),
    "topk duplicate": lambda: cmp.decode_topk(
        np.ones(2, F32), np.array([1, 1], I32), (4,), W
    ),
    "topk unsorted": lambda: cmp.decode_topk(
        np.ones(2, F32), np.array([2, 1], I32), (4,), W
    ),
    "topk too many": lambda: cmp.decode_topk(
        np.ones(3, F32), np.array([0, 1, 2], I32), (4,), W, max_count=2
    ),
    "topk more than size": lambda: cmp.decode_topk(
        np.ones(5, F32), np.arange(5, dtype=I32), (4,), W
    ),
    "topk values nan": lambda: cmp.decode_topk(
        np.array([np.nan], F32), np.array([0], I32), (4,), W
    ),
    "topk values float64": lambda: cmp.decode_topk(
        np.ones(1), np.array([0], I32), (4,), W
    ),
    "topk indices int64": lambda: cmp.decode_topk(
        np.ones(1, F32), np.array([0]), (4,), W
    ),
    "topk length mismatch": lambda: cmp.decode_topk(
        np.ones(2, F32), np.array([0], I32), (4,), W
    ),
    "missing side data": lambda: cmp.decode("int8", np.zeros(4, np.int8), {}, (4,), W),
    "none codec": lambda: cmp.decode("none", np.zeros(4, F32), {}, (4,), W),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payload_is_refused_naming_the_key(case):
    with pytest.raises(ValueError, match=f"'{W}"):
        HOSTILE[case]()


@pytest.mark.parametrize(
    ("codec", "fraction"), [("zip", 0.1), ("topk", 0.0), ("topk", 1.5), ("int8", True)]
)
def test_invalid_settings_are_refused(codec, fraction):
    with pytest.raises(ValueError, match="codec|fraction"):
        CompressionMod(codec, fraction)
    with pytest.raises(ValueError, match="codec|fraction"):
        DecompressUpdates(FedAvg(), codec, fraction)


def test_unknown_codec_message_lists_the_valid_ones():
    with pytest.raises(ValueError, match="fp16.*int8.*topk"):
        CompressionMod("zip")


# ----------------------------------------------------------------------------------
# the site mod
# ----------------------------------------------------------------------------------


def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def numpy_of(rec):
    return {k: rec[k].numpy() for k in rec}


def train_message(arrays, config=None, message_type="train", dst=1):
    content = RecordDict(
        {
            "arrays": record(arrays),
            "config": ConfigRecord({"server-round": 1, **(config or {})}),
        }
    )
    return Message(content=content, dst_node_id=dst, message_type=message_type)


def context(node_id=5):
    return Context(
        run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={}
    )


def client(arrays, num_examples=8):
    """A ClientApp train function replying with fixed arrays."""

    def call_next(msg, ctxt):
        content = RecordDict(
            {
                "arrays": record(arrays),
                "metrics": MetricRecord({"num-examples": num_examples}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


GLOBAL = {
    W: np.array([[0.1, -0.2], [0.3, 0.0]], np.float32),
    "bn.num_batches_tracked": np.array(7, np.int64),
}
LOCAL = {
    W: np.array([[0.6, -1.47], [0.3, 0.1]], np.float32),
    "bn.num_batches_tracked": np.array(9, np.int64),
}


def test_int8_mod_wire_format():
    reply = CompressionMod("int8")(train_message(GLOBAL), context(), client(LOCAL))
    arrays = numpy_of(reply.content["arrays"])
    assert arrays[W].dtype == np.int8 and arrays[W].shape == (2, 2)
    assert arrays["bn.num_batches_tracked"].dtype == np.int64
    assert int(arrays["bn.num_batches_tracked"]) == 9  # sent raw
    side = numpy_of(reply.content["codec"])
    assert list(side) == [f"{W}.scale"]
    assert side[f"{W}.scale"].dtype == np.float32
    np.testing.assert_allclose(side[f"{W}.scale"], [1.27 / 127], rtol=1e-6)
    info = reply.content["codec-info"]
    assert info["codec"] == "int8" and info["encoded-keys"] == [W]
    assert reply.content["metrics"]["compressed-bytes"] == 4 + 8 + 4
    assert reply.content["metrics"]["num-examples"] == 8


def test_topk_mod_sends_values_and_indices_and_keeps_residual():
    ctxt = context()
    mod = CompressionMod("topk", fraction=0.5)
    reply = mod(train_message(GLOBAL), ctxt, client(LOCAL))
    values = reply.content["arrays"][W].numpy()
    indices = reply.content["codec"][f"{W}.indices"].numpy()
    assert values.dtype == np.float32 and values.shape == (2,)
    np.testing.assert_array_equal(indices, np.array([0, 1], np.int32))
    np.testing.assert_allclose(values, [0.5, -1.27], rtol=1e-6)
    residual = ctxt.state[STATE_RESIDUAL][W].numpy()
    np.testing.assert_allclose(residual, [[0, 0], [0, 0.1]], atol=1e-7)
    # next round: same global, no training -> the residual 0.1 is what is sent
    reply = mod(train_message(GLOBAL), ctxt, client(GLOBAL))
    indices = list(reply.content["codec"][f"{W}.indices"].numpy())
    assert 3 in indices
    sent = reply.content["arrays"][W].numpy()[indices.index(3)]
    assert sent == pytest.approx(0.1, rel=1e-6)


def test_topk_mod_discards_a_residual_that_does_not_fit(flwr_log):
    ctxt = context()
    ctxt.state[STATE_RESIDUAL] = record({W: np.ones(3, np.float32)})
    reply = CompressionMod("topk", 0.5)(train_message(GLOBAL), ctxt, client(LOCAL))
    assert "residual does not match" in flwr_log.text
    np.testing.assert_allclose(
        reply.content["arrays"][W].numpy(), [0.5, -1.27], rtol=1e-6
    )
    assert ctxt.state[STATE_RESIDUAL][W].numpy().shape == (2, 2)


def test_mod_uses_the_servers_codec_and_refuses_an_invalid_one():
    mod = CompressionMod("int8")
    msg = train_message(GLOBAL, {protocol.CONFIG_CODEC: "fp16"})
    reply = mod(msg, context(), client(LOCAL))
    assert reply.content["arrays"][W].numpy().dtype == np.float16
    assert reply.content["codec-info"]["codec"] == "fp16"
    msg = train_message(GLOBAL, {protocol.CONFIG_CODEC: "zip"})
    reply = mod(msg, context(), client(LOCAL))
    assert reply.has_error() and "zip" in reply.error.reason


def test_fp16_overflow_is_sent_raw_and_decoded():
    big = {**LOCAL, W: np.full((2, 2), 1e5, np.float32)}
    msg = train_message(GLOBAL)
    reply = CompressionMod("fp16")(msg, context(), client(big))
    assert reply.content["arrays"][W].numpy().dtype == np.float32
    assert reply.content["codec-info"]["encoded-keys"] == []
    plain = DecompressUpdates(FedAvg(), "fp16")
    plain.current_arrays = record(GLOBAL)
    decoded = plain.aggregate_train(1, [reply])[0]
    np.testing.assert_array_equal(decoded[W].numpy(), big[W])


def test_mod_passes_other_messages_and_errors_through():
    mod = CompressionMod("int8")
    evaluate = train_message(GLOBAL, message_type="evaluate")
    reply = mod(evaluate, context(), client(LOCAL))
    assert reply.content["arrays"][W].numpy().dtype == np.float32
    assert "codec" not in reply.content

    def failing(msg, ctxt):
        return Message(Error(code=0, reason="boom"), reply_to=msg)

    reply = mod(train_message(GLOBAL), context(), failing)
    assert reply.has_error() and reply.error.reason == "boom"


def test_mod_refuses_a_reply_with_other_keys():
    reply = CompressionMod("int8")(
        train_message(GLOBAL), context(), client({W: LOCAL[W]})
    )
    assert reply.has_error() and "bn.num_batches_tracked" in reply.error.reason


# ----------------------------------------------------------------------------------
# the pair around Flower's FedAvg
# ----------------------------------------------------------------------------------


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3]


def site_model(node_id):
    rng = np.random.default_rng(node_id)
    return {
        W: (GLOBAL[W] + rng.normal(0, 0.1, (2, 2))).astype(np.float32),
        "bias": rng.normal(0, 1, 3).astype(np.float32),
        "bn.num_batches_tracked": np.array(7 + node_id, np.int64),
    }


MODEL = {**GLOBAL, "bias": np.zeros(3, np.float32)}


def compressed_round(codec, fraction=1.0, tamper=None):
    """One round: DecompressUpdates(FedAvg()) -> CompressionMod -> sites."""
    server = DecompressUpdates(FedAvg(), codec, fraction)
    messages = list(
        server.configure_train(1, record(MODEL), ConfigRecord(), FakeGrid())
    )
    mod = CompressionMod("none")  # the server's codec wins
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        reply = mod(msg, context(node), client(site_model(node), 10 * node))
        if tamper is not None and node == 2:
            tamper(reply)
        replies.append(reply)
    return server.aggregate_train(1, replies)[0]


def plain_fedavg(nodes=(1, 2, 3)):
    msg = train_message(MODEL)
    replies = [client(site_model(n), 10 * n)(msg, None) for n in nodes]
    return numpy_of(FedAvg().aggregate_train(1, replies)[0])


def codec_error(codec, key, nodes=(1, 2, 3)):
    """The stated per-value error bound of ``codec``, over the sites' updates."""
    largest = max(np.abs(site_model(n)[key] - MODEL[key]).max() for n in nodes)
    bound = {"fp16": 2.0**-11 * largest, "int8": largest / 127}.get(codec, 0.0)
    return bound + 1e-6  # float32 rounding of the aggregate


@pytest.mark.parametrize("codec", cmp.CODECS)
def test_pair_matches_plain_fedavg_within_the_codec_error(codec):
    out = numpy_of(compressed_round(codec))
    expected = plain_fedavg()
    assert out.keys() == expected.keys()
    for key in (W, "bias"):
        atol = codec_error(codec, key)
        np.testing.assert_allclose(out[key], expected[key], atol=atol, rtol=0)
    np.testing.assert_allclose(
        out["bn.num_batches_tracked"], expected["bn.num_batches_tracked"]
    )


def test_configure_train_names_the_codec_and_delegates_attributes():
    server = DecompressUpdates(FedAvg(fraction_train=0.5), "topk", 0.25)
    assert vars(server)["strategy"].fraction_train == 0.5
    server.fraction_train = 1.0
    assert server.strategy.fraction_train == 1.0 and "fraction_train" not in vars(
        server
    )
    config = ConfigRecord({"lr": 0.1})
    messages = list(server.configure_train(1, record(MODEL), config, FakeGrid()))
    sent = messages[0].content["config"]
    assert (
        sent[protocol.CONFIG_CODEC] == "topk" and sent[protocol.CONFIG_FRACTION] == 0.25
    )
    assert sent["lr"] == 0.1 and protocol.CONFIG_CODEC not in config


def _set_side(name, value):
    def tamper(reply):
        reply.content["codec"][f"{W}.{name}"] = Array(value)

    return tamper


def _set_payload(value):
    def tamper(reply):
        reply.content["arrays"][W] = Array(value)

    return tamper


def _drop_record(name):
    def tamper(reply):
        del reply.content[name]

    return tamper


def _set_info(key, value):
    def tamper(reply):
        reply.content["codec-info"][key] = value

    return tamper


TAMPERED = {
    "scale nan": ("int8", _set_side("scale", np.array([np.nan], F32)), W),
    "scale huge": ("int8", _set_side("scale", np.array([3e38], F32)), W),
    "payload float32": ("int8", _set_payload(np.zeros((2, 2), F32)), W),
    "payload long": ("fp16", _set_payload(np.zeros(5, np.float16)), W),
    "indices out of range": ("topk", _set_side("indices", np.array([0, 9], I32)), W),
    "indices duplicated": ("topk", _set_side("indices", np.array([1, 1], I32)), W),
    "missing side data": ("int8", _drop_record("codec"), W),
    "missing codec-info": ("int8", _drop_record("codec-info"), "codec-info"),
    "wrong codec": ("int8", _set_info("codec", "fp16"), "fp16"),
    "encodes an integer": (
        "int8",
        _set_info("encoded-keys", [W, "bn.num_batches_tracked"]),
        "bn.num",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_hostile_reply_costs_only_itself(case, flwr_log):
    codec, tamper, named = TAMPERED[case]
    fraction = 0.5 if codec == "topk" else 1.0
    out = numpy_of(compressed_round(codec, fraction, tamper))
    assert "node 2" in flwr_log.text and named in flwr_log.text
    if codec != "topk":  # fraction 0.5 sends half the update
        expected = plain_fedavg(nodes=(1, 3))
        for key in (W, "bias"):
            atol = codec_error(codec, key, nodes=(1, 3))
            np.testing.assert_allclose(out[key], expected[key], atol=atol, rtol=0)
    assert "received 2 results and 1 failures" in flwr_log.text.lower()


# ----------------------------------------------------------------------------------
# downlink: the global model as float16
# ----------------------------------------------------------------------------------


def test_narrow_model_halves_float32_and_keeps_the_rest():
    model = {
        "w": np.array([0.1, -3.0], np.float32),
        "big": np.array([1e6], np.float32),
        "n": np.array(4, np.int64),
    }
    narrow = cmp.narrow_model(model)
    assert narrow["w"].dtype == np.float16 and narrow["big"].dtype == np.float32
    assert narrow["n"].dtype == np.int64
    wide = cmp.widen_model(narrow)
    assert {k: v.dtype for k, v in wide.items()} == {
        k: v.dtype for k, v in model.items()
    }
    np.testing.assert_allclose(wide["w"], model["w"], rtol=2.0**-11)


def test_the_site_sees_float32_arrays_of_a_float16_downlink():
    seen = {}

    def evaluate(msg, ctxt):
        seen.update(numpy_of(msg.content["arrays"]))
        return Message(
            RecordDict({"metrics": MetricRecord({"dice": 0.5})}), reply_to=msg
        )

    narrow = cmp.narrow_model(MODEL)
    msg = train_message(
        narrow, {protocol.CONFIG_DOWNLINK: "fp16"}, message_type="evaluate"
    )
    CompressionMod("none")(msg, context(), evaluate)
    assert seen[W].dtype == np.float32 and seen["bias"].dtype == np.float32
    assert seen["bn.num_batches_tracked"].dtype == np.int64
    bad = train_message(
        MODEL, {protocol.CONFIG_DOWNLINK: "zip"}, message_type="evaluate"
    )
    reply = CompressionMod("none")(bad, context(), evaluate)
    assert reply.has_error() and "unknown downlink 'zip'" in reply.error.reason


def test_a_float16_downlink_round_matches_plain_fedavg_within_int8_error():
    server = DecompressUpdates(FedAvg(), "int8", downlink="fp16")
    messages = list(
        server.configure_train(1, record(MODEL), ConfigRecord(), FakeGrid())
    )
    sent = messages[0].content["arrays"]
    assert (
        sent[W].dtype == "float16" and sent["bn.num_batches_tracked"].dtype == "int64"
    )
    assert messages[0].content["config"][protocol.CONFIG_DOWNLINK] == "fp16"
    mod = CompressionMod("int8")
    replies = [
        mod(
            m,
            context(m.metadata.dst_node_id),
            client(site_model(m.metadata.dst_node_id), 10 * m.metadata.dst_node_id),
        )
        for m in messages
    ]
    out = numpy_of(server.aggregate_train(1, replies)[0])
    expected = plain_fedavg()
    for key in (W, "bias"):
        # the update is taken against the float16-rounded model the sites received
        np.testing.assert_allclose(
            out[key], expected[key], atol=codec_error("int8", key) + 2e-3, rtol=0
        )
    evaluate = list(
        server.configure_evaluate(1, record(MODEL), ConfigRecord(), FakeGrid())
    )
    assert evaluate[0].content["arrays"][W].dtype == "float16"

"""CKKS homomorphic FedAvg: kernels, context files, the site mod and the strategy."""

import logging
import stat

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
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx
from reply_messages import train_reply

pytest.importorskip("tenseal")

from flower_medimg.core import homomorphic as he  # noqa: E402
from flower_medimg.privacy.homomorphic_mod import HomomorphicEncryptionMod  # noqa: E402
from flower_medimg.strategies import FastFedAvg, QualityGate  # noqa: E402
from flower_medimg.strategies.homomorphic import HomomorphicFedAvg  # noqa: E402

ATOL = 1e-3
W, B, STEPS = "conv.weight", "conv.bias", "bn.num_batches_tracked"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """One provisioning (degree 8192) for the whole module: secret, public path."""
    return he.provision_contexts(tmp_path_factory.mktemp("he"))


@pytest.fixture(scope="module")
def contexts(keys):
    secret = he.load_secret_context(keys[0])
    public = he.load_public_context(keys[1])
    return secret, public, he.layout_of(secret)


@pytest.fixture
def flwr_log(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3]


def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def context(node_id):
    return Context(
        run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={}
    )


# ---- kernels and context files -----------------------------------------------------


def test_encrypted_weighted_mean_matches_plaintext_by_hand(contexts):
    secret, public, layout = contexts
    a, b = np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0, 7.0])
    site_a = he.encrypt_array(secret, layout, a, factor=1)
    site_b = he.encrypt_array(secret, layout, b, factor=3)
    chunks = [he.validate_chunks(public, layout, c, 3) for c in (site_a, site_b)]
    total = he.add_and_scale(public, layout, chunks, [1 / 4, 1 / 4])
    # (1 * [1, 2, 3] + 3 * [5, 6, 7]) / 4
    mean = he.decrypt_array(secret, layout, total, (3,))
    np.testing.assert_allclose(mean, [4.0, 5.0, 6.0], atol=ATOL)
    capped = he.add_and_scale(public, layout, chunks, [0.5, 0.5 / 3])  # shares 1/2
    np.testing.assert_allclose(
        he.decrypt_array(secret, layout, capped, (3,)), [3.0, 4.0, 5.0], atol=ATOL
    )


def test_many_chunks_and_shapes_round_trip(contexts):
    secret, public, layout = contexts
    values = np.random.default_rng(0).normal(size=(3, layout.slots - 7))
    packed = he.encrypt_array(secret, layout, values)
    assert len(he.validate_chunks(public, layout, packed, values.size)) == 3
    back = he.decrypt_array(secret, layout, packed, values.shape)
    assert back.dtype == np.float32 and back.shape == values.shape
    np.testing.assert_allclose(back, values, atol=ATOL)
    with pytest.raises(ValueError, match="chunks, expected"):
        he.decrypt_array(secret, layout, packed, (2,))


def test_server_context_cannot_decrypt(contexts):
    secret, public, layout = contexts
    packed = he.encrypt_array(secret, layout, np.ones(4))
    assert not public.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        he.decrypt_array(public, layout, packed, (4,))


def test_context_files_are_private_and_loaders_check_them(keys, tmp_path):
    secret, public = keys
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="holds the secret key"):
        he.load_public_context(secret)
    with pytest.raises(ValueError, match="holds no secret key"):
        he.load_secret_context(public)
    with pytest.raises(ValueError, match="cannot read"):
        he.load_secret_context(tmp_path / "missing.ctx")
    garbage = tmp_path / "garbage.ctx"
    garbage.write_bytes(b"not a context")
    with pytest.raises(ValueError, match="garbage.ctx is not a serialised TenSEAL"):
        he.load_public_context(garbage)


def test_ciphertext_under_another_key_is_refused(contexts, tmp_path):
    secret, _, layout = contexts
    other = he.create_context()
    packed = he.encrypt_array(other, he.layout_of(other), np.ones(3))
    with pytest.raises(ValueError, match="another public key"):
        he.decrypt_array(secret, layout, packed, (3,))


# ---- the site mod --------------------------------------------------------------------


GLOBAL = {
    W: np.array([[0.1, -0.2], [0.3, 0.0]], np.float32),
    B: np.array([0.5, -0.5, 1.0], np.float32),
    STEPS: np.array(7, np.int64),
}


def local_model(node_id, received):
    """A site's training: a fixed, node-dependent step from the received model."""
    rng = np.random.default_rng(node_id)
    return {
        W: received[W] + rng.normal(0, 0.1, (2, 2)).astype(np.float32),
        B: received[B] + rng.normal(0, 0.1, 3).astype(np.float32),
        STEPS: np.asarray(received[STEPS] + node_id, np.int64),
    }


def client(seen=None):
    """A ClientApp train function: trains ``local_model`` on what it receives."""

    def call_next(msg, ctxt):
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        if seen is not None:
            seen.append(received)
        content = RecordDict(
            {
                "arrays": record(local_model(ctxt.node_id, received)),
                "metrics": MetricRecord({"num-examples": 10 * ctxt.node_id}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def train_message(arrays, dst=1):
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": 1})}
    )
    return Message(content=content, dst_node_id=dst, message_type="train")


def test_mod_encrypts_weighted_float_arrays_and_keeps_ints(keys, contexts):
    secret, _, layout = contexts
    mod = HomomorphicEncryptionMod(keys[0])
    reply = mod(train_message(record(GLOBAL)), context(2), client())
    arrays = reply.content["arrays"]
    assert set(arrays) == {f"{W}.ckks", f"{W}.ckks-shape", f"{B}.ckks"} | {
        f"{B}.ckks-shape",
        STEPS,
    }
    assert arrays[f"{W}.ckks"].dtype == "uint8"
    assert arrays[f"{W}.ckks-shape"].numpy().tolist() == [2, 2]
    assert reply.content["metrics"]["num-examples"] == 20
    weighted = he.decrypt_array(secret, layout, arrays[f"{W}.ckks"].numpy(), (2, 2))
    np.testing.assert_allclose(weighted, 20 * local_model(2, GLOBAL)[W], atol=ATOL)
    assert int(arrays[STEPS].numpy()) == 9


def test_mod_key_prefixes_select_what_is_encrypted(keys):
    mod = HomomorphicEncryptionMod(keys[0], keys=["conv.w"])
    reply = mod(train_message(record(GLOBAL)), context(1), client())
    assert set(reply.content["arrays"]) == {f"{W}.ckks", f"{W}.ckks-shape", B, STEPS}


def test_mod_refuses_the_public_context(keys):
    with pytest.raises(ValueError, match="holds no secret key"):
        HomomorphicEncryptionMod(keys[1])


def test_site_with_another_key_replies_an_error_naming_the_array(keys, tmp_path):
    other_secret, _ = he.provision_contexts(tmp_path)
    reply = HomomorphicEncryptionMod(keys[0])(
        train_message(record(GLOBAL)), context(1), client()
    )
    stranger = HomomorphicEncryptionMod(other_secret)
    answer = stranger(train_message(reply.content["arrays"]), context(2), client())
    assert answer.has_error()
    assert f"cannot decrypt array '{W}'" in answer.error.reason
    assert "another public key" in answer.error.reason


def test_site_gets_an_error_reply_for_a_malformed_ciphertext(keys):
    reply = HomomorphicEncryptionMod(keys[0])(
        train_message(record(GLOBAL)), context(1), client()
    )
    arrays = reply.content["arrays"]
    arrays[f"{B}.ckks"] = Array(arrays[f"{B}.ckks"].numpy()[:-100].copy())
    answer = HomomorphicEncryptionMod(keys[0])(
        train_message(arrays), context(2), client()
    )
    assert answer.has_error() and f"cannot decrypt array '{B}'" in answer.error.reason


# ---- the strategy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [QualityGate(FedAvg()), FedMedian(), FastFedAvg(max_update_norm=1.0)],
    ids=["gate", "median", "norm-check"],
)
def test_strategies_that_read_updates_are_refused(keys, strategy):
    with pytest.raises(ValueError, match="cannot wrap"):
        HomomorphicFedAvg(strategy, keys[1])


def test_server_refuses_the_secret_context(keys):
    with pytest.raises(ValueError, match="holds the secret key"):
        HomomorphicFedAvg(FedAvg(), keys[0])


def _site_replies(mod, messages):
    return [mod(msg, context(msg.metadata.dst_node_id), client()) for msg in messages]


def test_malformed_ciphertext_reply_is_dropped_and_round_goes_on(
    keys, contexts, flwr_log
):
    mod = HomomorphicEncryptionMod(keys[0])
    server = HomomorphicFedAvg(FedProx(), keys[1])
    messages = list(
        server.configure_train(1, record(GLOBAL), ConfigRecord(), FakeGrid())
    )
    replies = sorted(_site_replies(mod, messages), key=lambda r: r.metadata.src_node_id)
    bad = replies[2].content["arrays"]
    packed = bad[f"{W}.ckks"].numpy().copy()
    packed[-200:] ^= 0xFF  # flip bytes in the last chunk
    bad[f"{W}.ckks"] = Array(packed)
    replies.append(train_reply(9, {"x": np.ones(1)}, {"num-examples": 1}))
    arrays, metrics = server.aggregate_train(1, replies)
    assert metrics["gate-accepted"] == 2 and metrics["gate-rejected"] == 2
    assert f"node 3: encrypted array '{W}'" in flwr_log.text
    assert "node 9: array keys differ" in flwr_log.text
    outcomes = {o.node_id: o for o in server.last_outcomes}
    assert [outcomes[n].accepted for n in (1, 2, 3, 9)] == [True, True, False, False]
    assert outcomes[1].weight == pytest.approx(1 / 3)
    secret, _, layout = contexts
    mean = he.decrypt_array(secret, layout, arrays[f"{W}.ckks"].numpy(), (2, 2))
    expected = (10 * local_model(1, GLOBAL)[W] + 20 * local_model(2, GLOBAL)[W]) / 30
    np.testing.assert_allclose(mean, expected, atol=ATOL)


def test_two_rounds_equal_plaintext_fedavg(keys, contexts):
    mod = HomomorphicEncryptionMod(keys[0])
    server = HomomorphicFedAvg(FedAvg(), keys[1])
    reference = FedAvg()
    encrypted, plain = record(GLOBAL), record(GLOBAL)
    for server_round in (1, 2):
        seen = []
        messages = server.configure_train(
            server_round, encrypted, ConfigRecord(), FakeGrid()
        )
        replies = [
            mod(msg, context(msg.metadata.dst_node_id), client(seen))
            for msg in messages
        ]
        encrypted, _ = server.aggregate_train(server_round, replies)
        if server_round == 2:  # the sites decrypted last round's ciphertext
            for received in seen:
                for key in (W, B):
                    np.testing.assert_allclose(
                        received[key], plain[key].numpy(), atol=ATOL
                    )
        assert not any(k in encrypted for k in (W, B))  # the server holds no plaintext
        plain_replies = [
            train_reply(
                n,
                local_model(n, {k: plain[k].numpy() for k in plain}),
                {"num-examples": 10 * n},
            )
            for n in (1, 2, 3)
        ]
        plain, _ = reference.aggregate_train(server_round, plain_replies)
    secret, _, layout = contexts
    for key in (W, B):
        got = he.decrypt_array(
            secret, layout, encrypted[f"{key}.ckks"].numpy(), GLOBAL[key].shape
        )
        np.testing.assert_allclose(got, plain[key].numpy(), atol=ATOL)
    assert encrypted[STEPS].dtype == "int64"
    assert int(encrypted[STEPS].numpy()) == round(float(plain[STEPS].numpy()))


def test_mod_decrypts_evaluate_messages_and_leaves_the_reply(keys):
    mod = HomomorphicEncryptionMod(keys[0])
    encrypted = mod(train_message(record(GLOBAL)), context(1), client())
    message = train_message(encrypted.content["arrays"])
    message.metadata.message_type = "evaluate"
    seen = []

    def evaluate(msg, ctxt):
        seen.append({k: a.numpy() for k, a in msg.content["arrays"].items()})
        metrics = MetricRecord({"num-examples": 5, "eval-loss": 0.1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    reply = mod(message, context(2), evaluate)
    assert dict(reply.content["metrics"]) == {"num-examples": 5, "eval-loss": 0.1}
    np.testing.assert_allclose(seen[0][W], 10 * local_model(1, GLOBAL)[W], atol=ATOL)
    assert set(seen[0]) == {W, B, STEPS}

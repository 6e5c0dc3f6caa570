"""The ClientApp's train and evaluate handlers on a tiny synthetic site."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from flower_medimg.client_apps import make_client_app
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import site_datasets

TINY = {
    "model.channels": "4,8,16",
    "data.image-size": 32,
    "data.samples-per-site": 16,
    "data.quantity-skew": 0.0,
    "train.batch-size": 4,
    "train.local-epochs": 3,
    "train.lr": 0.01,
}


def _context(config, partition_id=1):
    return Context(
        run_id=1,
        node_id=10 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": 3},
        state=RecordDict(),
        run_config=config,
    )


def _message(arrays, message_type, server_round=1, request=()):
    config = ConfigRecord({"server-round": server_round})
    if request:
        config["request-metrics"] = list(request)
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, dst_node_id=11, message_type=message_type)


@pytest.fixture(scope="module")
def setup():
    config = resolve_settings(overrides=TINY)
    torch.manual_seed(0)
    arrays = ArrayRecord(model_from_settings(config).state_dict())
    return config, arrays


def test_train_reply(setup):
    config, arrays = setup
    app = make_client_app(**TINY)
    losses = ("train-loss-before", "train-loss-after")
    reply = app(_message(arrays, "train", request=losses), _context({}))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    train_ds, _ = site_datasets(config, _context({}).node_config)
    assert metrics["num-examples"] == len(train_ds)  # samples, not batches
    n = len(train_ds)
    batches = n // 4 if n % 4 == 1 else -(-n // 4)  # a last batch of 1 is dropped
    assert metrics["local-steps"] == 3 * batches
    assert metrics["nova-a"] == metrics["local-steps"]
    assert metrics["train-loss-after"] < metrics["train-loss-before"]
    sent = reply.content["arrays"].to_torch_state_dict()
    received = arrays.to_torch_state_dict()
    assert sent.keys() == received.keys()
    assert any(not torch.equal(sent[k], received[k]) for k in sent)


def test_evaluate_reply_metrics_in_range(setup):
    _, arrays = setup
    app = make_client_app(**TINY)
    reply = app(_message(arrays, "evaluate"), _context({}))
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["dice"] <= 1.0
    assert 0.0 <= metrics["hd95"] <= (2 * 32**2) ** 0.5
    assert metrics["num-examples"] > 0


def test_classification_app_reply():
    overrides = {
        **TINY,
        "task": "classification",
        "model.name": "resnet10",
        "model.norm": "batch",
        "model.channels": "4,8,8,16",
        "train.local-epochs": 1,
    }
    config = resolve_settings(overrides=overrides)
    arrays = ArrayRecord(model_from_settings(config).state_dict())
    app = make_client_app(**overrides)
    reply = app(_message(arrays, "evaluate"), _context({}, partition_id=0))
    metrics = reply.content["metrics"]
    for key in ("accuracy", "auroc", "sensitivity", "specificity"):
        assert 0.0 <= metrics[key] <= 1.0
    reply = app(_message(arrays, "train"), _context({}, partition_id=0))
    assert reply.content["metrics"]["num-examples"] > 0


def test_missing_site_folder_is_named(setup):
    _, arrays = setup
    app = make_client_app(**TINY)
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-dir": "/nonexistent/site-a"},
        state=RecordDict(),
        run_config={},
    )
    # Flower's runtime turns the exception into an error reply for the server
    with pytest.raises(FileNotFoundError, match="/nonexistent/site-a"):
        app(_message(arrays, "train"), context)


def test_unknown_run_config_key_names_it(setup):
    _, arrays = setup
    app = make_client_app(**TINY)
    with pytest.raises(KeyError, match="model.nmae"):
        app(_message(arrays, "train"), _context({"model.nmae": "unet"}))


@pytest.mark.parametrize("kind", ["sign-flip", "nan", "free-rider", "mismatched-keys"])
def test_attacking_site_sends_the_attacked_arrays(setup, kind):
    _, arrays = setup
    overrides = {**TINY, "attack.kind": kind, "attack.sites": "1"}
    app = make_client_app(**overrides)
    reply = app(_message(arrays, "train"), _context({}, partition_id=1))
    assert not reply.has_error()
    sent = reply.content["arrays"]
    honest = make_client_app(**TINY)(_message(arrays, "train"), _context({}))
    key = next(iter(honest.content["arrays"].keys()))
    received = arrays[key].numpy()
    trained = honest.content["arrays"][key].numpy()
    if kind == "sign-flip":  # theta_g - 3 (theta_k - theta_g), same local training
        expected = received - 3 * (trained - received)
        assert torch.allclose(
            torch.from_numpy(sent[key].numpy()), torch.from_numpy(expected), atol=1e-5
        )
    elif kind == "nan":
        assert torch.isnan(torch.from_numpy(sent[key].numpy())).all()
    elif kind == "free-rider":
        assert (sent[key].numpy() == received).all()
    else:
        assert set(sent.keys()) != set(arrays.keys())
    # a site not listed in attack.sites trains honestly: it sends what the same
    # site sends without any attack configured
    other = app(_message(arrays, "train"), _context({}, partition_id=2)).content
    clean = make_client_app(**TINY)(
        _message(arrays, "train"), _context({}, partition_id=2)
    ).content
    assert set(other["arrays"].keys()) == set(arrays.keys())
    for name in arrays:
        np.testing.assert_array_equal(
            other["arrays"][name].numpy(), clean["arrays"][name].numpy()
        )

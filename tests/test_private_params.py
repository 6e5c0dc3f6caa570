"""FLOP private heads and FedBN norm layers: key selection and persistence."""

import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.app import _private_state_name
from flower_medimg.client_apps.site_state import SiteState
from flower_medimg.core.models import build_model, model_from_settings
from flower_medimg.core.private_params import private_keys, split_state
from flower_medimg.core.settings import resolve_settings
from flower_medimg.server_app import make_server_app
from flower_medimg.strategies.registry import STRATEGIES


@pytest.mark.parametrize(
    ("task", "name", "head"),
    [
        ("classification", "resnet10", ["fc.weight", "fc.bias"]),
        (
            "classification",
            "densenet121",
            ["class_layers.out.weight", "class_layers.out.bias"],
        ),
        ("segmentation", "basic-unet", ["final_conv.weight", "final_conv.bias"]),
        (
            "segmentation",
            "unet",
            ["model.2.1.conv.unit0.conv.weight", "model.2.1.conv.unit0.conv.bias"],
        ),
    ],
)
def test_head_is_the_last_layer(task, name, head):
    model = build_model(task, name, norm="batch")
    assert private_keys(model, "head") == head


def test_norm_found_by_module_type_not_by_name():
    model = build_model("classification", "densenet121", norm="batch")
    keys = private_keys(model, "norm")
    # DenseNet121's BatchNorm keys have no "bn" in them
    assert "features.norm0.running_mean" in keys
    assert "features.denseblock1.denselayer1.layers.norm1.weight" in keys
    assert "features.norm5.num_batches_tracked" in keys
    assert not any("conv" in k for k in keys)
    both = private_keys(model, "head+norm")
    assert set(both) == set(keys) | {"class_layers.out.weight", "class_layers.out.bias"}


def test_norm_on_unet_without_norm_parameters_is_an_error():
    # MONAI's UNet with InstanceNorm(affine=False) has no normalisation parameters
    from monai.networks.nets import UNet

    model = UNet(2, 1, 2, channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match="selects no parameter of UNet"):
        private_keys(model, "norm")


def test_prefix_rule_and_unknown_prefix():
    model = build_model("classification", "resnet10", norm="batch")
    assert private_keys(model, "fc.,bn1.") == [
        "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "fc.weight", "fc.bias",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="prefix 'head.' matches no key"):
        private_keys(model, "head.")
    assert private_keys(model, "none") == []


def test_split_state_worked_example():
    # spec 1.4: shared enc.w averaged, private fc.w never leaves
    state = {"enc.w": torch.tensor([1.0, 1.0]), "fc.w": torch.tensor([7.0])}
    shared, own = split_state(state, ["fc.w"])
    assert list(shared) == ["enc.w"]
    assert list(own) == ["fc.w"]


def test_site_state_survives_a_restart_in_a_new_process(tmp_path):
    tensors = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}
    context = Context(1, 1, {"state-dir": str(tmp_path)}, RecordDict(), {})
    SiteState(context).save_tensors("private", tensors)
    torch.save(tensors, tmp_path / "expected.pt")
    code = (
        "import torch, sys\n"
        "from flwr.app import Context, RecordDict\n"
        "from flower_medimg.client_apps.site_state import SiteState\n"
        f"ctx = Context(1, 1, {{'state-dir': {str(tmp_path)!r}}}, RecordDict(), {{}})\n"
        "got = SiteState(ctx).load_tensors('private')\n"
        f"want = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert got.keys() == want.keys()\n"
        "assert all(torch.equal(got[k], want[k]) for k in want)\n"
        "print('restored')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "restored" in out.stdout
    # no temporary files are left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.pt", "private.pt"]


TINY_CLS = {
    "task": "classification",
    "model.name": "resnet10",
    "model.norm": "batch",
    "model.channels": "4,8,8,16",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "train.batch-size": 4,
    "private-params": "head",
}


def _train_message(arrays, server_round):
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def test_client_restart_restores_head_and_sends_shared_keys_only(tmp_path):
    config = resolve_settings(overrides=TINY_CLS)
    model = model_from_settings(config)
    head = private_keys(model, "head")
    shared, initial_head = split_state(model.state_dict(), head)
    app = make_client_app(**TINY_CLS)
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}
    context = Context(1, 1, node_config, RecordDict(), {})
    reply = app(_train_message(ArrayRecord(shared), 1), context)
    sent = reply.content["arrays"]
    assert set(sent.keys()) == set(shared)
    stored = SiteState(context).load_tensors(_private_state_name(config))
    assert set(stored) == set(head)
    assert not torch.equal(stored["fc.weight"], initial_head["fc.weight"])

    # a restarted SuperNode: empty context.state, same state-dir
    restarted = Context(1, 1, node_config, RecordDict(), {})
    assert len(restarted.state) == 0
    restored = SiteState(restarted).load_tensors(_private_state_name(config))
    for key in head:
        assert torch.equal(restored[key], stored[key])


def test_wrong_shared_key_set_is_a_clear_error():
    config = resolve_settings(overrides=TINY_CLS)
    full = ArrayRecord(model_from_settings(config).state_dict())  # head included
    app = make_client_app(**TINY_CLS)
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    with pytest.raises(ValueError, match=r"unexpected \['fc.bias', 'fc.weight'\]"):
        app(_train_message(full, 1), context)


class RecordingFedAvg(FedAvg):
    """FedAvg that notes the array keys of every message it sends or receives."""

    seen_keys: set = set()

    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            RecordingFedAvg.seen_keys |= set(message.content["arrays"].keys())
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                RecordingFedAvg.seen_keys |= set(reply.content["arrays"].keys())
        return super().aggregate_train(server_round, replies)


@pytest.mark.slow
def test_flop_simulation_server_never_sees_heads(tmp_path, monkeypatch):
    dump_dir = tmp_path / "heads"
    dump_dir.mkdir()

    def dump_head_mod(msg, context, call_next):
        # test probe: after training, copy what the site keeps in context.state
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            for name in context.state:
                if name.startswith("private-params-"):
                    tensors = context.state[name].to_torch_state_dict()
                    site = context.node_config["partition-id"]
                    torch.save(tensors, dump_dir / f"site-{site}.pt")
        return reply

    monkeypatch.setitem(STRATEGIES, "recording-fedavg", RecordingFedAvg)
    RecordingFedAvg.seen_keys = set()
    config = {
        **TINY_CLS,
        "num-server-rounds": 2,
        "data.num-sites": 3,
        "output-dir": str(tmp_path / "out"),
        "strategy.name": "recording-fedavg",
        "strategy.min-available-nodes": 3,  # every site trains in round 1
        "registry.path": "",  # a test strategy: no resume state to describe
    }
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(mods=[dump_head_mod], **config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    model = model_from_settings(resolve_settings(overrides=config))
    head = private_keys(model, "head")
    assert RecordingFedAvg.seen_keys  # the probe saw the traffic
    assert not RecordingFedAvg.seen_keys & set(head)
    assert RecordingFedAvg.seen_keys == set(model.state_dict()) - set(head)

    initial = model.state_dict()
    heads = [torch.load(dump_dir / f"site-{k}.pt") for k in range(3)]
    for k, site_head in enumerate(heads):
        assert set(site_head) == set(head)
        assert not torch.equal(site_head["fc.weight"], initial["fc.weight"])
        for other in heads[k + 1 :]:
            assert not torch.equal(site_head["fc.weight"], other["fc.weight"])
    (run_dir,) = (tmp_path / "out").iterdir()
    saved = torch.load(run_dir / "global_model.pt")
    assert not set(saved) & set(head)

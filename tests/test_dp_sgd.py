"""DP-SGD at the site: cumulative ε across rounds, the site's budget, MONAI models."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.simulation import run_simulation
from opacus.accountants import RDPAccountant

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.dp_sgd import PrivacyBudgetExceededError
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import site_datasets
from flower_medimg.server_app import make_server_app

DP = {
    "model.channels": "4,8",
    "model.norm": "batch",  # replaced by GroupNorm for Opacus on both sides
    "data.image-size": 32,
    "data.samples-per-site": 16,
    "data.quantity-skew": 0.0,
    "train.batch-size": 4,
    "dp.noise-multiplier": 1.0,
}


def _message(arrays, server_round):
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, dst_node_id=1, message_type="train")


def _site(node_config=None):
    return Context(
        1, 1, {"partition-id": 0, "num-partitions": 2, **(node_config or {})},
        RecordDict(), {},
    )  # fmt: skip


def test_dp_model_has_no_batchnorm_and_server_client_keys_match():
    config = resolve_settings(overrides=DP)
    model = model_from_settings(config)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    reply = make_client_app(**DP)(_message(ArrayRecord(model.state_dict()), 1), _site())
    assert set(reply.content["arrays"].keys()) == set(model.state_dict())
    assert not any(k.startswith("_module.") for k in reply.content["arrays"])


def test_epsilon_is_cumulative_over_rounds():
    config = resolve_settings(overrides=DP)
    arrays = ArrayRecord(model_from_settings(config).state_dict())
    app = make_client_app(**DP)
    context = _site()
    epsilons = []
    for server_round in (1, 2, 3):
        reply = app(_message(arrays, server_round), context)
        epsilons.append(reply.content["metrics"]["dp-epsilon"])
        arrays = reply.content["arrays"]

    train_ds, _ = site_datasets(config, context.node_config)
    lots = -(-len(train_ds) // 4)  # expected lots per epoch: 1 / q
    accountant = RDPAccountant()
    accountant.history = [(1.0, 1 / lots, 3 * lots)]
    assert epsilons[2] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    one_round = RDPAccountant()
    one_round.history = [(1.0, 1 / lots, lots)]
    assert epsilons[0] == pytest.approx(one_round.get_epsilon(1e-5), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]  # not reset each round


def test_site_budget_refuses_the_round_that_would_exceed_it(tmp_path):
    config = resolve_settings(overrides=DP)
    arrays = ArrayRecord(model_from_settings(config).state_dict())
    app = make_client_app(**DP)
    first = app(_message(arrays, 1), _site({"state-dir": str(tmp_path)}))
    spent = first.content["metrics"]["dp-epsilon"]
    # a restarted site with a budget just above what it has spent: next round refused
    context = _site({"state-dir": str(tmp_path), "dp-max-epsilon": spent * 1.01})
    with pytest.raises(PrivacyBudgetExceededError, match="dp-max-epsilon"):
        app(_message(arrays, 2), context)
    history = json.loads((tmp_path / "dp-accountant.json").read_text())
    assert sum(steps for _, _, steps in history) >= 1  # round 1 stays accounted


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.spatial-dims": 3, "data.image-size": 16, "data.samples-per-site": 8},
        {"model.name": "segresnet", "model.channels": "8", "model.norm": "group"},
        {
            "task": "classification",
            "model.name": "densenet121",
            "model.channels": "",
            "data.samples-per-site": 8,
        },
    ],
    ids=["unet-3d", "segresnet-2d", "densenet121-2d"],
)
def test_dp_sgd_trains_monai_networks(overrides):
    settings = {**DP, **overrides}
    config = resolve_settings(overrides=settings)
    model = model_from_settings(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reply = make_client_app(**settings)(
        _message(ArrayRecord(model.state_dict()), 1), _site()
    )
    metrics = reply.content["metrics"]
    assert metrics["dp-epsilon"] > 0
    after = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_budget_stops_one_site_while_the_run_completes(tmp_path):
    def site_budget_mod(msg, context, call_next):
        # emulate the node_config of a site whose operator set a tiny budget
        if context.node_config["partition-id"] == 0:
            context.node_config["dp-max-epsilon"] = 1e-3
        return call_next(msg, context)

    config = {
        **DP,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "data.num-sites": 3,
        "data.samples-per-site": 8,
        "strategy.min-available-nodes": 3,  # round 1 waits for every site
    }
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(mods=[site_budget_mod], **config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "metrics.json").read_text())
    for entry in summary["rounds"]:
        assert len(entry["clients-train"]) == 2  # the over-budget site did not train
        assert entry["train"]["dp-epsilon"] > 0
    assert (run_dir / "global_model.pt").exists()

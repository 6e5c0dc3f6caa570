"""Privacy settings from the run config reach the ClientApp and the ServerApp."""

import json
import math

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
from flwr.simulation import run_simulation

from flower_medimg.client_apps import make_client_app
from flower_medimg.client_apps.site_mods import site_mods
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.privacy import PercentilePrivacyMod, SVTPrivacyMod
from flower_medimg.server_app import make_server_app

TINY = {
    "model.channels": "4,8",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "data.num-sites": 3,
    "train.batch-size": 4,
    "strategy.min-available-nodes": 3,  # round 1 waits for every site
}


def test_site_mods_from_config():
    assert site_mods(resolve_settings()) == []
    percentile = site_mods(
        resolve_settings(
            overrides={"privacy.filter": "percentile", "privacy.share": 0.1}
        )
    )
    assert len(percentile) == 1 and isinstance(percentile[0], PercentilePrivacyMod)
    both = site_mods(
        resolve_settings(overrides={"privacy.filter": "svt", "dp.user-level": "client"})
    )
    assert both[0].__name__ == "safe_fixedclipping_mod"  # outermost: clips last
    assert isinstance(both[1], SVTPrivacyMod)
    with pytest.raises(ValueError, match="valid filters: none, percentile, svt"):
        site_mods(resolve_settings(overrides={"privacy.filter": "topk"}))


def test_svt_odometer_survives_a_restart(tmp_path):
    overrides = {**TINY, "privacy.filter": "svt", "privacy.share": 0.2}
    config = resolve_settings(overrides=overrides)
    model = model_from_settings(config)
    arrays = ArrayRecord(model.state_dict())
    filtered = sum(v.numel() for v in model.state_dict().values() if v.ndim > 0)
    released = math.ceil(0.2 * filtered)  # SVT releases c = ceil(share * n) values
    app = make_client_app(**overrides)
    node_config = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path)}
    spent = []
    for server_round in (1, 2):
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}
        )
        message = Message(content=content, dst_node_id=1, message_type="train")
        # a new Context each round: the SuperNode restarted, only state-dir remains
        reply = app(message, Context(1, 1, node_config, RecordDict(), {}))
        spent.append(reply.content["metrics"]["svt-epsilon"])
        assert reply.content["metrics"]["shared-fraction"] == released / filtered
    assert spent[1] == pytest.approx(2 * spent[0])
    saved = json.loads((tmp_path / "svt-privacy.json").read_text())
    assert saved["epsilon"] == pytest.approx(spent[1])


@pytest.mark.slow
def test_percentile_sharing_with_user_level_dp_in_simulation(tmp_path):
    config = {
        **TINY,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "privacy.filter": "percentile",
        "privacy.share": 0.1,
        "dp.user-level": "server",
        "dp.user-noise-multiplier": 1.0,
        "strategy.weighted-by-key": "unit-weight",
    }
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(**config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    (run_dir,) = tmp_path.iterdir()
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    epsilons = [r["train"]["user-epsilon"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1]
    model = model_from_settings(resolve_settings(overrides=config))
    filtered = sum(v.numel() for v in model.state_dict().values() if v.ndim > 0)
    for entry in rounds:
        for site in entry["clients-train"]:
            # exactly ceil(0.1 n) coordinates are kept (a kept 0 counts as unsent)
            assert 0 < site["shared-fraction"] <= math.ceil(0.1 * filtered) / filtered


def test_user_level_dp_refuses_num_examples_weighting(tmp_path):
    from flower_medimg.server_app import _with_user_level_dp
    from flower_medimg.strategies.registry import build_strategy

    config = resolve_settings(
        overrides={"dp.user-level": "server", "dp.user-num-sampled": 3}
    )
    with pytest.raises(ValueError, match="allow_data_dependent_weights"):
        _with_user_level_dp(build_strategy("fedavg"), config, grid=None)


def _norm_bound_round(bound, config):
    from flower_medimg.privacy import SiteNormBoundMod

    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                "config": ConfigRecord(config),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )

    def train(m, c):
        arrays = ArrayRecord({"w": Array(np.array([3.0, 4.0], np.float32))})
        metrics = MetricRecord({"num-examples": 4})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=m)

    reply = SiteNormBoundMod(bound)(msg, Context(1, 1, {}, RecordDict(), {}), train)
    return reply.content["arrays"]["w"].numpy()


def test_the_site_clips_its_own_update_whatever_the_server_asks():
    # the update [3, 4] has norm 5: clipped to the site's bound 1 -> [0.6, 0.8]
    np.testing.assert_allclose(_norm_bound_round(1.0, {"lr": 0.1}), [0.6, 0.8])
    # a server asking for a looser bound gets the site's; a tighter one applies
    np.testing.assert_allclose(
        _norm_bound_round(1.0, {"clipping_norm": 10.0}), [0.6, 0.8]
    )
    np.testing.assert_allclose(
        _norm_bound_round(1.0, {"clipping_norm": 0.5}), [0.3, 0.4], rtol=1e-6
    )
    with pytest.raises(ValueError, match="'max-update-norm' must be a positive"):
        _norm_bound_round(-1.0, {})

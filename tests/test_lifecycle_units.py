"""Lifecycle pieces without a runtime: stop rule, audit chain, statistics, registry."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM

from flower_medimg.client_apps.statistics import statistics_reply, summarise_site
from flower_medimg.core.models import model_from_settings
from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import site_datasets
from flower_medimg.lifecycle import (
    AuditLog,
    BestModel,
    ModelRegistry,
    RegistryError,
    StopRule,
    load_exported,
    verify_audit_log,
    weights_sha256,
)
from flower_medimg.lifecycle.integrity import ServerKey
from flower_medimg.lifecycle.resume_state import ResumeState
from flower_medimg.lifecycle.statistics import (
    SiteStatistics,
    check_site_statistics,
    js_distance,
    pool_statistics,
)
from flower_medimg.lifecycle.strategy_state import (
    capture_strategy_state,
    restore_strategy_state,
)
from flower_medimg.strategies import FastFedAvg, QualityGate
from tests.reply_messages import train_reply

TINY = {"model.channels": "4,8,16", "data.image-size": 32, "data.samples-per-site": 12}


# ---- stop rule and best model ---------------------------------------------------


def test_stop_rule_target_min_and_max():
    rule = StopRule("central/dice", target=0.8)  # dice: higher is better
    assert rule.direction == "max"
    assert rule.update(1, {"central/dice": 0.5}) is None
    decision = rule.update(2, {"central/dice": 0.81})
    assert (decision.round, decision.reason) == (2, "target")
    assert "reached the target 0.8" in decision.message

    loss = StopRule("evaluate/eval-loss", target=0.2)
    assert loss.direction == "min"
    assert loss.update(1, {"evaluate/eval-loss": 0.3}) is None
    assert loss.update(2, {"evaluate/eval-loss": 0.2}).reason == "target"


def test_stop_rule_patience_hand_computed():
    # min mode, min-delta 0.1, patience 2:
    # r1 1.00 best; r2 0.95 (not < 0.90) stale 1; r3 0.80 (< 0.90) best, stale 0;
    # r4 0.75 (not < 0.70) stale 1; r5 0.72 stale 2 -> stop, best 0.8 in round 3
    rule = StopRule("evaluate/eval-loss", patience=2, min_delta=0.1)
    values = [1.0, 0.95, 0.8, 0.75, 0.72]
    decisions = [
        rule.update(r, {"evaluate/eval-loss": v}) for r, v in enumerate(values, 1)
    ]
    assert decisions[:4] == [None] * 4
    assert decisions[4].reason == "patience"
    assert decisions[4].round == 5
    assert "best 0.8 in round 3" in decisions[4].message
    assert rule.state() == {"best": 0.8, "best-round": 3, "stale-rounds": 2}

    # the state carries over to a resumed rule
    resumed = StopRule("evaluate/eval-loss", patience=2, min_delta=0.1)
    resumed.restore({"best": 0.8, "best-round": 3, "stale-rounds": 1})
    assert resumed.update(5, {"evaluate/eval-loss": 0.72}).reason == "patience"


def test_stop_rule_errors_name_the_culprit():
    with pytest.raises(ValueError, match="stop.metric 'dice' must be '<source>/<key>'"):
        StopRule("dice")
    with pytest.raises(ValueError, match="stop.mode must be"):
        StopRule("central/dice", mode="up")
    rule = StopRule("central/dcie", target=0.5)
    with pytest.raises(ValueError, match="available: central/dice, evaluate/eval-loss"):
        rule.update(1, {"central/dice": 0.4, "evaluate/eval-loss": 1.0})
    # inactive rule (no target, no patience) never stops and never complains
    assert StopRule("central/dcie").update(1, {}) is None


def test_best_model_keeps_earliest_best_and_skips_missing():
    best = BestModel("evaluate/eval-loss")
    assert best.update(1, {"evaluate/eval-loss": 0.9})
    assert best.update(2, {"evaluate/eval-loss": 0.5})
    assert not best.update(3, {"evaluate/eval-loss": 0.5})  # tie keeps round 2
    assert not best.update(4, {})
    assert best.state() == {"best": 0.5, "best-round": 2}


# ---- audit log ------------------------------------------------------------------


@pytest.fixture
def key(tmp_path):
    return ServerKey.load_or_create(tmp_path / "keys" / "server.pem")


def test_audit_chain_verifies_and_detects_one_changed_byte(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, key)
    log.append("run-start", registry=None, registry_run=None)
    for i in range(4):
        log.append("reply", round=i, node_id=10 + i, accepted=i != 2, weight=0.25)
    log.append("run-end")
    clean = verify_audit_log(path, key)
    assert clean.ok and clean.num_lines == 6 and clean.head == log.head

    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[0])
    assert entry["prev"] == "0" * 64 and entry["seq"] == 0
    assert json.loads(lines[1])["prev"] == entry["hash"]
    assert key.verify(entry["hash"].encode(), entry["sig"])

    for index in (1, 2, 4):  # first, middle and last reply
        tampered = bytearray(b"".join(lines))
        offset = sum(len(x) for x in lines[:index]) + lines[index].index(
            b'"weight":0.25'
        )
        tampered[offset + len('"weight":0.2')] = ord("9")  # 0.25 -> 0.29
        path.write_bytes(bytes(tampered))
        check = verify_audit_log(path, key)
        assert check.status == "tampered"
        assert check.bad_line == index + 1, check.message
        assert "was changed" in check.message

    # a removed line is caught at the line after it
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    check = verify_audit_log(path, key)
    assert check.bad_line == 3 and "'prev'" in check.message

    # reopening a log continues its chain; a corrupt one is refused
    path.write_bytes(b"".join(lines[:-1]))
    assert verify_audit_log(path, key).status == "incomplete"
    AuditLog(path, key).append("run-end")
    assert verify_audit_log(path, key).num_lines == 6
    path.write_bytes(b"".join(lines).replace(b'"round":1', b'"round":7'))
    with pytest.raises(ValueError, match="line 3"):
        AuditLog(path, key)


# ---- statistics -----------------------------------------------------------------


def test_js_distance_hand_computed():
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    # m = (.75, .25); KL(p||m) = .5 log2(2/3) + .5 log2 2 = 0.2075187
    # KL(q||m) = log2(4/3) = 0.4150375; JSD = 0.3112781; distance = sqrt
    assert js_distance([0.5, 0.5], [1, 0]) == pytest.approx(math.sqrt(0.3112781), 1e-6)
    assert js_distance([2, 2], [1, 1]) == pytest.approx(0.0)


def test_summarise_site_and_pool_flag_the_shifted_site():
    rng = np.random.default_rng(0)

    def site(offset):
        return [
            {
                "image": torch.tensor(rng.uniform(offset, offset + 0.3, (1, 8, 8))),
                "label": torch.zeros(1, 8, 8).index_fill_(1, torch.tensor([0]), 1),
            }
            for _ in range(4)
        ]

    values = summarise_site(site(0.0), bins=10, value_range=(0.0, 1.0), num_classes=2)
    assert values["num-images"] == 4 and values["count"] == 4 * 64
    assert sum(values["histogram"]) + values["below"] + values["above"] == 256
    assert values["histogram"][4:] == [0] * 6  # all values below 0.3
    assert values["label-counts"] == [4 * 56, 4 * 8]
    assert values["shape-min"] == [8, 8] and values["spacing-mean"] == []

    sites = [
        SiteStatistics(1, summarise_site(site(0.0), 10, (0.0, 1.0), 2)),
        SiteStatistics(2, summarise_site(site(0.0), 10, (0.0, 1.0), 2)),
        SiteStatistics(3, summarise_site(site(0.6), 10, (0.0, 1.0), 2)),
    ]
    pooled = pool_statistics(sites, flag_distance=0.3)
    assert [s.flagged for s in sites] == [False, False, True]
    assert sites[2].distance == pytest.approx(1.0)  # disjoint support
    assert pooled["num-images"] == 12
    # equal voxel counts: the pooled mean is the mean of the site means
    assert pooled["mean"] == pytest.approx(np.mean([s.mean for s in sites]))


def test_sites_that_all_differ_alike_are_not_flagged_an_extreme_one_is():
    def histogram(peak, bins=10, spread=1):
        counts = [0] * bins
        for b in range(peak - spread, peak + spread + 1):
            counts[b] = 10
        return counts

    def site(node_id, peak):
        counts = histogram(peak)
        values = {"histogram": counts, "below": 0, "above": 0, "count": sum(counts)}
        values.update({"sum": 1.0, "sum-sq": 1.0, "num-images": 1, "label-counts": []})
        return SiteStatistics(node_id, values)

    # four scanners, each one bin apart: every closest distance is the same
    alike = [site(k, peak) for k, peak in enumerate((2, 3, 4, 5))]
    pool_statistics(alike, flag_distance=0.1)
    assert len({round(s.distance, 12) for s in alike}) == 1 and alike[0].distance > 0.3
    assert not any(s.flagged for s in alike)
    # one far off: its closest distance is 1 (disjoint), the others' sqrt(1/3)
    apart = [site(k, peak) for k, peak in enumerate((2, 3, 4, 8))]
    pool_statistics(apart, flag_distance=0.1)
    assert [s.flagged for s in apart] == [False, False, False, True]
    assert apart[3].distance == pytest.approx(1.0)
    # two sites: no spread to compare with, the absolute distance decides
    pair = [site(0, 2), site(1, 8)]
    pool_statistics(pair, flag_distance=0.1)
    assert [s.flagged for s in pair] == [True, True]
    pair = [site(0, 2), site(1, 2)]
    pool_statistics(pair, flag_distance=0.1)
    assert [s.flagged for s in pair] == [False, False]


def test_the_default_demo_flags_at_most_one_site():
    settings = resolve_settings()  # 4 default synthetic sites
    sites = []
    for k in range(settings["data.num-sites"]):
        train, val = site_datasets(settings, {"partition-id": k, "num-partitions": 4})
        values = summarise_site([*train, *val], 32, (0.0, 1.0), 2)
        sites.append(SiteStatistics(k, values))
    pool_statistics(
        sites, settings["stats.flag-distance"], settings["stats.flag-factor"]
    )
    assert sum(s.flagged for s in sites) <= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"histogram": [1, 2]}, "'histogram' has 2 bins, the query asked 4"),
        ({"count": 0}, "'count' must be a whole number > 0"),
        ({"sum": float("nan")}, "'sum' must be a finite number"),
        ({"below": [1]}, "'below' must be a whole number >= 0"),
        ({"above": 1}, "does not add up to 'count'"),
        ({"num-train": 9}, "'num-train' = 9 is more than 'num-images' = 3"),
        ({"extra": 1}, "unknown key 'extra'"),
        ({"label-counts": None}, "'label-counts' must be a list"),
    ],
)
def test_a_statistics_reply_that_does_not_add_up_is_refused(change, message):
    values = {
        "num-images": 3,
        "histogram": [4, 3, 2, 1],
        "below": 0,
        "above": 0,
        "count": 10,
        "sum": 4.0,
        "sum-sq": 2.0,
        "shape-min": [2, 5],
        "shape-max": [2, 5],
        "spacing-mean": [],
        "label-counts": [8, 2],
        "num-train": 2,
    }
    check_site_statistics(values, bins=4)  # the honest reply passes
    with pytest.raises(ValueError) as caught:
        check_site_statistics({**values, **change}, bins=4)
    assert message in str(caught.value)


def test_statistics_reply_declines_and_carries_no_pixels():
    config = resolve_settings(overrides=TINY)
    query = Message(
        RecordDict(
            {"config": ConfigRecord({"bins": 16, "range-min": 0.0, "range-max": 1.0})}
        ),
        dst_node_id=1,
        message_type="query",
    )

    def context(node_config):
        return Context(
            run_id=1,
            node_id=1,
            node_config=node_config,
            state=RecordDict(),
            run_config={},
        )

    site = {"partition-id": 0, "num-partitions": 2}
    reply = statistics_reply(
        query, context({**site, "share-statistics": "false"}), config
    )
    assert reply.has_error() and "declines" in reply.error.reason

    reply = statistics_reply(query, context(site), config)
    assert not reply.has_error()
    assert len(reply.content.array_records) == 0
    (record,) = reply.content.metric_records.values()
    num_values = sum(len(v) if isinstance(v, list) else 1 for v in record.values())
    assert num_values < 32 * 32 / 10  # far fewer numbers than one image has pixels
    assert len(record["histogram"]) == 16


# ---- strategy state -------------------------------------------------------------


def _fedadam_round(strategy, server_round, arrays, deltas):
    strategy.configure_train(server_round, arrays, ConfigRecord(), _NoGrid())
    replies = [
        train_reply(n, {"w": arrays["w"].numpy() + d}, {"num-examples": 1})
        for n, d in enumerate(deltas, start=1)
    ]
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


class _NoGrid:
    def get_node_ids(self):
        return [1, 2]


def _through_a_file(strategy):
    """Capture the strategy's state and read it back as a resumed run does."""
    fields, arrays = capture_strategy_state(strategy)
    state = ResumeState.from_bytes(
        ResumeState(
            round=1,
            strategy=fields,
            strategy_arrays=arrays,
            stop={"best": None, "best-round": None, "stale-rounds": 0},
            best={"best": None, "best-round": None},
        ).to_bytes()
    )
    return state.strategy, state.strategy_arrays


def test_fedadam_moments_survive_capture_and_restore():
    start = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    deltas = [[np.ones(3, dtype=np.float32)], [np.full(3, -0.5, dtype=np.float32)]]

    straight = QualityGate(FedAdam(eta=0.1))
    arrays = _fedadam_round(straight, 1, start, deltas[0])
    expected = _fedadam_round(straight, 2, arrays, deltas[1])

    first = QualityGate(FedAdam(eta=0.1))
    arrays = _fedadam_round(first, 1, start, deltas[0])
    fields, saved_arrays = _through_a_file(first)
    assert [level["class"].rsplit(".", 1)[1] for level in fields] == [
        "QualityGate",
        "FedAdam",
    ]
    assert set(fields[1]["fields"]) == {"m_t", "v_t"}  # nothing but the moments
    resumed = QualityGate(FedAdam(eta=0.1))
    restore_strategy_state(resumed, fields, saved_arrays)
    assert resumed.strategy.m_t is not None
    got = _fedadam_round(resumed, 2, arrays, deltas[1])
    np.testing.assert_array_equal(got["w"].numpy(), expected["w"].numpy())

    # without the moments the second step differs
    fresh = QualityGate(FedAdam(eta=0.1))
    other = _fedadam_round(fresh, 2, arrays, deltas[1])
    assert not np.allclose(other["w"].numpy(), expected["w"].numpy())

    with pytest.raises(ValueError, match="Cannot resume"):
        restore_strategy_state(FedAdam(), fields, saved_arrays)


# ---- registry -------------------------------------------------------------------


def test_registry_versions_keep_policy_export_and_sha(tmp_path, key):
    config = resolve_settings(overrides=TINY)
    registry = ModelRegistry(tmp_path / "reg", key)
    run = registry.start_run(
        flower_run_id=7,
        experiment="abc",
        run_dir=tmp_path,
        strategy="fedavg",
        config=config,
    )
    models = [model_from_settings(config) for _ in range(3)]
    with torch.no_grad():  # three different versions
        for shift, model in enumerate(models):
            for param in model.parameters():
                param.add_(0.01 * shift)
    ids, pruned = [], []
    for rnd, model in enumerate(models, start=1):
        version, dropped = registry.record_round(
            run,
            rnd,
            model.state_dict(),
            metrics={"central/dice": 0.1 * rnd},
            contributors=[11, 12],
            replies=[{"node_id": 13, "accepted": False, "reason": "NaN"}],
            epsilon=None,
            resume_state=b"state %d" % rnd,
            best=rnd == 2,
            keep="best+last",
            audit_head=f"{rnd:064x}",
            audit_lines=rnd + 1,
        )
        ids.append(version)
        pruned += dropped
    assert pruned == [ids[0]]  # round 1: neither best nor last once round 3 is in
    assert not (registry.folder / "models" / f"run{run}-round1.safetensors").exists()
    kept = registry.versions(run)
    assert [v["round"] for v in kept] == [2, 3]  # best + last
    assert registry.resumable("abc")["id"] == ids[2]
    assert registry.load_resume_state(ids[2]) == b"state 3"
    assert registry.version(ids[1])["state_path"] is None  # only the newest is kept

    row = registry.version(ids[2])
    assert row["sha256"] == weights_sha256(models[2].state_dict())
    assert row["contributors"] == [11, 12]
    assert row["replies"][0]["reason"] == "NaN"
    assert row["run-info"]["versions"]["flwr"].startswith("1.42")
    assert row["run-info"]["config"]["model.channels"] == "4,8,16"

    comparison = registry.compare(ids[1], ids[2])
    assert comparison["metrics"]["central/dice"][2] == pytest.approx(0.1)
    assert comparison["weight-distance"] > 0 and not comparison["same-weights"]

    out = registry.export(ids[2], tmp_path / "export")
    card = json.loads((out / "model_card.json").read_text())
    assert card["sha256"] == row["sha256"] and card["round"] == 3
    assert card["audit"]["head"] == f"{3:064x}" and card["audit"]["lines"] == 4
    assert card["integrity"]["key-fingerprint"] == key.fingerprint
    assert key.verify(
        json.dumps(
            {"table": "models", "row": card["integrity"]["record"]},
            sort_keys=True,
            separators=(",", ":"),
        ).encode(),
        card["integrity"]["signature"],
    )
    loaded = load_exported(out)
    x = torch.rand(2, 1, 32, 32)
    models[2].eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), models[2](x), rtol=0, atol=0)

    registry.finish_run(run, "target", "done", f"{9:064x}", 9)
    assert registry.audit_anchor(run) == {
        "lines": 9,
        "head": f"{9:064x}",
        "finished": True,
    }
    assert registry.resumable("abc") is None
    assert registry.verify() == []
    with pytest.raises(RegistryError, match="stored versions"):
        registry.version(999)
    # a changed weight file is refused before it is parsed
    weights = registry.folder / row["weights_path"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RegistryError, match="SHA-256"):
        registry.load_weights(ids[2])
    assert len(registry.verify()) == 1


def test_fedavgm_state_with_received_buffers_round_trips():
    # arrays received over gRPC (deployment) hold memoryviews
    strategy = FedAvgM(server_momentum=0.9)
    strategy.current_arrays = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})
    strategy.current_arrays["w"].data = memoryview(strategy.current_arrays["w"].data)
    strategy.momentum_vector = [np.full(4, 0.5, dtype=np.float32)]
    fields, arrays = _through_a_file(strategy)
    restored = FedAvgM(server_momentum=0.9)
    restore_strategy_state(restored, fields, arrays)
    np.testing.assert_array_equal(restored.current_arrays["w"].numpy(), np.arange(4))
    np.testing.assert_array_equal(restored.momentum_vector[0], np.full(4, 0.5))


def test_num_examples_bounds_survive_resume_and_bad_ones_are_refused():
    # the statistics phase is not run again on resume: its bounds must come back
    gate = FastFedAvg()
    gate.num_examples_bounds = {7: 24, 9: 120}
    fields, arrays = _through_a_file(gate)
    restored = FastFedAvg()
    restore_strategy_state(restored, fields, arrays)
    assert restored.num_examples_bounds == {7: 24, 9: 120}
    assert restored.screening_rules("num-examples").num_examples_bounds == {
        7: 24,
        9: 120,
    }
    fields[0]["fields"]["num_examples_bounds"] = [[7, 24.5]]
    with pytest.raises(ValueError, match="num_examples_bounds"):
        restore_strategy_state(FastFedAvg(), fields, arrays)

"""A MONAI bundle federated by Flower (issue 17), and exported back as a bundle.

The bundle is written by ``sim/tiny_bundle.py`` in MONAI's config syntax (a 2D
UNet, ``SupervisedTrainer`` and ``SupervisedEvaluator`` over a site folder's
``dataset.json``); the simulated sites read synthetic NIfTI site folders.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.simulation import run_simulation
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, ScaleIntensity

from flower_medimg.client_apps import make_bundle_client_app
from flower_medimg.client_apps.bundle import site_data_dir
from flower_medimg.core.bundle import BundleError, bundle_model, network_from_bundle
from flower_medimg.core.settings import SettingsError, resolve_settings
from flower_medimg.lifecycle.bundle_export import PROVENANCE_KEY, export_bundle
from flower_medimg.lifecycle.integrity import VerifyKey, key_path
from flower_medimg.lifecycle.registry import ModelRegistry
from flower_medimg.server_app import make_server_app
from flower_medimg.simulation import backend_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sim"))
from tiny_bundle import write_tiny_bundle  # noqa: E402

BATCH = 4
TINY = {
    "task": "bundle",
    "data.image-size": 32,
    "data.samples-per-site": 12,
    "data.num-sites": 2,
    "num-server-rounds": 2,
    "strategy.min-available-nodes": 2,
    "train.report-losses": True,
}
PROTOCOL_KEYS = {"num-examples", "local-steps", "nova-a", "unit-weight", "train-time-s"}


def _context(partition: int, num: int = 2) -> Context:
    return Context(
        run_id=1,
        node_id=10 + partition,
        node_config={"partition-id": partition, "num-partitions": num},
        state=RecordDict(),
        run_config={},
    )


def _message(arrays: ArrayRecord, message_type: str = "train") -> Message:
    config = ConfigRecord({"server-round": 1})
    content = RecordDict({"arrays": arrays, "config": config})
    return Message(content=content, dst_node_id=10, message_type=message_type)


def _datalist(settings, partition: int) -> dict:
    folder = site_data_dir(settings, _context(partition))
    return json.loads((folder / "dataset.json").read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(
        tmp_path_factory.mktemp("bundle") / "tiny", batch_size=BATCH
    )


@pytest.fixture(scope="module")
def federated(bundle, tmp_path_factory):
    """Two simulated sites train the bundle for 2 rounds in Flower's runtime."""
    out = tmp_path_factory.mktemp("bundle-run")
    config = {
        **TINY,
        "bundle.root": str(bundle),
        "output-dir": str(out / "outputs"),
        "registry.path": str(out / "registry"),
    }
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_bundle_client_app(**config),
        num_supernodes=2,
        backend_config=backend_config(),
    )
    (run_dir,) = (out / "outputs").iterdir()
    return resolve_settings(overrides=config), run_dir


@pytest.mark.slow
def test_two_sites_train_the_bundle_and_reply_in_protocol(federated):
    settings, run_dir = federated
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    sizes = {len(_datalist(settings, p)["training"]) for p in (0, 1)}
    for entry in summary["rounds"]:
        replies = entry["clients-train"]
        assert len(replies) == 2
        assert {r["num-examples"] for r in replies} == sizes  # the bundle's datasets
        for reply in replies:
            assert reply.keys() >= PROTOCOL_KEYS
            steps = math.ceil(reply["num-examples"] / BATCH)  # 1 epoch, no drop_last
            assert reply["local-steps"] == steps
            assert reply["nova-a"] == steps  # Adam: FedNova counts the steps
            assert reply["train-loss-before"] > 0 and reply["train-loss-after"] > 0
        for reply in entry["clients-evaluate"]:
            assert 0.0 <= reply["val_mean_dice"] <= 1.0
            assert reply["eval-loss"] > 0 and reply["num-examples"] > 0
        assert 0.0 <= entry["evaluate"]["val_mean_dice"] <= 1.0

    initial = bundle_model(settings).state_dict()  # the server's initial arrays
    final = torch.load(run_dir / "global_model.pt", weights_only=True)
    assert final.keys() == initial.keys()
    assert all(final[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


@pytest.mark.slow
def test_exported_bundle_reproduces_the_registry_model(federated, tmp_path):
    settings, _ = federated
    registry = ModelRegistry(
        settings["registry.path"], VerifyKey.load(key_path()), read_only=True
    )
    version = registry.versions()[-1]["id"]
    out = tmp_path / "exported"
    command = [
        Path(sys.executable).with_name("flower-medimg"),
        "registry",
        "--path",
        settings["registry.path"],
        "export",
        str(version),
        str(out),
        "--bundle",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    provenance = metadata[PROVENANCE_KEY]
    row = registry.version(version)
    assert provenance["sha256"] == row["sha256"]
    assert provenance["round"] == 2 and provenance["strategy"] == "fedavg"
    assert sorted(provenance["sites"]) == sorted(row["contributors"])
    assert metadata["name"] == "tiny_unet_segmentation"  # the bundle's own metadata

    site = site_data_dir(settings, _context(0))
    predictions = tmp_path / "predictions"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run"]
        + ["--config_file", "configs/inference.json", "--bundle_root", str(out)]
        + ["--dataset_dir", str(site), "--output_dir", str(predictions)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    network = network_from_bundle(out, ["configs/inference.json"])
    network.load_state_dict(registry.load_weights(version))
    network.eval()
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), ScaleIntensity()])
    images = sorted((site / "imagesTr").glob("*.nii.gz"))
    datalist = _datalist(settings, 0)
    assert len(images) == len(datalist["training"]) + len(datalist["validation"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for image in images:
            with torch.no_grad():
                logits = network(torch.as_tensor(load(image))[None].float())
            expected = torch.softmax(logits, dim=1)[0].numpy()  # (C, H, W)
            name = image.name.removesuffix(".nii.gz") + "_prob.nii.gz"
            saved = np.asarray(nib.load(predictions / name).dataobj)  # (H, W, 1, C)
            assert np.array_equal(np.moveaxis(saved[:, :, 0], -1, 0), expected), name
    finally:
        torch.set_num_threads(threads)

    with pytest.raises(BundleError, match="not empty"):
        export_bundle(registry, version, out)
    registry.close()


def _train_reply(bundle: Path, arrays: ArrayRecord, partition: int, diff: bool):
    app = make_bundle_client_app(
        **{**TINY, "bundle.root": str(bundle), "bundle.send-weight-diff": diff}
    )
    reply = app(_message(arrays), _context(partition))
    assert not reply.has_error(), reply.error
    return reply.content


def test_weight_differences_and_full_weights_aggregate_alike(bundle):
    settings = resolve_settings(overrides={**TINY, "bundle.root": str(bundle)})
    initial = bundle_model(settings).state_dict()
    arrays = ArrayRecord(initial)
    full = [_train_reply(bundle, arrays, p, diff=False) for p in (0, 1)]
    diff = [_train_reply(bundle, arrays, p, diff=True) for p in (0, 1)]
    for a, b in zip(full, diff, strict=True):
        wa, wb = (c["arrays"].to_torch_state_dict() for c in (a, b))
        assert wa.keys() == wb.keys() == initial.keys()
        for key in wa:  # sent + (trained - sent): full weights, never a difference
            torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
        assert any(not torch.equal(wa[k], initial[k]) for k in wa)

    n = [c["metrics"]["num-examples"] for c in full]
    key = "model.0.conv.unit0.conv.weight"
    w = [c["arrays"].to_torch_state_dict()[key].double() for c in full]
    by_hand = (n[0] * w[0] + n[1] * w[1]) / (n[0] + n[1])
    for replies in (full, diff):
        aggregated = aggregate_arrayrecords(replies, "num-examples")
        got = aggregated.to_torch_state_dict()[key].double()
        torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-6)


def test_a_network_that_does_not_fit_the_global_keys_fails_clearly(bundle, tmp_path):
    other = write_tiny_bundle(tmp_path / "other", channels=(4, 8))
    settings = resolve_settings(overrides={**TINY, "bundle.root": str(other)})
    arrays = ArrayRecord(bundle_model(settings).state_dict())
    app = make_bundle_client_app(**{**TINY, "bundle.root": str(bundle)})
    with pytest.raises(BundleError, match=r"do not match the bundle's network.*shapes"):
        app(_message(arrays), _context(0))

    (other / "models").mkdir()
    shipped = bundle_model(
        resolve_settings(overrides={**TINY, "bundle.root": str(bundle)})
    )
    torch.save(shipped.state_dict(), other / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"weights in models/model.pt do not match"):
        bundle_model(settings)


def test_bundle_settings_refuse_what_the_bundle_replaces(bundle):
    base = {"task": "bundle", "bundle.root": str(bundle)}
    with pytest.raises(
        SettingsError, match=r"DP-SGD.*cannot be used with task = 'bundle'"
    ):
        resolve_settings(overrides={**base, "dp.noise-multiplier": 1.0})
    with pytest.raises(SettingsError, match="needs bundle.root"):
        resolve_settings(overrides={"task": "bundle"})
    with pytest.raises(SettingsError, match="make_client_app"):
        make_bundle_client_app(task="segmentation")

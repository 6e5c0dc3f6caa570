"""What leaves a hospital, in Flower's Ray simulation runtime: SecAgg+, CKKS, codecs."""

import json

import pytest
import torch
from flwr.simulation import run_simulation
from tiny_config import TINY

from flower_medimg.client_apps import make_client_app
from flower_medimg.core.homomorphic import (
    CIPHERTEXT_SUFFIX,
    layout_of,
    load_secret_context,
    provision_contexts,
)
from flower_medimg.server_app import make_server_app

#: The reply gate's per-update checks cannot see a masked or encrypted update.
NO_UPDATE_CHECKS = {
    "gate.update-norm-factor": 0.0,
    "gate.min-cosine": -1.0,
    "gate.max-update-norm": 0.0,
}


def _simulate(config, num_sites):
    run_simulation(
        server_app=make_server_app(**config),
        client_app=make_client_app(**config),
        num_supernodes=num_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


def _rounds(tmp_path):
    (run_dir,) = (p for p in tmp_path.iterdir() if p.name.startswith("run-"))
    return run_dir, json.loads((run_dir / "metrics.json").read_text())["rounds"]


@pytest.mark.slow
def test_secagg_with_int8_trains_4_sites_for_2_rounds(tmp_path):
    config = {
        **TINY,
        **NO_UPDATE_CHECKS,
        "data.num-sites": 4,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "registry.path": "",
        "cross-site.enabled": False,
        "secagg.enabled": True,
        "compression.codec": "int8",  # 8-bit SecAgg+ quantisation, 2-byte values
        "secagg.clipping-range": 0.5,
    }
    _simulate(config, 4)
    _, rounds = _rounds(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        sites = entry["clients-train"]
        assert len(sites) == 4  # every site's masked input was unmasked
        assert all(0 <= site["secagg-clipped"] < 0.5 for site in sites)
    # the global model moved, and the central evaluation of it is a valid Dice
    assert 0 <= rounds[-1]["central"]["dice"] <= 1


@pytest.mark.slow
def test_ckks_keeps_the_global_model_encrypted_at_the_server(tmp_path):
    secret, _ = provision_contexts(tmp_path / "he")
    config = {
        **TINY,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path / "out"),
        "registry.path": "",
        "central-eval": False,
        "cross-site.enabled": False,
        "he.enabled": True,
        "he.context-dir": str(tmp_path / "he"),
    }
    _simulate(config, 3)
    run_dir, rounds = _rounds(tmp_path / "out")
    for entry in rounds:  # the sites decrypted the model and evaluated it
        assert len(entry["clients-evaluate"]) == 3
        assert all(0 <= s["dice"] <= 1 for s in entry["clients-evaluate"])
    stored = torch.load(run_dir / "global_model.pt", weights_only=True)
    encrypted = [k for k in stored if k.endswith(CIPHERTEXT_SUFFIX)]
    assert encrypted and all(stored[k].dtype == torch.uint8 for k in encrypted)
    assert not [k for k in stored if not k.endswith(("ckks", "ckks-shape"))]
    layout_of(load_secret_context(secret))  # the sites' context is a valid one

"""The site's own parts without a Flower runtime: config file, data cache, modules."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from flower_medimg.core.settings import resolve_settings
from flower_medimg.core.startup import MESSAGE_RECEIVED_AT, startup_seconds
from flower_medimg.data.cache import CACHE_FOLDER, TRANSFORMED_LOG
from flower_medimg.data.datasets import clear_data_cache, site_datasets
from flower_medimg.data.site_folder import write_synthetic_sites
from flower_medimg.site.config import (
    SiteConfigError,
    load_site_config,
    write_site_config,
)
from flower_medimg.site.task import forget_app_modules


@pytest.fixture
def site(tmp_path):
    (data_dir,) = write_synthetic_sites(
        tmp_path / "data", "segmentation", 1, image_size=16, samples_per_site=6
    )
    node_config = {"data-dir": str(data_dir), "state-dir": str(tmp_path / "state")}
    return Path(data_dir), node_config


def _read_all(node_config):
    clear_data_cache()  # a new process, as Flower starts per message
    settings = resolve_settings(overrides={"data.image-size": 16})
    train, val = site_datasets(settings, node_config)
    return [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]


def _folders(node_config):
    return sorted((Path(node_config["state-dir"]) / CACHE_FOLDER).iterdir())


def _transformed(folder):
    return len((folder / TRANSFORMED_LOG).read_text().splitlines())


def test_cache_transforms_each_item_once_and_returns_the_same_tensors(site):
    _, node_config = site
    first = _read_all(node_config)
    second = _read_all(node_config)
    (folder,) = _folders(node_config)
    assert _transformed(folder) == len(first)  # the second pass read no image
    for a, b in zip(first, second, strict=True):
        assert a["image"].equal(b["image"]) and a["label"].equal(b["label"])


def test_a_changed_datalist_or_image_invalidates_the_cache(site):
    data_dir, node_config = site
    items = _read_all(node_config)
    (old,) = _folders(node_config)
    datalist = data_dir / "dataset.json"
    content = json.loads(datalist.read_text())
    content["training"] = content["training"][:-1]
    datalist.write_text(json.dumps(content))
    assert len(_read_all(node_config)) == len(items) - 1
    (new,) = _folders(node_config)  # the old folder of this datalist is gone
    assert new != old and _transformed(new) == len(items) - 1

    image = Path(content["validation"][0]["image"])
    image = image if image.is_absolute() else data_dir / image
    stamp = image.stat().st_mtime_ns + 10**9
    os.utime(image, ns=(stamp, stamp))  # same bytes, newer file: re-read
    _read_all(node_config)
    (newest,) = _folders(node_config)
    assert newest != new and _transformed(newest) == len(items) - 1


def test_a_changed_image_size_uses_another_cache(site):
    _, node_config = site
    _read_all(node_config)
    (old,) = _folders(node_config)
    clear_data_cache()
    settings = resolve_settings(overrides={"data.image-size": 8})
    train, _ = site_datasets(settings, node_config)
    assert train[0]["image"].shape[-1] == 8
    (new,) = _folders(node_config)  # one cache per datalist: the old one went
    assert new != old


def _config(tmp_path, **values):
    base = {
        "name": "site-a",
        "superlink": "127.0.0.1:9092",
        "data_dir": "data",
        "state_dir": "state",
        "insecure": True,
    }
    return write_site_config(tmp_path / "site.toml", **{**base, **values})


def test_site_config_resolves_paths_against_its_folder(tmp_path):
    config = _config(tmp_path, runtime_api_port=9100)
    assert config.data_dir == (tmp_path / "data").resolve()
    assert config.runtime_api_address == "127.0.0.1:9100"
    assert config.runtime == "warm"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"runtime": "hot"}, "'runtime' must be one of"),
        ({"runtime_api_port": "9094"}, "'runtime-api-port' must be int"),
        ({"colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
        ({"insecure": False}, "required"),
        ({"poll_interval": 0.0}, "'poll-interval'"),
    ],
)
def test_site_config_errors_name_the_key(tmp_path, values, message):
    with pytest.raises(SiteConfigError, match=message) as caught:
        _config(tmp_path, **values)
    assert "site.toml" in str(caught.value)


def test_threads_reach_flowers_own_message_processes_too(tmp_path, monkeypatch):
    from flower_medimg.site.service import _env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = _env(_config(tmp_path, runtime="flower", threads=1))
    assert env["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _env(_config(tmp_path, runtime="flower"))


def test_site_config_refuses_data_dir_in_node_config(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(
        '[site]\nname = "a"\nsuperlink = "h:1"\ndata-dir = "d"\nstate-dir = "s"\n'
        'insecure = true\n[site.node-config]\ndata-dir = "/etc"\n'
    )
    with pytest.raises(SiteConfigError, match="node-config 'data-dir'"):
        load_site_config(path)


def test_forget_app_modules_drops_only_the_apps_packages(tmp_path, monkeypatch):
    app = tmp_path / "app"
    (app / "toyapp").mkdir(parents=True)
    (app / "toyapp" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(app))
    import toyapp  # noqa: F401

    assert forget_app_modules(app) == ["toyapp"]
    assert "toyapp" not in sys.modules and "json" in sys.modules


def test_startup_seconds_counts_from_the_runtimes_receipt(monkeypatch):
    monkeypatch.setenv(MESSAGE_RECEIVED_AT, repr(time.time() - 2.0))
    assert 2.0 <= startup_seconds() < 3.0
    monkeypatch.delenv(MESSAGE_RECEIVED_AT)
    assert startup_seconds() >= 0.0  # this process's own start time

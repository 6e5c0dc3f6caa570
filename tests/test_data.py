"""site_datasets: the ClientApp's one entry point, simulation and deployment paths."""

import os

import numpy as np
import pytest
import torch

from flower_medimg.core.settings import resolve_settings
from flower_medimg.data import (
    SYNTHETIC_KEYS,
    central_test_dataset,
    clear_data_cache,
    site_datasets,
    synthetic_settings,
    synthetic_site,
    write_synthetic_sites,
)

# MONAI notes once per LoadImage that its optional GPU DICOM decoder is absent.
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")

RUN_CONFIG = {"data.image-size": 16, "data.samples-per-site": 8, "seed": 3}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_data_cache()
    yield
    clear_data_cache()


def _settings(task="segmentation", run_config=RUN_CONFIG):
    model = "unet" if task == "segmentation" else "resnet10"
    return resolve_settings({**run_config, "task": task, "model.name": model})


def test_settings_from_run_config():
    defaults = synthetic_settings(resolve_settings())
    assert defaults == {
        "seed": 0,
        "spatial_dims": 2,
        "image_size": 64,
        "samples_per_site": 32,
        "val_fraction": 0.25,
        "quantity_skew": 0.5,
        "scanner_shift": 1.0,
        "label_skew": 0.0,
        "num_classes": 2,
    }
    assert set(SYNTHETIC_KEYS) == {
        "seed",
        "model.spatial-dims",
        "data.image-size",
        "data.samples-per-site",
        "data.val-fraction",
        "data.quantity-skew",
        "data.scanner-shift",
        "data.label-skew",
        "data.num-classes",
    }
    settings = synthetic_settings(
        resolve_settings({"model.spatial-dims": 3, "data.label-skew": 1})
    )
    assert settings["spatial_dims"] == 3 and settings["label_skew"] == 1.0
    with pytest.raises(ValueError, match="data.image-size"):
        resolve_settings({"data.image-size": "big"})


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_partition_path_matches_synthetic_site(task):
    node_config = {"partition-id": 1, "num-partitions": 3}
    train, val = site_datasets(_settings(task, RUN_CONFIG), node_config)
    site = synthetic_site(task, 1, 3, **synthetic_settings(_settings()))
    assert len(train) == len(site["training"]) and len(val) == len(site["validation"])
    item = train[0]
    assert type(item["image"]) is torch.Tensor  # plain tensors, not MetaTensor
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    if task == "segmentation":
        assert item["label"].shape == (1, 16, 16)
        assert item["label"].dtype == torch.float32
        np.testing.assert_array_equal(
            item["label"].numpy(), site["training"][0]["label"]
        )
    else:
        assert item["label"].dtype == torch.long and item["label"].ndim == 0
        assert int(item["label"]) == site["training"][0]["label"]
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16)


def test_partition_path_is_cached_per_arguments():
    node_config = {"partition-id": 0, "num-partitions": 2}
    first = site_datasets(_settings("segmentation", RUN_CONFIG), node_config)
    assert (
        site_datasets(_settings("segmentation", dict(RUN_CONFIG)), dict(node_config))
        is first
    )
    other = site_datasets(
        _settings("segmentation", RUN_CONFIG), {"partition-id": 1, "num-partitions": 2}
    )
    assert other is not first
    changed = site_datasets(
        _settings("segmentation", {**RUN_CONFIG, "seed": 4}), node_config
    )
    assert changed is not first
    clear_data_cache()
    again = site_datasets(_settings("segmentation", RUN_CONFIG), node_config)
    assert again is not first
    np.testing.assert_array_equal(again[0][0]["image"], first[0][0]["image"])


def test_sites_differ_in_simulation():
    a, _ = site_datasets(
        _settings("segmentation", RUN_CONFIG), {"partition-id": 0, "num-partitions": 2}
    )
    b, _ = site_datasets(
        _settings("segmentation", RUN_CONFIG), {"partition-id": 1, "num-partitions": 2}
    )
    assert not torch.equal(a[0]["image"], b[0]["image"])


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_data_dir_path_matches_simulation(tmp_path, task):
    settings = synthetic_settings(_settings())
    folders = write_synthetic_sites(tmp_path, task, 2, **settings)
    assert folders == [tmp_path / "site-0", tmp_path / "site-1"]
    files = site_datasets(_settings(task, RUN_CONFIG), {"data-dir": str(folders[1])})
    memory = site_datasets(
        _settings(task, RUN_CONFIG), {"partition-id": 1, "num-partitions": 2}
    )
    for from_files, in_memory in zip(files, memory, strict=True):
        assert len(from_files) == len(in_memory)
        for index in range(len(in_memory)):
            got, want = from_files[index], in_memory[index]
            assert type(got["image"]) is torch.Tensor
            torch.testing.assert_close(got["image"], want["image"], atol=1e-6, rtol=0)
            assert torch.equal(got["label"], want["label"])


def test_data_dir_path_rereads_an_edited_datalist(tmp_path):
    folder = write_synthetic_sites(
        tmp_path, "classification", 1, **synthetic_settings(_settings())
    )[0]
    train, _ = site_datasets(
        _settings("classification", RUN_CONFIG), {"data-dir": folder}
    )
    assert (
        site_datasets(_settings("classification", RUN_CONFIG), {"data-dir": folder})[0]
        is train
    )
    json_path = folder / "dataset.json"
    json_path.write_text(
        json_path.read_text().replace('"training": [', '"training": [\n')
    )
    stat = json_path.stat()
    os.utime(json_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert (
        site_datasets(_settings("classification", RUN_CONFIG), {"data-dir": folder})[0]
        is not train
    )


def test_data_dir_with_custom_datalist_name(tmp_path):
    folder = write_synthetic_sites(
        tmp_path, "segmentation", 1, **synthetic_settings(_settings())
    )[0]
    (folder / "dataset.json").rename(folder / "site.json")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        site_datasets(_settings("segmentation", RUN_CONFIG), {"data-dir": str(folder)})
    node_config = {"data-dir": str(folder), "datalist": "site.json"}
    train, val = site_datasets(_settings("segmentation", RUN_CONFIG), node_config)
    assert len(train) > 0 and len(val) > 0


def test_node_config_without_data_source():
    with pytest.raises(
        ValueError, match="'data-dir'.*'partition-id'.*'num-partitions'"
    ):
        site_datasets(_settings("segmentation", RUN_CONFIG), {"state-dir": "/tmp"})
    with pytest.raises(ValueError, match="num-partitions"):
        site_datasets(_settings("segmentation", RUN_CONFIG), {"partition-id": 0})


def test_3d_simulation():
    run_config = {**RUN_CONFIG, "model.spatial-dims": 3, "data.samples-per-site": 4}
    train, val = site_datasets(
        _settings("segmentation", run_config), {"partition-id": 0, "num-partitions": 1}
    )
    assert train[0]["image"].shape == train[0]["label"].shape == (1, 16, 16, 16)


def test_central_test_datasets_are_held_out_and_cached():
    settings = _settings("classification", {**RUN_CONFIG, "data.num-sites": 3})
    seen = central_test_dataset(settings)
    unseen = central_test_dataset(settings, "unseen")
    per_site = max(2, round(RUN_CONFIG["data.samples-per-site"] * 0.25))
    assert len(seen) == len(unseen) == 3 * per_site
    site_images = [
        item["image"]
        for k in range(3)
        for split in site_datasets(settings, {"partition-id": k, "num-partitions": 3})
        for item in split
    ]
    for item in [*seen, *unseen]:
        assert not any(torch.equal(item["image"], x) for x in site_images)
    assert central_test_dataset(settings) is seen  # built once per run

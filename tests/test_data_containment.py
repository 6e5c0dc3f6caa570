"""Data containment in the site loader (threat model promise 7, "How to probe: files").

A datalist may only name files inside its site folder (symlinks followed), a
segmentation label must fit its image and be binary, an image whose header declares
more than ``MAX_VOXELS`` voxels is refused before its pixels are read, and written
site folders are private.
"""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flower_medimg.core.settings import resolve_settings
from flower_medimg.data.datasets import (
    MAX_VOXELS,
    ImageReadError,
    clear_data_cache,
    make_dataset,
    site_datasets,
)
from flower_medimg.data.site_folder import load_datalist, write_synthetic_sites

TASK = "segmentation"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A 2D segmentation site folder of 16x16 NIfTI images."""
    (folder,) = write_synthetic_sites(
        tmp_path / "sites", TASK, 1, image_size=16, samples_per_site=4
    )
    return folder


def _set_entry(site: Path, key: str, value: str, split: str = "training") -> None:
    path = site / "dataset.json"
    content = json.loads(path.read_text())
    content[split][0][key] = value
    path.write_text(json.dumps(content))


def _outside_image(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    file = outside / "secret.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(file))
    return file


def _assert_refused(site: Path, written: str) -> None:
    with pytest.raises(ValueError, match="outside the site folder") as info:
        load_datalist(site, TASK)
    message = str(info.value)
    for part in ("dataset.json", "'training'", "item 0", "image file", repr(written)):
        assert part in message, (part, message)


def test_dotdot_path_is_refused(site: Path, tmp_path: Path) -> None:
    _outside_image(tmp_path)
    written = "../../outside/secret.nii.gz"
    assert (site / written).exists()
    _set_entry(site, "image", written)
    _assert_refused(site, written)


def test_absolute_path_outside_is_refused(site: Path, tmp_path: Path) -> None:
    written = str(_outside_image(tmp_path))
    _set_entry(site, "image", written)
    _assert_refused(site, written)


def test_symlinked_file_pointing_outside_is_refused(site: Path, tmp_path: Path) -> None:
    (site / "imagesTr" / "link.nii.gz").symlink_to(_outside_image(tmp_path))
    written = "imagesTr/link.nii.gz"
    _set_entry(site, "image", written)
    _assert_refused(site, written)


def test_file_under_symlinked_dir_pointing_outside_is_refused(
    site: Path, tmp_path: Path
) -> None:
    (site / "linked").symlink_to(_outside_image(tmp_path).parent)
    written = "linked/secret.nii.gz"
    _set_entry(site, "image", written)
    _assert_refused(site, written)


def test_symlink_inside_the_folder_is_allowed(site: Path) -> None:
    (site / "alias").symlink_to(site / "imagesTr")
    (site / "imagesTr" / "same.nii.gz").symlink_to(site / "imagesTr/val_0000.nii.gz")
    _set_entry(site, "image", "alias/train_0000.nii.gz")
    _set_entry(site, "image", "imagesTr/same.nii.gz", split="validation")
    items = load_datalist(site, TASK)
    assert items["training"][0]["image"].endswith("alias/train_0000.nii.gz")
    assert items["validation"][0]["image"].endswith("imagesTr/same.nii.gz")


def _first_item(site: Path) -> dict:
    items = load_datalist(site, TASK)
    dataset = make_dataset(items["training"], TASK, 2, 16, from_files=True)
    return dataset[0]


def test_label_of_wrong_shape_is_refused(site: Path) -> None:
    label = site / "labelsTr" / "train_0000.nii.gz"
    mask = np.zeros((8, 16), np.uint8)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(label))
    with pytest.raises(ImageReadError, match=r"\(8, 16\).*\(16, 16\)") as info:
        _first_item(site)
    assert str(label) in str(info.value)
    assert info.value.path == str(label)


@pytest.mark.parametrize(
    "values",
    [np.arange(-3, 5), np.array([0, 255]), np.array([0.0, np.nan])],
    ids=["-3..4", "255", "nan"],
)
def test_label_values_outside_0_1_are_refused(site: Path, values: np.ndarray) -> None:
    label = site / "labelsTr" / "train_0000.nii.gz"
    mask = np.resize(values, 16 * 16).reshape(16, 16).astype(np.float32)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(label))
    with pytest.raises(ImageReadError, match="values other than 0 and 1") as info:
        _first_item(site)
    assert str(label) in str(info.value)


def test_binary_label_still_loads(site: Path) -> None:
    item = _first_item(site)
    assert tuple(item["label"].shape) == (1, 16, 16)
    assert set(item["label"].unique().tolist()) <= {0.0, 1.0}


def test_header_over_voxel_cap_is_refused_before_reading(site: Path) -> None:
    # A truncated .nii.gz: a header claiming 16384 x 16384 float32 (1 GiB), no data.
    header = nib.Nifti1Header()
    header.set_data_shape((16384, 16384))
    header.set_data_dtype(np.float32)
    image = site / "imagesTr" / "train_0000.nii.gz"
    with gzip.open(image, "wb") as file:
        file.write(header.binaryblock + b"\0" * 4)
    assert image.stat().st_size < 1024
    with pytest.raises(ImageReadError, match="over the cap") as info:
        _first_item(site)
    message = str(info.value)
    assert str(image) in message
    assert "(16384, 16384)" in message
    assert str(MAX_VOXELS) in message


def test_written_site_folder_is_private(tmp_path: Path) -> None:
    (folder,) = write_synthetic_sites(
        tmp_path / "sites", TASK, 1, image_size=16, samples_per_site=4
    )
    paths = [folder, *folder.rglob("*")]
    assert len(paths) > 5
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_the_site_sets_its_own_voxel_cap(site: Path) -> None:
    """``node_config["max-voxels"]`` lowers the cap: 16x16 = 256 voxels > 100."""
    settings = resolve_settings(
        {"task": TASK, "data.image-size": 16, "model.spatial-dims": 2}
    )
    node_config = {"data-dir": str(site), "max-voxels": 100}
    train, _ = site_datasets(settings, node_config)
    with pytest.raises(ImageReadError, match="over the cap of 100") as info:
        train[0]
    assert "'max-voxels'" in str(info.value)
    assert "(16, 16)" in str(info.value)
    node_config["max-voxels"] = 256  # exactly at the cap: read
    clear_data_cache()
    train, _ = site_datasets(settings, node_config)
    assert tuple(train[0]["image"].shape) == (1, 16, 16)


@pytest.mark.parametrize("value", [0, -5, "many", 1.5, True])
def test_a_bad_voxel_cap_names_the_key(site: Path, value: object) -> None:
    settings = resolve_settings({"task": TASK})
    with pytest.raises(ValueError, match="'max-voxels' must be a positive integer"):
        site_datasets(settings, {"data-dir": str(site), "max-voxels": value})

"""Site folders on disk: writing, datalist checks, readers (NIfTI, PNG, DICOM)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from flower_medimg.data import (
    ImageReadError,
    load_datalist,
    make_dataset,
    synthetic_site,
    write_site_folder,
)
from flower_medimg.data.cli import main

SMALL = {"image_size": 32, "samples_per_site": 4}

# MONAI's optional-GPU DICOM decoder and identity-affine notices are expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning"),
    pytest.mark.filterwarnings("ignore:PydicomReader.*affine:UserWarning"),
]


def _minmax(array):
    array = np.asarray(array, dtype=np.float32)
    return (array - array.min()) / (array.max() - array.min())


def _write_json(folder, content):
    path = folder / "dataset.json"
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def seg_site():
    return synthetic_site("segmentation", 0, 2, **SMALL)


def test_nifti_round_trip_segmentation(tmp_path, seg_site):
    json_path = write_site_folder(seg_site, tmp_path / "site", "segmentation")
    assert json_path == tmp_path / "site" / "dataset.json"
    content = json.loads(json_path.read_text())
    assert content["task"] == "segmentation"
    assert content["training"][0] == {
        "image": "imagesTr/train_0000.nii.gz",
        "label": "labelsTr/train_0000.nii.gz",
    }
    # the files hold the arrays exactly
    raw = nib.load(tmp_path / "site" / content["training"][0]["image"]).get_fdata()
    np.testing.assert_array_equal(raw, seg_site["training"][0]["image"][0])

    datalist = load_datalist(tmp_path / "site", "segmentation")
    assert [len(datalist[s]) for s in ("training", "validation")] == [3, 1]
    assert datalist["training"][0]["image"].startswith(str(tmp_path))
    dataset = make_dataset(datalist["training"], "segmentation", 2, 32, from_files=True)
    for item, original in zip(dataset, seg_site["training"], strict=True):
        assert (
            item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        )
        np.testing.assert_allclose(
            item["image"].numpy(), _minmax(original["image"]), atol=1e-6
        )
        assert item["label"].dtype == torch.float32
        np.testing.assert_array_equal(item["label"].numpy(), original["label"])


def test_nifti_round_trip_3d_and_resize(tmp_path):
    site = synthetic_site("segmentation", 0, 1, spatial_dims=3, image_size=16)
    write_site_folder(site, tmp_path, "segmentation")
    items = load_datalist(tmp_path, "segmentation")["validation"]
    item = make_dataset(items, "segmentation", 3, 16, from_files=True)[0]
    np.testing.assert_array_equal(item["label"].numpy(), site["validation"][0]["label"])
    resized = make_dataset(items, "segmentation", 3, 8, from_files=True)[0]
    assert resized["image"].shape == resized["label"].shape == (1, 8, 8, 8)
    assert set(torch.unique(resized["label"]).tolist()) <= {0.0, 1.0}


def test_png_round_trip_keeps_orientation(tmp_path, seg_site):
    write_site_folder(seg_site, tmp_path, "segmentation", image_format="png")
    items = load_datalist(tmp_path, "segmentation")["training"]
    assert items[0]["image"].endswith(".png")
    dataset = make_dataset(items, "segmentation", 2, 32, from_files=True)
    for item, original in zip(dataset, seg_site["training"], strict=True):
        np.testing.assert_array_equal(item["label"].numpy(), original["label"])
        # 8-bit quantisation, then min-max scaling
        np.testing.assert_allclose(
            item["image"].numpy(), _minmax(original["image"]), atol=0.01
        )


def test_png_rejects_3d(tmp_path):
    site = synthetic_site("classification", 0, 1, spatial_dims=3, image_size=16)
    with pytest.raises(ValueError, match="PNG"):
        write_site_folder(site, tmp_path, "classification", image_format="png")


def test_classification_folder(tmp_path):
    site = synthetic_site("classification", 1, 2, num_classes=3, **SMALL)
    write_site_folder(site, tmp_path, "classification")
    content = json.loads((tmp_path / "dataset.json").read_text())
    assert not (tmp_path / "labelsTr").exists()
    assert [e["label"] for e in content["training"]] == [
        item["label"] for item in site["training"]
    ]
    items = load_datalist(tmp_path, "classification")["training"]
    dataset = make_dataset(items, "classification", 2, 32, from_files=True)
    for item, original in zip(dataset, site["training"], strict=True):
        assert item["label"].dtype == torch.long and item["label"].ndim == 0
        assert int(item["label"]) == original["label"]


@pytest.mark.parametrize(
    ("name", "size"), [("CT_small.dcm", 128), ("MR_small.dcm", 64)]
)
def test_dicom_from_pydicom_test_data(tmp_path, name, size):
    dicom = get_testdata_file(name)
    shutil.copy(dicom, tmp_path / name)
    _write_json(
        tmp_path,
        {
            "training": [{"image": name, "label": 1}],
            "validation": [{"image": name, "label": 0}],
        },
    )
    items = load_datalist(tmp_path, "classification")["training"]
    raw = make_dataset(items, "classification", 2, size, from_files=True)[0]
    assert raw["image"].shape == (1, size, size)  # the DICOM's own grid
    item = make_dataset(items, "classification", 2, 32, from_files=True)[0]
    assert item["image"].shape == (1, 32, 32)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert float(item["image"].std()) > 0.05  # real anatomy, not a blank
    assert int(item["label"]) == 1


def test_rgb_dicom_and_rgb_png_become_one_channel(tmp_path):
    rgb_dicom = get_testdata_file("examples_rgb_color.dcm")
    colour = np.random.RandomState(0).randint(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "rgb.png")
    items = [
        {"image": rgb_dicom, "label": 0},
        {"image": str(tmp_path / "rgb.png"), "label": 1},
    ]
    dataset = make_dataset(items, "classification", 2, 24, from_files=True)
    for index in range(2):
        assert dataset[index]["image"].shape == (1, 24, 24)


def test_corrupt_file_error_names_it(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(np.random.RandomState(0).bytes(300))
    items = [{"image": str(tmp_path / "x.nii.gz"), "label": 0}]
    dataset = make_dataset(items, "classification", 2, 32, from_files=True)
    with pytest.raises(ImageReadError, match=r"x\.nii\.gz") as info:
        dataset[0]
    assert info.value.path == str(tmp_path / "x.nii.gz")
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    with pytest.raises(ImageReadError, match=r"x\.nii\.gz"):
        next(iter(loader))


def test_wrong_dimensionality_names_file(tmp_path, seg_site):
    write_site_folder(seg_site, tmp_path, "segmentation")
    items = load_datalist(tmp_path, "segmentation")["training"]
    dataset = make_dataset(items, "segmentation", 3, 16, from_files=True)
    with pytest.raises(ImageReadError, match="train_0000.nii.gz.*3 spatial dims"):
        dataset[0]


# --- datalist validation -------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    image = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), image)
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), tmp_path / "m.nii.gz"
    )
    return tmp_path


def test_missing_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_datalist(tmp_path, "segmentation")
    with pytest.raises(FileNotFoundError, match="other.json"):
        load_datalist(tmp_path, "segmentation", datalist="other.json")


def test_invalid_json(folder):
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(folder, "classification")


@pytest.mark.parametrize("missing", ["training", "validation"])
def test_missing_split_names_key_and_file(folder, missing):
    content = {"training": [{"image": "img.nii.gz", "label": 0}]}
    content["validation"] = content["training"]
    del content[missing]
    json_path = _write_json(folder, content)
    with pytest.raises(ValueError, match=f"'{missing}'") as info:
        load_datalist(folder, "classification")
    assert str(json_path) in str(info.value)


def test_empty_split(folder):
    _write_json(
        folder, {"training": [], "validation": [{"image": "img.nii.gz", "label": 0}]}
    )
    with pytest.raises(ValueError, match="'training'.*non-empty"):
        load_datalist(folder, "classification")


def test_item_without_image(folder):
    entry = {"image": "img.nii.gz", "label": 0}
    _write_json(folder, {"training": [entry], "validation": [{"label": 0}]})
    with pytest.raises(ValueError, match="item 0 of 'validation'.*no 'image'"):
        load_datalist(folder, "classification")


def test_missing_image_file(folder):
    entry = {"image": "img.nii.gz", "label": 0}
    _write_json(
        folder,
        {
            "training": [entry, {"image": "gone.nii.gz", "label": 1}],
            "validation": [entry],
        },
    )
    with pytest.raises(FileNotFoundError, match=r"item 1 of 'training'.*gone\.nii\.gz"):
        load_datalist(folder, "classification")


@pytest.mark.parametrize("label", ["1", 1.5, True, -1, None])
def test_classification_label_must_be_class_index(folder, label):
    good = {"image": "img.nii.gz", "label": 0}
    _write_json(
        folder,
        {
            "training": [good, {"image": "img.nii.gz", "label": label}],
            "validation": [good],
        },
    )
    with pytest.raises(ValueError, match="item 1 of 'training'.*integer class index"):
        load_datalist(folder, "classification")


def test_segmentation_label_must_be_a_path(folder):
    good = {"image": "img.nii.gz", "label": "m.nii.gz"}
    _write_json(
        folder,
        {"training": [good], "validation": [{"image": "img.nii.gz", "label": 1}]},
    )
    with pytest.raises(ValueError, match="item 0 of 'validation'.*file path"):
        load_datalist(folder, "segmentation")
    _write_json(
        folder,
        {
            "training": [good],
            "validation": [{"image": "img.nii.gz", "label": "no.nii.gz"}],
        },
    )
    with pytest.raises(FileNotFoundError, match=r"label file.*no\.nii\.gz"):
        load_datalist(folder, "segmentation")


def test_task_mismatch(folder):
    entry = {"image": "img.nii.gz", "label": "m.nii.gz"}
    _write_json(
        folder, {"task": "segmentation", "training": [entry], "validation": [entry]}
    )
    assert len(load_datalist(folder, "segmentation")["training"]) == 1
    with pytest.raises(
        ValueError, match="for task 'segmentation', not 'classification'"
    ):
        load_datalist(folder, "classification")


def test_cli_writes_site_folders(tmp_path, capsys):
    args = ["--task", "classification", "--num-sites", "2", "--out", str(tmp_path)]
    args += ["--image-size", "16", "--samples-per-site", "4", "--format", "png"]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "site-0"), str(tmp_path / "site-1")]
    for folder in printed:
        datalist = load_datalist(folder, "classification")
        assert datalist["training"][0]["image"].endswith(".png")

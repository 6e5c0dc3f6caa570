"""Synthetic multi-site generator: determinism, shapes and the three kinds of skew."""

import itertools

import numpy as np
import pytest

from flower_medimg.data import (
    ScannerProfile,
    scanner_profile,
    site_num_samples,
    synthetic_site,
    synthetic_test_set,
)

SMALL = {"image_size": 32, "samples_per_site": 8}


def _all_items(site):
    return site["training"] + site["validation"]


def _pixels(site):
    return np.stack([item["image"] for item in _all_items(site)])


def _same_site(a, b):
    if a.keys() != b.keys():
        return False
    for split in a:
        if len(a[split]) != len(b[split]):
            return False
        for x, y in zip(a[split], b[split], strict=True):
            if not np.array_equal(x["image"], y["image"]):
                return False
            if not np.array_equal(np.asarray(x["label"]), np.asarray(y["label"])):
                return False
    return True


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_same_arguments_give_bit_identical_sites(task):
    a = synthetic_site(task, 1, 3, seed=7, **SMALL)
    b = synthetic_site(task, 1, 3, seed=7, **SMALL)
    assert _same_site(a, b)
    assert not _same_site(a, synthetic_site(task, 1, 3, seed=8, **SMALL))
    assert not _same_site(a, synthetic_site(task, 2, 3, seed=7, **SMALL))


def test_segmentation_items_2d():
    site = synthetic_site("segmentation", 0, 2, **SMALL)
    assert len(site["training"]) == 6 and len(site["validation"]) == 2
    for item in _all_items(site):
        image, label = item["image"], item["label"]
        assert image.shape == (1, 32, 32) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert label.shape == (1, 32, 32) and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1}
        # lesions are brighter than the rest of the image on average
        assert image[label == 1].mean() > image[label == 0].mean() + 0.2


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_3d_site_shapes(task):
    site = synthetic_site(task, 0, 2, spatial_dims=3, image_size=16, samples_per_site=4)
    assert len(site["training"]) == 3 and len(site["validation"]) == 1
    for item in _all_items(site):
        assert item["image"].shape == (1, 16, 16, 16)
        if task == "segmentation":
            assert item["label"].shape == (1, 16, 16, 16)
            assert item["label"].any()
        else:
            assert isinstance(item["label"], int)


def test_classification_balanced_without_label_skew():
    site = synthetic_site("classification", 0, 2, num_classes=3, image_size=32)
    labels = [item["label"] for item in _all_items(site)]
    assert all(isinstance(label, int) for label in labels)
    assert np.bincount(labels, minlength=3).tolist() == [11, 11, 10]  # 32 images


def test_classification_lesion_classes_are_visible():
    # class 0 has no lesion, classes 1 and 2 have a small and a large lesion
    site = synthetic_site("classification", 0, 1, num_classes=3, scanner_shift=0.0)
    bright = {0: [], 1: [], 2: []}
    for item in _all_items(site):
        bright[item["label"]].append((item["image"] > 0.45).mean())
    assert max(bright[0]) < 0.01
    assert np.mean(bright[1]) < np.mean(bright[2])


def test_label_skew_gives_each_site_its_own_class_mix():
    def class_fractions(label_skew):
        fractions = []
        for site_id in range(4):
            site = synthetic_site(
                "classification",
                site_id,
                4,
                image_size=16,
                samples_per_site=24,
                num_classes=3,
                label_skew=label_skew,
            )
            labels = [item["label"] for item in _all_items(site)]
            fractions.append(np.bincount(labels, minlength=3) / len(labels))
        return np.array(fractions)

    balanced = class_fractions(0.0)
    np.testing.assert_allclose(balanced, 1 / 3, atol=0.01)
    skewed = class_fractions(2.0)  # Dirichlet concentration 0.5
    spread = skewed.max(axis=0) - skewed.min(axis=0)
    assert spread.max() > 0.5


def test_quantity_skew_sizes():
    assert [site_num_samples(k, 4, 32, 0.0) for k in range(4)] == [32] * 4
    # geometric shares 1:2:4:8 of 120 images, in a seed-dependent site order
    sizes = [site_num_samples(k, 4, 30, np.log(2.0)) for k in range(4)]
    assert sorted(sizes) == [8, 16, 32, 64]
    assert min(site_num_samples(k, 4, 32, 5.0) for k in range(4)) == 4  # floor
    site_sizes = []
    for k in range(3):
        site = synthetic_site("segmentation", k, 3, image_size=16, quantity_skew=1.0)
        site_sizes.append(len(_all_items(site)))
    assert site_sizes == [site_num_samples(k, 3, 32, 1.0) for k in range(3)]
    assert len(set(site_sizes)) == 3


def test_scanner_profiles():
    assert all(
        scanner_profile(k, seed=3, shift=0.0) == ScannerProfile() for k in range(8)
    )
    assert scanner_profile(2, seed=1) == scanner_profile(2, seed=1)
    log_gammas = [np.log2(scanner_profile(k).gamma) for k in range(4)]
    # first four sites spread over the gamma range: at least a quarter of it apart
    gaps = np.diff(sorted(log_gammas))
    assert gaps.min() > 0.25 * 2 * np.log2(3.0) - 1e-9


def _wasserstein(a, b):
    q = np.linspace(0.01, 0.99, 99)
    return float(np.abs(np.quantile(a, q) - np.quantile(b, q)).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_scanner_shift_changes_intensity_statistics(seed):
    def distances(shift):
        pixels = [
            _pixels(
                synthetic_site(
                    "segmentation",
                    k,
                    4,
                    image_size=32,
                    samples_per_site=16,
                    scanner_shift=shift,
                    seed=seed,
                )
            )
            for k in range(4)
        ]
        return [_wasserstein(a, b) for a, b in itertools.combinations(pixels, 2)]

    shifted = distances(1.0)
    iid = distances(0.0)
    assert min(shifted) > 0.04  # every pair of scanners differs clearly
    assert max(iid) < 0.035  # same scanner: only patient-to-patient variation
    assert min(shifted) > max(iid)


def test_test_set_is_held_out_and_has_an_unseen_scanner():
    kwargs = {"image_size": 16, "samples_per_site": 8, "quantity_skew": 0.5, "seed": 4}
    seen = synthetic_test_set("classification", 3, **kwargs)
    unseen = synthetic_test_set("classification", 3, scanners="unseen", **kwargs)
    assert len(seen) == len(unseen) == 3 * 2  # round(8 * 0.25) new patients per site
    site_images = [
        item["image"]
        for k in range(3)
        for split in synthetic_site("classification", k, 3, **kwargs).values()
        for item in split
    ]
    for item in seen + unseen:  # no site holds a test image
        assert not any(np.array_equal(item["image"], x) for x in site_images)
    # balanced: each site's test patients are one per class (2 classes, 2 patients)
    assert sorted(item["label"] for item in seen) == [0, 0, 0, 1, 1, 1]
    # the unseen scanner is none of the sites'
    assert all(scanner_profile(3, 4) != scanner_profile(k, 4) for k in range(3))
    again = synthetic_test_set("classification", 3, scanners="unseen", **kwargs)
    for got, want in zip(again, unseen, strict=True):
        assert np.array_equal(got["image"], want["image"])
    with pytest.raises(ValueError, match="scanners"):
        synthetic_test_set("classification", 3, scanners="other", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "detection"}, "task"),
        ({"site_id": 3}, "site_id"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_size": 8, "num_classes": 5}, "too small"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"task": "classification", "site_id": 0, "num_sites": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthetic_site(
            args.pop("task"), args.pop("site_id"), args.pop("num_sites"), **args
        )

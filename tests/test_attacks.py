"""Simulated misbehaving sites (flower_medimg.client_apps.attacks)."""

import numpy as np
import pytest
import torch

from flower_medimg.client_apps.attacks import ATTACK_KINDS, apply_attack, flip_labels


def _arrays():
    glob = {
        "w": np.array([[1.0, 2.0]], np.float32),
        "b": np.array([0.5], np.float32),
        "n": np.array(3, np.int64),
    }
    local = {
        "w": np.array([[1.5, 1.0]], np.float32),
        "b": np.array([0.0], np.float32),
        "n": np.array(5, np.int64),
    }
    return glob, local


def test_attack_kinds_are_sorted_and_unknown_kind_lists_them():
    assert tuple(sorted(ATTACK_KINDS)) == ATTACK_KINDS
    glob, local = _arrays()
    with pytest.raises(ValueError, match="sign-flip"):
        apply_attack("backdoor", glob, local, np.random.default_rng(0))


def test_sign_flip_scales_the_update_by_minus_three():
    glob, local = _arrays()
    out = apply_attack("sign-flip", glob, local, np.random.default_rng(0))
    np.testing.assert_allclose(out["w"], [[1.0 - 1.5, 2.0 + 3.0]])
    np.testing.assert_allclose(out["b"], [0.5 + 1.5])
    assert out["w"].dtype == np.float32 and out["n"] == 5


def test_gaussian_nan_free_rider_label_flip():
    glob, local = _arrays()
    rng = np.random.default_rng(0)
    gauss = apply_attack("gaussian", glob, local, rng)
    assert gauss["w"].shape == (1, 2) and gauss["w"].dtype == np.float32
    assert not np.allclose(gauss["w"], local["w"])
    nan = apply_attack("nan", glob, local, rng)
    assert np.all(np.isnan(nan["w"])) and nan["n"] == 5
    free = apply_attack("free-rider", glob, local, rng)
    for key in glob:
        np.testing.assert_array_equal(free[key], glob[key])
    same = apply_attack("label-flip", glob, local, rng)
    np.testing.assert_array_equal(same["w"], local["w"])
    assert local["w"][0, 0] == 1.5  # inputs untouched


def test_mismatched_keys_renames_and_drops():
    glob, local = _arrays()
    out = apply_attack("mismatched-keys", glob, local, np.random.default_rng(0))
    assert set(out) != set(local)
    assert "w.renamed" in out and "n" not in out


def test_flip_labels_segmentation_and_classification():
    mask = np.array([[0, 1], [1, 0]], np.uint8)
    np.testing.assert_array_equal(flip_labels(mask), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(flip_labels(mask.astype(bool)), [[1, 0], [0, 1]])
    labels = torch.tensor([0, 1, 2, 2])
    flipped = flip_labels(labels, num_classes=3)
    assert torch.equal(flipped, torch.tensor([2, 1, 0, 0]))
    assert torch.equal(flip_labels(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        flip_labels(labels, num_classes=1)

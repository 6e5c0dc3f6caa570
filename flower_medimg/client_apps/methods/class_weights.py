"""Class-weighted loss against label skew, from the site's own class counts.

Qu, Balachandar and Rubin, "An Experimental Study of Data Heterogeneity in
Federated Learning Methods for Medical Imaging", 2021,
https://arxiv.org/abs/2107.08371: a weighted loss counters label skew. The exact
weighting is not published; we use the standard "balanced" inverse frequency of
the *local* counts (our reconstruction):
``w_c = n / (C * n_c)``. The counts never leave the site.

For classification the weights go into cross-entropy, whose weighted mean is
``sum_i w_{y_i} CE_i / sum_i w_{y_i}``; for segmentation they are per-class
(background included) weights of MONAI's ``DiceCELoss``, from voxel counts.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from monai.losses import DiceCELoss

__all__ = ["balanced_class_weights", "class_counts", "weighted_loss"]


def balanced_class_weights(counts: Iterable[float]) -> np.ndarray:
    """Return ``w_c = n / (C * n_c)`` for the classes present locally.

    A class absent at the site has no sample whose loss it could weight; it gets
    the neutral weight 1 so that the weights stay finite.

    Parameters
    ----------
    counts : Iterable[float]
        Local count of every class (images, or voxels for segmentation).

    Returns
    -------
    numpy.ndarray
        float64 weights, one per class.
    """
    counts = np.asarray(list(counts), dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2 or np.any(counts < 0):
        raise ValueError(f"class counts must be >= 0 for >= 2 classes, got {counts}")
    total = counts.sum()
    if total == 0:
        raise ValueError("class counts are all zero: the site has no labelled data")
    weights = np.ones_like(counts)
    present = counts > 0
    weights[present] = total / (counts.size * counts[present])
    return weights


def class_counts(labels: Iterable[torch.Tensor | int], num_classes: int) -> np.ndarray:
    """Count class labels (ints) or mask voxels (tensors) per class."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        values = torch.as_tensor(label).long().reshape(-1)
        counts += torch.bincount(values, minlength=num_classes)[:num_classes].numpy()
    return counts


def weighted_loss(task: str, counts: Iterable[float]) -> torch.nn.Module:
    """Return the task's loss with balanced class weights from ``counts``.

    Parameters
    ----------
    task : str
        ``"classification"`` (cross-entropy) or ``"segmentation"`` (DiceCE).
    counts : Iterable[float]
        Local class counts (see :func:`class_counts`).
    """
    weight = torch.as_tensor(balanced_class_weights(counts), dtype=torch.float32)
    if task == "classification":
        return torch.nn.CrossEntropyLoss(weight=weight)
    if task == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    raise ValueError(
        f"Unknown task {task!r}; valid tasks: classification, segmentation"
    )

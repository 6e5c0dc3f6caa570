"""What differs between segmentation and classification: the loss and the metrics.

A task is used the same way by the ClientApps (federated evaluation on a site's
validation split) and by the ServerApp (central evaluation on a server-held set).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.common.logger import log
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_roc_auc
from monai.networks.utils import one_hot

__all__ = [
    "TASKS",
    "ClassificationTask",
    "SegmentationTask",
    "Task",
    "get_task",
]


@dataclass
class Task:
    """Loss and evaluation of one kind of imaging task."""

    name: str
    metric_names: tuple[str, ...] = field(default=())

    def loss_fn(self) -> torch.nn.Module:
        """Return the training loss."""
        raise NotImplementedError

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[dict], device: torch.device
    ) -> dict[str, float]:
        """Return ``eval-loss`` and the task's metrics of ``model`` on ``batches``."""
        raise NotImplementedError


class SegmentationTask(Task):
    """Multi-class segmentation (background + foreground classes).

    Trained with MONAI's ``DiceCELoss``; evaluated with mean Dice and the 95th
    percentile Hausdorff distance (``hd95``, in pixels/voxels) over the foreground
    classes. An image whose prediction has no foreground has no defined Hausdorff
    distance; it is scored with the image diagonal, the largest distance possible,
    so that a model that predicts nothing is not rewarded.
    """

    def __init__(self) -> None:
        super().__init__("segmentation", ("dice", "hd95"))

    def loss_fn(self) -> torch.nn.Module:
        """Return Dice + cross-entropy on softmax outputs and integer masks."""
        return DiceCELoss(to_onehot_y=True, softmax=True)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[dict], device: torch.device
    ) -> dict[str, float]:
        """Return ``eval-loss``, ``dice`` and ``hd95`` averaged over the images."""
        model.eval()
        loss_fn = self.loss_fn()
        dice = DiceMetric(include_background=False, reduction="none")
        hausdorff = HausdorffDistanceMetric(
            include_background=False, percentile=95, reduction="none"
        )
        losses, dices, distances = [], [], []
        for batch in batches:
            image = batch["image"].to(device)
            label = batch["label"].to(device)
            logits = model(image)
            losses.append(float(loss_fn(logits, label)) * image.shape[0])
            num_classes = logits.shape[1]
            pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
            target = one_hot(label.long(), num_classes)
            dices.append(dice(pred, target).nanmean(dim=1).cpu())
            diagonal = math.sqrt(sum(s**2 for s in image.shape[2:]))
            with warnings.catch_warnings():
                # MONAI 1.5-1.6's own HausdorffDistanceMetric passes the deprecated
                # get_mask_edges(always_return_as_numpy=False); nothing to change here
                warnings.filterwarnings(
                    "ignore", message=".*always_return_as_numpy", category=FutureWarning
                )
                hd = hausdorff(pred, target).nanmean(dim=1).cpu()
            distances.append(torch.where(torch.isfinite(hd), hd, diagonal))
        num_images = sum(len(d) for d in dices)
        dice_values = torch.cat(dices)
        return {
            "eval-loss": sum(losses) / num_images,
            # An image without any foreground in its label has no Dice; skip it.
            "dice": float(dice_values.nanmean()) if num_images else math.nan,
            "hd95": float(torch.cat(distances).mean()),
        }


class ClassificationTask(Task):
    """Image classification (binary or multi-class).

    Trained with cross-entropy; evaluated with accuracy, AUROC (one-vs-rest, macro
    average for more than two classes), sensitivity and specificity (for two classes
    class 1 is positive; for more, the macro averages of the per-class values). When
    a site's split holds a single class AUROC is undefined and reported as 0.5, the
    score of a model without skill, with a log line.
    """

    def __init__(self) -> None:
        super().__init__(
            "classification", ("accuracy", "auroc", "sensitivity", "specificity")
        )

    def loss_fn(self) -> torch.nn.Module:
        """Return cross-entropy on logits and integer labels."""
        return torch.nn.CrossEntropyLoss()

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[dict], device: torch.device
    ) -> dict[str, float]:
        """Return ``eval-loss``, accuracy, AUROC, sensitivity and specificity."""
        model.eval()
        loss_fn = self.loss_fn()
        all_logits, all_labels = [], []
        for batch in batches:
            all_logits.append(model(batch["image"].to(device)).cpu())
            all_labels.append(batch["label"].long().view(-1).cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        num_classes = logits.shape[1]
        probs = logits.softmax(dim=1)
        pred = probs.argmax(dim=1)
        metrics = {
            "eval-loss": float(loss_fn(logits, labels)),
            "accuracy": float((pred == labels).float().mean()),
            "auroc": _auroc(probs, labels, num_classes),
        }
        metrics.update(_sensitivity_specificity(pred, labels, num_classes))
        return metrics


def _auroc(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    if len(torch.unique(labels)) < 2:
        log(WARNING, "AUROC undefined: the split holds a single class; reported 0.5")
        return 0.5
    if num_classes == 2:
        return float(compute_roc_auc(probs[:, 1], labels))
    present = torch.unique(labels)
    target = one_hot(labels[:, None], num_classes)[:, present]
    return float(compute_roc_auc(probs[:, present], target, average="macro"))


def _sensitivity_specificity(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels.numpy(), pred.numpy()), 1)
    true_pos = np.diag(confusion)
    false_neg = confusion.sum(axis=1) - true_pos
    false_pos = confusion.sum(axis=0) - true_pos
    true_neg = confusion.sum() - true_pos - false_neg - false_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = true_pos / (true_pos + false_neg)
        specificity = true_neg / (true_neg + false_pos)
    if num_classes == 2:
        sensitivity, specificity = sensitivity[1:], specificity[1:]
    return {
        "sensitivity": _mean_defined(sensitivity, "sensitivity"),
        "specificity": _mean_defined(specificity, "specificity"),
    }


def _mean_defined(values: np.ndarray, name: str) -> float:
    """Mean over the classes where ``name`` is defined (NaN, logged, if none is)."""
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        log(WARNING, "%s undefined: the split holds no example of the class", name)
        return math.nan
    return float(defined.mean())


TASKS: dict[str, type[Task]] = {
    "segmentation": SegmentationTask,
    "classification": ClassificationTask,
}


def get_task(name: str) -> Task:
    """Return the task called ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()

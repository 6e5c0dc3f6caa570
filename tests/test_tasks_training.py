import math

import numpy as np
import pytest
import torch

from flower_medimg.client_apps.training import (
    make_optimizer,
    mean_loss,
    nova_a,
    train_local,
)
from flower_medimg.core.models import build_model
from flower_medimg.core.tasks import get_task


def _seg_batches(num=8, size=32, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(0, num, batch):
        labels = np.zeros((batch, 1, size, size), np.float32)
        for i in range(batch):
            r, c = rng.integers(6, size - 6, 2)
            labels[i, 0, r - 4 : r + 4, c - 4 : c + 4] = 1
        images = labels * 0.8 + rng.normal(0, 0.1, labels.shape).astype(np.float32)
        batches.append(
            {"image": torch.from_numpy(images), "label": torch.from_numpy(labels)}
        )
    return batches


def test_segmentation_loss_goes_down():
    torch.manual_seed(0)
    task = get_task("segmentation")
    model = build_model("segmentation", "unet", channels="8,16")
    batches = _seg_batches()
    loss_fn = task.loss_fn()
    before = mean_loss(model, batches, loss_fn, torch.device("cpu"))
    optimizer = make_optimizer(model, "adam", lr=0.01)
    result = train_local(model, batches, loss_fn, optimizer, 5, torch.device("cpu"))
    after = mean_loss(model, batches, loss_fn, torch.device("cpu"))
    assert after < 0.8 * before
    assert result.steps == 10  # 5 epochs x 2 batches
    assert result.num_samples == 40


def test_segmentation_metrics_perfect_and_empty_prediction():
    task = get_task("segmentation")
    batches = _seg_batches(num=4, batch=4)
    label = batches[0]["label"]

    class Oracle(torch.nn.Module):
        def __init__(self, flip):
            super().__init__()
            self.flip = flip

        def forward(self, x):
            fg = torch.zeros_like(label) if self.flip else label
            return torch.cat([1 - fg, fg], dim=1) * 10

    perfect = task.evaluate(Oracle(False), batches, torch.device("cpu"))
    assert perfect["dice"] == pytest.approx(1.0)
    assert perfect["hd95"] == pytest.approx(0.0)
    empty = task.evaluate(Oracle(True), batches, torch.device("cpu"))
    assert empty["dice"] == pytest.approx(0.0)
    # no predicted foreground: scored with the image diagonal
    assert empty["hd95"] == pytest.approx(math.sqrt(2 * 32**2))


def test_classification_metrics_hand_computed():
    task = get_task("classification")
    # labels 0,0,1,1 ; scores for class 1: 0.1, 0.6, 0.4, 0.9
    p1 = torch.tensor([0.1, 0.6, 0.4, 0.9])
    logits = torch.log(torch.stack([1 - p1, p1], dim=1))
    labels = torch.tensor([0, 0, 1, 1])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    batches = [{"image": torch.zeros(4, 1, 2, 2), "label": labels}]
    metrics = task.evaluate(Fixed(), batches, torch.device("cpu"))
    # predictions 0,1,0,1 -> accuracy 0.5; TP=1, FN=1, TN=1, FP=1
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["sensitivity"] == pytest.approx(0.5)
    assert metrics["specificity"] == pytest.approx(0.5)
    # pairs (pos, neg): (0.4>0.1), (0.4<0.6), (0.9>0.1), (0.9>0.6) -> 3/4
    assert metrics["auroc"] == pytest.approx(0.75)
    expected_ce = -np.mean(np.log([0.9, 0.4, 0.4, 0.9]))
    assert metrics["eval-loss"] == pytest.approx(expected_ce, rel=1e-5)


def test_classification_loss_goes_down():
    torch.manual_seed(0)
    task = get_task("classification")
    model = build_model(
        "classification", "resnet10", norm="batch", channels="8,8,16,16"
    )
    x = torch.rand(16, 1, 32, 32)
    y = torch.tensor([0, 1] * 8)
    x[y == 1] += 1.0
    batches = [{"image": x[i : i + 8], "label": y[i : i + 8]} for i in (0, 8)]
    loss_fn = task.loss_fn()
    before = mean_loss(model, batches, loss_fn, torch.device("cpu"))
    optimizer = make_optimizer(model, "adam", lr=0.01)
    train_local(model, batches, loss_fn, optimizer, 10, torch.device("cpu"))
    after = mean_loss(model, batches, loss_fn, torch.device("cpu"))
    assert after < 0.5 * before


def test_nova_a_matches_spec_examples():
    assert nova_a(4) == 4.0
    assert nova_a(4, momentum=0.9) == pytest.approx(9.049, abs=1e-6)


def test_unknown_optimizer_and_task():
    with pytest.raises(ValueError, match="valid optimizers: adam, sgd"):
        make_optimizer(torch.nn.Linear(1, 1), "lbfgs", lr=0.1)
    with pytest.raises(ValueError, match="valid tasks: segmentation, classification"):
        get_task("detection")

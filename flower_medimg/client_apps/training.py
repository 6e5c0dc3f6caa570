"""The local training loop every ClientApp runs at its site."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from flower_medimg.core.settings import OPTIMIZERS

from .methods.harmofl import perturbed_step

__all__ = [
    "LocalTrainingResult",
    "drops_last_batch",
    "make_optimizer",
    "mean_loss",
    "nova_a",
    "train_batches",
    "train_local",
]


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one call of :func:`train_local` did."""

    steps: int
    num_samples: int
    mean_loss: float
    empty_batches: int = 0


def drops_last_batch(num_examples: int, batch_size: int) -> bool:
    """Whether the shuffled training loader drops its last batch.

    It does when that batch would hold one image: BatchNorm cannot train on it.
    """
    return num_examples % batch_size == 1


def train_batches(num_examples: int, batch_size: int) -> int:
    """Batches per epoch of the site's shuffled training loader (DP-SGD's lots)."""
    if drops_last_batch(num_examples, batch_size):
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def make_optimizer(
    model: torch.nn.Module, name: str, lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """Build the local optimizer (``"adam"`` or ``"sgd"``, with optional momentum)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    raise ValueError(
        f"Unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
    )


def train_local(
    model: torch.nn.Module,
    batches: Iterable[dict],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    *,
    penalty: Callable[[], torch.Tensor] | None = None,
    perturbation: float = 0.0,
) -> LocalTrainingResult:
    """Train ``model`` in place for ``epochs`` passes over ``batches``.

    Parameters
    ----------
    model : torch.nn.Module
        The network, already on ``device``.
    batches : Iterable[dict]
        A re-iterable loader of ``{"image", "label"}`` batches.
    loss_fn : torch.nn.Module
        The task's loss.
    optimizer : torch.optim.Optimizer
        Optimizer over ``model``'s parameters.
    epochs : int
        Number of local epochs.
    device : torch.device
        Where the batches go.
    penalty : callable, optional
        A term added to every batch's loss, e.g. FedProx's proximal term
        (:func:`~flower_medimg.client_apps.methods.proximal_penalty`).
    perturbation : float
        HarmoFL's weight-perturbation radius; ``> 0`` makes every step a
        :func:`~flower_medimg.client_apps.methods.perturbed_step`.

    Returns
    -------
    LocalTrainingResult
        Optimizer steps taken, samples seen, the mean training loss and the number
        of empty batches skipped.
    """
    model.train()
    steps, samples, loss_sum, empty = 0, 0, 0.0, 0
    for _ in range(epochs):
        for batch in batches:
            image = batch["image"].to(device)
            if image.shape[0] == 0:  # a Poisson-sampled DP-SGD lot can be empty
                empty += 1
                continue
            label = _as_target(batch["label"], loss_fn).to(device)
            objective = functools.partial(
                _objective, model, loss_fn, image, label, penalty
            )
            if perturbation > 0:
                loss = perturbed_step(model, objective, optimizer, perturbation)
            else:
                optimizer.zero_grad(set_to_none=True)
                loss = objective()
                loss.backward()
                optimizer.step()
            steps += 1
            samples += image.shape[0]
            loss_sum += float(loss.detach()) * image.shape[0]
    return LocalTrainingResult(
        steps=steps,
        num_samples=samples,
        mean_loss=loss_sum / max(samples, 1),
        empty_batches=empty,
    )


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    batches: Iterable[dict],
    loss_fn: torch.nn.Module,
    device: torch.device,
) -> float:
    """Mean per-sample loss of ``model`` (in eval mode) over ``batches``."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        image = batch["image"].to(device)
        label = _as_target(batch["label"], loss_fn).to(device)
        total += float(loss_fn(model(image), label)) * image.shape[0]
        count += image.shape[0]
    return total / max(count, 1)


def nova_a(steps: int, momentum: float = 0.0) -> float:
    """FedNova's normalising scalar ``a`` for ``steps`` local SGD steps.

    Plain SGD gives ``a = steps``; with momentum ``rho`` the closed form is
    ``[steps - rho (1 - rho^steps) / (1 - rho)] / (1 - rho)`` (Wang et al., 2020,
    https://arxiv.org/abs/2007.07481). Adam has no closed form: its clients report
    the step count, the usual approximation.
    """
    if momentum == 0.0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def _objective(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None,
) -> torch.Tensor:
    loss = loss_fn(model(image), label)
    return loss if penalty is None else loss + penalty().to(loss.device)


def _as_target(label: torch.Tensor, loss_fn: torch.nn.Module) -> torch.Tensor:
    """Cross-entropy wants class indices of shape (B,); Dice losses keep the mask."""
    if isinstance(loss_fn, torch.nn.CrossEntropyLoss):
        return label.long().view(-1)
    return label

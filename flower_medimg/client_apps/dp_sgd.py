"""Sample-level differential privacy at the site: DP-SGD with Opacus.

DP-SGD (Abadi et al., 2016, https://arxiv.org/abs/1607.00133) clips every example's
gradient to ``max_grad_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to each lot, with lots drawn by Poisson
sampling. The privacy loss of a site adds up over *all* the steps it ever trains,
across rounds and runs, so the accountant's history is kept in the site's state
(:class:`~flower_medimg.client_apps.site_state.SiteState`) and the reported
``dp-epsilon`` is the site's cumulative ε — unlike a privacy engine rebuilt every
round, whose ε covers one round only.

``dp-max-epsilon`` in the site's ``node_config`` is the site's own budget: a round
that would take ε above it is refused with :class:`PrivacyBudgetExceededError` before
any training, the site's reply carries that error, and the server goes on with the
other sites.

The network is made DP-compatible (BatchNorm replaced by GroupNorm) by
:func:`flower_medimg.models.model_from_settings` on both the server and the sites, so
the state_dict keys match; Opacus's ``_module.`` prefix never reaches the wire
because the replies are built from the unwrapped network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.blocks.segresnet_block import ResBlock

from flower_medimg.core.quiet_imports import root_logger_kept
from flower_medimg.core.settings import Settings

from .site_state import SiteState

with root_logger_kept():
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "ACCOUNTANT_STATE",
    "DPSettings",
    "PrivacyBudgetExceededError",
    "RoundSpend",
    "plan_round",
    "privatize",
]

#: Blocks whose forward adds the residual in place (incompatible with hooks mode).
_INPLACE_RESIDUAL_BLOCKS = (ResBlock,)

#: Name of the accountant's history in the site state (one per site, not per run:
#: the budget protects the site's data whatever model trains on it).
ACCOUNTANT_STATE = "dp-accountant"


class PrivacyBudgetExceededError(RuntimeError):
    """The next round would take the site's ε above its ``dp-max-epsilon``."""


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD settings from the run config (``dp.*``).

    Parameters
    ----------
    noise_multiplier : float
        σ; 0 with ``target_epsilon`` 0 switches DP-SGD off.
    target_epsilon : float
        If > 0, σ is calibrated so that the whole run (all rounds) spends this ε.
    max_grad_norm : float
        Per-example gradient clipping bound C.
    delta : float
        δ of the reported (ε, δ).
    grad_sample_mode : str
        Opacus per-sample-gradient mode, or ``"auto"``: ``"hooks"`` (the fastest on
        MONAI's convolutional networks, see ``sim/privacy_cost.py``) unless the
        network adds its residuals in place, which Opacus's backward hooks forbid
        (MONAI's SegResNet blocks, ``x += identity``); those get ``"ew"``
        (PyTorch's expanded weights).
    """

    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    grad_sample_mode: str = "auto"

    def mode_for(self, model: torch.nn.Module) -> str:
        """Return the per-sample-gradient mode to use for ``model``."""
        if self.grad_sample_mode != "auto":
            return self.grad_sample_mode
        if any(isinstance(m, _INPLACE_RESIDUAL_BLOCKS) for m in model.modules()):
            return "ew"
        return "hooks"

    @classmethod
    def from_settings(cls, settings: Settings) -> DPSettings | None:
        """Return the run's DP-SGD settings, or None when DP-SGD is off."""
        if not settings.dp_sgd:
            return None
        return cls(
            noise_multiplier=settings["dp.noise-multiplier"],
            target_epsilon=settings["dp.target-epsilon"],
            max_grad_norm=settings["dp.max-grad-norm"],
            delta=settings["dp.delta"],
            grad_sample_mode=settings["dp.grad-sample-mode"],
        )


@dataclass(frozen=True)
class RoundSpend:
    """What one round of DP-SGD at a site adds to its accountant's history.

    Attributes
    ----------
    noise_multiplier : float
        σ of the round.
    sample_rate : float
        Poisson sampling rate of a lot, ``1 / lots per epoch``.
    steps : int
        Lots drawn in the round (``epochs * lots per epoch``).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_history_entry(self) -> tuple[float, float, int]:
        """Return the ``(σ, q, steps)`` entry of Opacus's RDP accountant history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan_round(
    settings: DPSettings, lots_per_epoch: int, *, epochs: int, num_rounds: int
) -> RoundSpend:
    """Return σ, q and the steps of one round, as :func:`privatize` trains it.

    With a target ε, σ is calibrated (Opacus's ``get_noise_multiplier``, RDP) so
    that ``num_rounds`` rounds of ``epochs * lots_per_epoch`` steps spend it.

    Parameters
    ----------
    settings : DPSettings
        σ or target ε, and δ.
    lots_per_epoch : int
        Batches of the site's training loader (``len(loader)``).
    epochs : int
        Local epochs this round.
    num_rounds : int
        Rounds in the run.
    """
    sample_rate = 1.0 / lots_per_epoch
    steps = epochs * lots_per_epoch
    sigma = settings.noise_multiplier
    if settings.target_epsilon > 0:
        sigma = get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps * num_rounds,
            accountant="rdp",
        )
    return RoundSpend(sigma, sample_rate, steps)


def _accountant(state: SiteState) -> RDPAccountant:
    accountant = RDPAccountant()
    history = state.load_json(ACCOUNTANT_STATE) or []
    accountant.history = [tuple(entry) for entry in history]
    return accountant


@dataclass
class PrivateTraining:
    """A model, optimizer and loader wrapped by Opacus, and how to account for them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float

    def finish(self, state: SiteState, delta: float, empty_lots: int = 0) -> float:
        """Account for lots that were empty, save the history, return cumulative ε.

        A Poisson lot can be empty; it was still drawn, so it is accounted for.
        """
        for _ in range(empty_lots):
            self.engine.accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
        history = [list(entry) for entry in self.engine.accountant.history]
        state.save_json(ACCOUNTANT_STATE, history)
        return self.engine.accountant.get_epsilon(delta)


def privatize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    settings: DPSettings,
    state: SiteState,
    *,
    epochs: int,
    num_rounds: int,
    max_epsilon: float | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD, with the site's history restored.

    Parameters
    ----------
    model, optimizer, loader
        What the site trains with (the loader's batch size is the expected lot size).
    settings : DPSettings
        σ or target ε, clipping bound, δ.
    state : SiteState
        Where the accountant's history lives.
    epochs : int
        Local epochs this round.
    num_rounds : int
        Rounds in the run (to calibrate σ for a target ε over all of them).
    max_epsilon : float, optional
        The site's budget (``node_config["dp-max-epsilon"]``).

    Raises
    ------
    PrivacyBudgetExceededError
        If this round would take the site's ε above ``max_epsilon``.
    """
    spend = plan_round(settings, len(loader), epochs=epochs, num_rounds=num_rounds)
    sigma, sample_rate = spend.noise_multiplier, spend.sample_rate
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = _accountant(state).history
    if max_epsilon is not None:
        planned = RDPAccountant()
        planned.history = [
            *engine.accountant.history,
            spend.as_history_entry(),
        ]
        epsilon = planned.get_epsilon(settings.delta)
        if epsilon > max_epsilon or math.isnan(epsilon):
            raise PrivacyBudgetExceededError(
                "DP budget: this round would take the site's epsilon to "
                f"{epsilon:.3f}, above its dp-max-epsilon {max_epsilon:g} "
                f"(delta={settings.delta:g}); the site does not train"
            )
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=settings.mode_for(model),
    )
    return PrivateTraining(
        dp_model, dp_optimizer, dp_loader, engine, sigma, sample_rate
    )

"""The site's privacy ledger: every ε the site spent, in every run and study.

A privacy budget protects the site's data whatever model trains on them, so the
site, not the run, keeps the account. The warm site runtime charges the ledger
(``<state-dir>/privacy-ledger.jsonl``, hash-chained like the site's audit log)
before it lets a train message run, with what the round will spend:

- **DP-SGD** (Abadi et al., 2016, https://arxiv.org/abs/1607.00133): the round's
  ``(σ, q, steps)``, computed from the run's settings and the site's own training
  set exactly as the ClientApp trains
  (:func:`~flower_medimg.client_apps.dp_sgd.plan_round`).
  All DP-SGD entries of all runs are composed by one RDP accountant (Mironov,
  2017, https://arxiv.org/abs/1702.07476; Opacus's RDP analysis at its default
  orders) and converted to ε at the site's δ. RDP composes by addition and a
  round of ``T`` steps costs ``T`` times one step, so the ledger computes the
  one-step RDP of each distinct ``(σ, q)`` once per process (about 0.1 s each)
  and the total is a weighted sum: a check costs the same after a thousand
  rounds as after one.
- **SVT** selective sharing (pure ε-DP per round): its ε adds up (basic
  composition).

The site's total is the sum of the two. A round that would take it above the
site policy's ``max-total-epsilon`` is refused before it runs. Charging before
the round is deliberate: a round that crashes may still have touched the data.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_medimg.site.audit import ChainedLog

__all__ = [
    "LEDGER_FILE",
    "LedgerCharge",
    "PrivacyLedger",
    "compose_epsilon",
]

#: File name in the site's ``state-dir``.
LEDGER_FILE = "privacy-ledger.jsonl"
#: The ledger's mechanisms (its line ``event``).
DP_SGD, SVT = "dp-sgd", "svt"


@dataclass(frozen=True)
class LedgerCharge:
    """What one round spends, for the ledger.

    Attributes
    ----------
    mechanism : str
        ``"dp-sgd"`` or ``"svt"``.
    study : str
        The study (Flower app id) the run belongs to.
    run_id, server_round : int
        The Flower run and its round.
    noise_multiplier, sample_rate : float
        DP-SGD: σ and the lot sampling rate q.
    steps : int
        DP-SGD: lots drawn in the round.
    epsilon : float
        SVT: ε of the round.
    """

    mechanism: str
    study: str
    run_id: int
    server_round: int
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    epsilon: float = 0.0

    def fields(self) -> dict[str, Any]:
        """Return the ledger line's fields (without its ``event``)."""
        values = {
            "study": self.study,
            "run_id": self.run_id,
            "server_round": self.server_round,
        }
        if self.mechanism == DP_SGD:
            values.update(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps,
            )
        else:
            values["epsilon"] = self.epsilon
        return values


def _charge_of(entry: dict[str, Any]) -> LedgerCharge:
    fields = {k: entry[k] for k in LedgerCharge.__dataclass_fields__ if k in entry}
    return LedgerCharge(mechanism=entry["event"], **fields)


@functools.cache
def _rdp_analysis() -> tuple[Any, Any, list[float]]:
    """Opacus's RDP analysis module and its accountant's default orders."""
    from flower_medimg.core.quiet_imports import root_logger_kept

    with root_logger_kept():
        import numpy as np
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis
    return np, analysis, list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> Any:
    """RDP at every order of one step of the subsampled Gaussian (σ, q)."""
    np, analysis, orders = _rdp_analysis()
    return np.asarray(
        analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders
        )
    )


def compose_epsilon(charges: Iterable[LedgerCharge], delta: float) -> float:
    """Return the ε at ``delta`` of a set of charges composed together.

    DP-SGD charges go through one RDP accountant; SVT ε add up.

    Parameters
    ----------
    charges : iterable of LedgerCharge
        What was (or would be) spent.
    delta : float
        δ at which the DP-SGD part is converted to ε.
    """
    charges = list(charges)
    steps: Counter[tuple[float, float]] = Counter()
    for c in charges:
        if c.mechanism == DP_SGD:
            steps[(c.noise_multiplier, c.sample_rate)] += c.steps
    dp_epsilon = 0.0
    if steps:
        _, analysis, orders = _rdp_analysis()
        rdp = sum(
            count * _one_step_rdp(sigma, q) for (sigma, q), count in steps.items()
        )
        dp_epsilon, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        dp_epsilon = float(dp_epsilon)
        if math.isnan(dp_epsilon):
            dp_epsilon = math.inf
    return dp_epsilon + sum(c.epsilon for c in charges if c.mechanism == SVT)


class PrivacyLedger:
    """The privacy ledger of the site whose state folder is ``state_dir``.

    Parameters
    ----------
    state_dir : str or Path
        The site's state folder.

    Raises
    ------
    ValueError
        If the ledger's chain is broken (the message names the line).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.log = ChainedLog(Path(state_dir) / LEDGER_FILE)

    def charges(self) -> list[LedgerCharge]:
        """Return every charge, oldest first."""
        return [_charge_of(entry) for entry in self.log.entries()]

    def total_epsilon(
        self, delta: float, planned: Iterable[LedgerCharge] = ()
    ) -> float:
        """Return the site's ε at ``delta``, with ``planned`` charges added."""
        return compose_epsilon([*self.charges(), *planned], delta)

    def charge(self, charges: Iterable[LedgerCharge]) -> None:
        """Record ``charges`` (one line each)."""
        for charge in charges:
            self.log.append(charge.mechanism, **charge.fields())

    def summary(self, delta: float) -> dict[str, Any]:
        """Return the ledger per study and in total, each ε at ``delta``."""
        charges = self.charges()
        studies = sorted({c.study for c in charges})
        rows = []
        for study in studies:
            mine = [c for c in charges if c.study == study]
            rows.append(
                {
                    "study": study,
                    "runs": sorted({c.run_id for c in mine}),
                    "rounds": len({(c.run_id, c.server_round) for c in mine}),
                    "epsilon": compose_epsilon(mine, delta),
                }
            )
        return {
            "delta": delta,
            "studies": rows,
            "total-epsilon": compose_epsilon(charges, delta),
        }

"""The site's policy: which runs the hospital lets train on its data.

A file the site owns (never the run config), named by ``policy`` in the site's
configuration, e.g. ``policy.toml``::

    [policy]
    require-dp-sgd = true          # every run trains with DP-SGD
    require-secure-aggregation = true  # the server sees no single update in the
                                   # clear (secagg.enabled or he.enabled)
    max-epsilon-per-run = 8.0      # the run's own DP-SGD + SVT ε at ``delta``
    max-total-epsilon = 20.0       # the site's ledger, all runs and studies
    delta = 1e-5                   # δ of the two budgets above
    private-params = ["norm"]      # rules/prefixes the run's private-params must hold
    min-train-samples = 20         # no update from fewer training samples
    allowed-strategies = ["fedavg", "fedprox"]
    allowed-tasks = ["segmentation"]
    max-update-mib = 16.0          # size of the shared arrays a round sends back

Every key is optional. The warm site runtime reads the file for every message, so
an edit applies from the next message; a file that cannot be read refuses every
message (the site never runs unchecked). A violation is a :class:`PolicyViolationError`
whose message names the file, the line and what the run asked for.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PolicyError", "PolicyViolationError", "SitePolicy", "load_policy"]

_TYPES: dict[str, tuple[type, ...]] = {
    "require-dp-sgd": (bool,),
    "require-secure-aggregation": (bool,),
    "max-epsilon-per-run": (int, float),
    "max-total-epsilon": (int, float),
    "delta": (float,),
    "private-params": (list,),
    "min-train-samples": (int,),
    "allowed-strategies": (list,),
    "allowed-tasks": (list,),
    "max-update-mib": (int, float),
}
_LISTS = ("private-params", "allowed-strategies", "allowed-tasks")
_POSITIVE = ("max-epsilon-per-run", "max-total-epsilon", "max-update-mib")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and key."""


class PolicyViolationError(RuntimeError):
    """A run the site's policy refuses; the message names the policy line."""


@dataclass(frozen=True)
class SitePolicy:
    """A site's policy (see the module docstring for the keys).

    Attributes
    ----------
    path : Path or None
        The file it was read from (None: the empty policy, everything allowed).
    values : dict
        The keys the file sets.
    lines : dict
        ``key -> (line number, line text)`` in the file, for the messages.
    """

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, tuple[int, str]] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` if the file does not set it."""
        return self.values.get(key, default)

    @property
    def delta(self) -> float:
        """δ of the site's budgets (1e-5 unless the file sets it)."""
        return float(self.values.get("delta", 1e-5))

    def refuse(self, key: str, asked: str) -> PolicyViolationError:
        """Return the violation of ``key``: the policy line and what was asked."""
        number, text = self.lines.get(key, (0, f"{key} = {self.values.get(key)!r}"))
        return PolicyViolationError(
            f"site policy {self.path} line {number} ({text.strip()}): {asked}"
        )


def _fail(path: Path, text: str) -> PolicyError:
    return PolicyError(f"site policy {path}: {text}")


def load_policy(path: str | Path | None) -> SitePolicy:
    """Read and check a site policy file.

    Parameters
    ----------
    path : str or Path, optional
        The TOML file; None gives the empty policy.

    Raises
    ------
    PolicyError
        If the file cannot be read, is not TOML, has no ``[policy]`` table, or an
        unknown, mistyped or out-of-range key (the message names it).
    """
    if path is None:
        return SitePolicy()
    path = Path(path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except OSError as err:
        raise _fail(path, f"cannot read it: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise _fail(path, f"not valid TOML: {err}") from err
    table = raw.get("policy")
    if not isinstance(table, dict) or set(raw) != {"policy"}:
        raise _fail(path, "needs exactly one [policy] table")
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; known: {sorted(_TYPES)}")
    for key, value in table.items():
        kinds = _TYPES[key]
        if isinstance(value, bool) is not (bool in kinds) or not isinstance(
            value, kinds
        ):
            raise _fail(path, f"'{key}' must be {'/'.join(t.__name__ for t in kinds)}")
        if key in _LISTS and not all(isinstance(v, str) and v for v in value):
            raise _fail(path, f"'{key}' must be a list of non-empty strings")
        if key in _POSITIVE and not value > 0:
            raise _fail(path, f"'{key}' must be > 0")
    if not 0 < table.get("delta", 1e-5) < 1:
        raise _fail(path, "'delta' must be between 0 and 1")
    if table.get("min-train-samples", 0) < 0:
        raise _fail(path, "'min-train-samples' must be >= 0")
    lines = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if match and match.group(1) in table:
            lines[match.group(1)] = (number, line)
    return SitePolicy(path=path, values=dict(table), lines=lines)

"""A registry version written back as a runnable MONAI bundle (the sites' deployment).

``flower-medimg registry export VERSION OUT --bundle`` turns the global model of a
``task = "bundle"`` run into the bundle the sites federated, with the converged
weights: the source bundle's files (``configs/``, ``docs/``, ...; its shipped
``models/`` left out), the registry's export in ``models/`` (``model.pt``, the
state dict MONAI's ``CheckpointLoader`` reads, and the signed ``model_card.json``)
and the provenance in ``configs/metadata.json`` under
:data:`PROVENANCE_KEY` (run, round, strategy, sites, ε, SHA-256). A site runs it
with MONAI alone, from inside ``OUT`` (the config's ``bundle_root`` is ``.``)::

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir SITE

The weights are checked against the inference config's ``network_def`` (built
without running the bundle's code, see
:func:`flower_medimg.core.bundle.network_from_bundle`) before anything is written,
so an exported bundle loads strictly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flower_medimg.core.bundle import (
    BundleError,
    check_global_arrays,
    network_from_bundle,
)
from flower_medimg.core.settings import BUNDLE_TASK

from .registry import ModelRegistry

__all__ = ["INFERENCE_CONFIG", "PROVENANCE_KEY", "export_bundle"]

#: The config a site runs; it must define ``network_def``.
INFERENCE_CONFIG = "configs/inference.json"
#: Where the provenance goes in the bundle's metadata.
METADATA_CONFIG = "configs/metadata.json"
#: The metadata key holding the federated provenance.
PROVENANCE_KEY = "flower_medimg_provenance"
#: Card entries copied into the metadata's provenance.
_CARD_KEYS = ("version", "round", "created-at", "run", "strategy", "stop", "best")


def _source_bundle(config: dict[str, Any], version: int, source: Path | None) -> Path:
    """Return the bundle folder a version was trained from (or ``source``)."""
    task = config.get("task")
    if task != BUNDLE_TASK:
        raise BundleError(
            f"version {version} was trained with task = {task!r}; --bundle exports "
            f"runs of task = {BUNDLE_TASK!r} (their bundle's inference config is "
            "what the sites run); export it without --bundle"
        )
    private = config.get("private-params", "none")
    if private != "none":
        raise BundleError(
            f"version {version} holds only the shared parameters (private-params = "
            f"{private!r}); the private values stay at the sites, so no runnable "
            "bundle can be written from the registry alone"
        )
    root = Path(source or config.get("bundle.root", "")).expanduser()
    if not (root / INFERENCE_CONFIG).is_file():
        raise BundleError(
            f"bundle of version {version} has no {INFERENCE_CONFIG}: {root} "
            "(the run's bundle.root); pass the bundle folder with --bundle-root"
        )
    return root


def _provenance(card: dict[str, Any]) -> dict[str, Any]:
    """Return what the bundle's metadata records of the federated run."""
    return {
        **{key: card[key] for key in _CARD_KEYS},
        "registry-version": card["version"],
        "sites": card["contributors"],
        "epsilon": card["epsilon"],
        "sha256": card["sha256"],
        "metrics": card["metrics"],
        "key-fingerprint": card["integrity"]["key-fingerprint"],
        "model-card": "models/model_card.json",
    }


def _write_metadata(out: Path, card: dict[str, Any]) -> None:
    path = out / METADATA_CONFIG
    metadata = json.loads(path.read_text()) if path.is_file() else {}
    metadata[PROVENANCE_KEY] = _provenance(card)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata, indent=2) + "\n")


def export_bundle(
    registry: ModelRegistry,
    version: int,
    out_dir: str | Path,
    source: str | Path | None = None,
) -> Path:
    """Write a registry version as a runnable MONAI bundle.

    Parameters
    ----------
    registry : ModelRegistry
        The registry holding the version (read only is enough).
    version : int
        The version to export; its run must be ``task = "bundle"``.
    out_dir : str or Path
        The bundle folder to write; must not exist or be empty.
    source : str or Path, optional
        The bundle the run federated (default: the run's ``bundle.root``).

    Returns
    -------
    Path
        The bundle folder written.

    Raises
    ------
    BundleError
        If the run is no bundle run, kept private parameters, its bundle or
        inference config is missing, the weights do not fit the inference
        network, or ``out_dir`` is not empty.
    RegistryError
        If the version is missing or does not verify.
    """
    row = registry.version(version)
    root = _source_bundle(row["run-info"]["config"], version, source)
    state = registry.load_weights(version)
    network = network_from_bundle(root, [INFERENCE_CONFIG])
    check_global_arrays(
        state, network, source=f"the weights of version {version} ({INFERENCE_CONFIG})"
    )
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"export folder {out} is not empty; name a new folder")
    shutil.copytree(root, out, ignore=_shipped_models(root), dirs_exist_ok=True)
    registry.export(version, out / "models")
    card = json.loads((out / "models" / "model_card.json").read_text())
    _write_metadata(out, card)
    return out


def _shipped_models(root: Path) -> Any:
    """Return a ``copytree`` filter that leaves out the bundle's own ``models/``."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        return ["models"] if Path(folder) == root and "models" in names else []

    return ignore

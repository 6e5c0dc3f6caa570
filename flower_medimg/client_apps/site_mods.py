"""The Flower mods a site runs around training, chosen by the run config.

Flower fixes a ClientApp's mods when it is built, but the run config is only known
when a message arrives; :func:`run_with_mods` composes the configured mods per
message the way ``ClientApp(mods=...)`` does (the first mod is the outermost).

- ``privacy.filter = "percentile" | "svt"``: selective parameter sharing (Li et al.,
  MLMI 2019, https://arxiv.org/abs/1910.00962): only ``privacy.share`` of the update's
  coordinates leave the site (:mod:`flower_medimg.privacy`).
- ``secagg.enabled``: SecAgg+ (Bell et al., CCS 2020,
  https://eprint.iacr.org/2020/704): only the masked, quantised update leaves the
  site (:class:`~flower_medimg.privacy.secagg_mod.SecAggPlusMod`, outermost).
- ``compression.codec``: the update travels as fp16, int8 or top-k with error
  feedback (:class:`~flower_medimg.privacy.compression_mod.CompressionMod`).
- ``he.enabled``: the received model is decrypted and the reply encrypted with the
  site's CKKS secret context (TenSEAL;
  :class:`~flower_medimg.privacy.homomorphic_mod.HomomorphicEncryptionMod`).
- ``node_config["max-update-norm"]``: the site clips its own update to that L2
  norm (:class:`~flower_medimg.privacy.mods.SiteNormBoundMod`), whatever the server
  asks.
- ``dp.user-level = "client"``: each update is clipped to ``dp.user-clipping-norm`` at
  the site (Flower's fixed clipping mod, guarded against zero updates) before the
  server adds the noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import Mod

from flower_medimg.core import protocol
from flower_medimg.core.settings import Settings
from flower_medimg.privacy import (
    PercentilePrivacyMod,
    SiteNormBoundMod,
    SVTPrivacyMod,
    safe_fixedclipping_mod,
)
from flower_medimg.privacy.compression_mod import CompressionMod
from flower_medimg.privacy.secagg_mod import SecAggPlusMod
from flower_medimg.privacy.sparse_sharing import num_released, svt_noise_scales

__all__ = [
    "SVT_STATE",
    "model_mods",
    "run_with_mods",
    "site_mods",
    "svt_round_epsilon",
]

#: ``context.state`` entry of the SVT filter's ε odometer.
SVT_STATE = "svt-privacy"


def _optional(value: float) -> float | None:
    """Run-config 0 means "let the filter choose" (a bound scaled to the update)."""
    return value or None


def model_mods(settings: Settings, context: Context | None = None) -> list[Mod]:
    """Return the mods that turn the received model into plain float32 arrays.

    ``he.enabled``: decrypt it (and encrypt the train reply) with the site's secret
    CKKS context, ``node_config["he-secret-context"]`` on a real site, else
    ``he.context-dir``'s ``he-secret.ctx`` (simulated sites).
    ``compression.*``: widen a float16 downlink (and encode the train reply).
    """
    if settings["he.enabled"]:
        from flower_medimg.core.homomorphic import SECRET_CONTEXT_FILE
        from flower_medimg.privacy.homomorphic_mod import HomomorphicEncryptionMod

        node_config = {} if context is None else context.node_config
        path = node_config.get(protocol.NODE_HE_SECRET_CONTEXT) or str(
            Path(settings["he.context-dir"]) / SECRET_CONTEXT_FILE
        )
        return [HomomorphicEncryptionMod(str(path), _comma_list(settings["he.keys"]))]
    compressed = settings["compression.codec"] != "none" or (
        settings["compression.downlink"] != "none"
    )
    if compressed and not settings["secagg.enabled"]:
        return [
            CompressionMod(
                settings["compression.codec"], settings["compression.fraction"]
            )
        ]
    return []


def site_mods(settings: Settings, context: Context | None = None) -> list[Mod]:
    """Return the train mods the run's settings ask for, outermost first.

    What leaves the site last is made outermost: the encrypted (``he.*``), masked
    (``secagg.*``) or compressed (``compression.*``) update of what the clipping
    and sparse-sharing mods left.
    """
    mods: list[Mod] = model_mods(settings, context)
    if settings["secagg.enabled"]:
        mods.append(SecAggPlusMod(lambda ctx: _train_size(settings, ctx)))
    bound = (
        None
        if context is None
        else context.node_config.get(protocol.NODE_MAX_UPDATE_NORM)
    )
    if bound is not None:  # the site's own bound, inside what masks or encrypts
        mods.append(SiteNormBoundMod(bound))
    if settings["dp.user-level"] == "client":
        mods.append(safe_fixedclipping_mod)  # must see the filtered reply last
    kind = settings["privacy.filter"]
    share = settings["privacy.share"]
    if kind == "percentile":
        mods.append(PercentilePrivacyMod(share, _optional(settings["privacy.gamma"])))
    elif kind == "svt":
        mods.append(
            SVTPrivacyMod(
                share,
                settings["privacy.epsilon"],
                _optional(settings["privacy.gamma"]),
                _optional(settings["privacy.tau"]),
                _optional(settings["privacy.release-epsilon"]),
                state_key=SVT_STATE,
            )
        )
    return mods


def _comma_list(text: str) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] or None


def _train_size(settings: Settings, context: Context) -> int:
    """Return the training-set size (the SecAgg+ weight, sent before training)."""
    from flower_medimg.data.datasets import site_datasets

    train, _ = site_datasets(settings, context.node_config)
    return len(train)


def svt_round_epsilon(settings: Settings, num_coordinates: int) -> float:
    """Return the ε one round of the run's SVT filter spends on an update.

    Parameters
    ----------
    settings : Settings
        The run's settings (``privacy.*``).
    num_coordinates : int
        Values in the update the filter sees (the shared arrays).
    """
    if settings["privacy.filter"] != "svt":
        return 0.0
    released = num_released(settings["privacy.share"], num_coordinates)
    eps_thr, eps_query, eps_release, *_ = svt_noise_scales(
        released,
        settings["privacy.epsilon"],
        1.0,  # γ scales the noise, not the budget
        _optional(settings["privacy.release-epsilon"]),
    )
    return eps_thr + eps_query + eps_release


def run_with_mods(
    mods: list[Mod],
    handler: Callable[[Message, Context], Message],
    msg: Message,
    context: Context,
) -> Message:
    """Call ``handler`` wrapped in ``mods`` (the first mod is the outermost)."""

    def call(index: int, message: Message, ctx: Context) -> Message:
        if index == len(mods):
            return handler(message, ctx)
        return mods[index](message, ctx, lambda m, c: call(index + 1, m, c))

    return call(0, msg, context)

"""Privacy at the site and around the server's strategy.

- :mod:`~flower_medimg.privacy.sparse_sharing`: selective parameter sharing and the
  Sparse Vector Technique on a model update (Li et al., MLMI 2019,
  https://arxiv.org/abs/1910.00962), as pure numpy functions.
- :mod:`~flower_medimg.privacy.mods`: the same filters as Flower mods for a
  ClientApp (``PercentilePrivacyMod``, ``SVTPrivacyMod``), and
  ``safe_fixedclipping_mod`` for client-side clipping.
- :mod:`~flower_medimg.privacy.user_level`: user-level DP (DP-FedAvg, McMahan et al.,
  https://arxiv.org/abs/1710.06963) around any uniform-weight strategy, with ε
  reported every round (:mod:`~flower_medimg.privacy.accounting`).
"""

from .accounting import UserLevelAccountant, user_level_epsilon
from .mods import PercentilePrivacyMod, SVTPrivacyMod, safe_fixedclipping_mod
from .sparse_sharing import SVTSpend, percentile_filter, svt_filter
from .user_level import (
    UNIFORM_WEIGHT_KEY,
    UserLevelDPClientSideFixedClipping,
    UserLevelDPServerSideFixedClipping,
    clip_update,
    make_user_level_dp,
    uniform_weighting_problem,
)

__all__ = [
    "UNIFORM_WEIGHT_KEY",
    "PercentilePrivacyMod",
    "SVTPrivacyMod",
    "SVTSpend",
    "UserLevelAccountant",
    "UserLevelDPClientSideFixedClipping",
    "UserLevelDPServerSideFixedClipping",
    "clip_update",
    "make_user_level_dp",
    "percentile_filter",
    "safe_fixedclipping_mod",
    "svt_filter",
    "uniform_weighting_problem",
    "user_level_epsilon",
]

"""Privacy at the site: filters and clipping applied before an update leaves it.

- :mod:`~flower_medimg.privacy.sparse_sharing`: selective parameter sharing and the
  Sparse Vector Technique on a model update (Li et al., MLMI 2019,
  https://arxiv.org/abs/1910.00962), as pure numpy functions.
- :mod:`~flower_medimg.privacy.mods`: the same filters as Flower mods for a
  ClientApp (``PercentilePrivacyMod``, ``SVTPrivacyMod``), and
  ``safe_fixedclipping_mod`` for client-side clipping under user-level DP.

The server side of user-level DP (clipping, noise and its accountant) is in
:mod:`flower_medimg.strategies.user_level_dp`.
"""

from .mods import PercentilePrivacyMod, SVTPrivacyMod, safe_fixedclipping_mod
from .sparse_sharing import SVTSpend, percentile_filter, svt_filter

__all__ = [
    "PercentilePrivacyMod",
    "SVTPrivacyMod",
    "SVTSpend",
    "percentile_filter",
    "safe_fixedclipping_mod",
    "svt_filter",
]

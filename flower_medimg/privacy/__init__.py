"""Privacy at the site: filters and clipping applied before an update leaves it.

- :mod:`~flower_medimg.privacy.sparse_sharing`: selective parameter sharing and the
  Sparse Vector Technique on a model update (Li et al., MLMI 2019,
  https://arxiv.org/abs/1910.00962), as pure numpy functions.
- :mod:`~flower_medimg.privacy.mods`: the same filters as Flower mods for a
  ClientApp (``PercentilePrivacyMod``, ``SVTPrivacyMod``), and
  ``safe_fixedclipping_mod`` for client-side clipping under user-level DP.

- :mod:`~flower_medimg.privacy.secagg_mod`: the site's side of SecAgg+
  (``SecAggPlusMod``), :mod:`~flower_medimg.privacy.homomorphic_mod`: CKKS
  encryption of the update (``HomomorphicEncryptionMod``, TenSEAL), and
  :mod:`~flower_medimg.privacy.compression_mod`: fp16, int8 and top-k with error
  feedback (``CompressionMod``).

The server side of user-level DP (clipping, noise and its accountant) is in
:mod:`flower_medimg.strategies.user_level_dp`.
"""

from .compression_mod import CompressionMod
from .homomorphic_mod import HomomorphicEncryptionMod
from .mods import (
    PercentilePrivacyMod,
    SiteNormBoundMod,
    SVTPrivacyMod,
    safe_fixedclipping_mod,
)
from .secagg_mod import SecAggPlusMod
from .sparse_sharing import SVTSpend, percentile_filter, svt_filter

__all__ = [
    "CompressionMod",
    "HomomorphicEncryptionMod",
    "PercentilePrivacyMod",
    "SVTPrivacyMod",
    "SVTSpend",
    "SecAggPlusMod",
    "SiteNormBoundMod",
    "percentile_filter",
    "safe_fixedclipping_mod",
    "svt_filter",
]

"""Server-side strategies: Flower Message-API strategies for medical imaging FL.

Every strategy subclasses Flower's ``flwr.serverapp.strategy.FedAvg`` (through
``FastFedAvg``), takes the same constructor arguments and works with
``strategy.start(...)``. ``QualityGate`` wraps any Message-API strategy;
``make_user_level_dp`` wraps one in user-level differential privacy. What leaves
the sites: ``SecAggPlus`` (secure aggregation), ``HomomorphicFedAvg`` (CKKS) and
``DecompressUpdates`` (fp16, int8, top-k) wrap a weighted-mean strategy.
"""

from .compressed import DecompressUpdates
from .cyclic import CyclicIncremental
from .dos import DistanceOutlierSuppression
from .fast_fedavg import FastFedAvg
from .fast_fedmedian import FastFedMedian
from .fast_fedtrimmedavg import FastFedTrimmedAvg
from .fedcostwavg import FedCostWAvg
from .fedfocus import FedFocus
from .fednova import FedNova
from .homomorphic import HomomorphicFedAvg
from .quality_gate import QualityGate
from .secagg import SecAggPlus
from .user_level_dp import make_user_level_dp

__all__ = [
    "CyclicIncremental",
    "DecompressUpdates",
    "DistanceOutlierSuppression",
    "FastFedAvg",
    "FastFedMedian",
    "FastFedTrimmedAvg",
    "FedCostWAvg",
    "FedFocus",
    "FedNova",
    "HomomorphicFedAvg",
    "QualityGate",
    "SecAggPlus",
    "make_user_level_dp",
]

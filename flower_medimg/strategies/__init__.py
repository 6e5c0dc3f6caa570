"""Server-side strategies: Flower Message-API strategies for medical imaging FL.

Every strategy subclasses Flower's ``flwr.serverapp.strategy.FedAvg`` (through
``FastFedAvg``), takes the same constructor arguments and works with
``strategy.start(...)``. ``QualityGate`` wraps any Message-API strategy;
``make_user_level_dp`` wraps one in user-level differential privacy.
"""

from .cyclic import CyclicIncremental
from .dos import DistanceOutlierSuppression
from .fast_fedavg import FastFedAvg
from .fast_fedmedian import FastFedMedian
from .fast_fedtrimmedavg import FastFedTrimmedAvg
from .fedcostwavg import FedCostWAvg
from .fedfocus import FedFocus
from .fednova import FedNova
from .quality_gate import QualityGate
from .user_level_dp import make_user_level_dp

__all__ = [
    "CyclicIncremental",
    "DistanceOutlierSuppression",
    "FastFedAvg",
    "FastFedMedian",
    "FastFedTrimmedAvg",
    "FedCostWAvg",
    "FedFocus",
    "FedNova",
    "QualityGate",
    "make_user_level_dp",
]

"""metricloss: exact, fast and memory-lean metric-learning losses for PyTorch.

Flat public API (see *Design › Public API* in the docs)::

    import metricloss as ml
    import metricloss.functional as MF

    criterion = ml.TripletLoss(margin=0.2, mining="batch_hard")
    loss = criterion(embeddings, labels)
"""

from . import distributed, evolution, explain, functional, metrics, reference, samplers
from .losses import (BatchAllTripletLoss, BatchHardTripletLoss, EPHNLoss, MiningSchedule, SCTLoss,
                     SemiHardTripletLoss, TripletLoss)
from .monitor import CollapseMonitor, CollapseWarning, TripletStats
from .gradcache import GradCache
from .losses import WARPLoss
from .losses import CentralizedRankingLoss, CosineClassifier, NormalizeScale, NormSoftmaxLoss
from .losses import CentroidTripletLoss
from .losses import EmbeddingHead, SVMaxRegularizer, TwoHeadLoss
from .losses import CrossBatchMemory
from .samplers import MultiLabelPKSampler, PKSampler
from ._warn import NoValidTripletWarning

__version__ = "0.1.0.dev0"

__all__ = [
    "TripletLoss",
    "BatchHardTripletLoss",
    "BatchAllTripletLoss",
    "SemiHardTripletLoss",
    "SCTLoss",
    "EPHNLoss",
    "MiningSchedule",
    "CollapseMonitor",
    "CollapseWarning",
    "TripletStats",
    "WARPLoss",
    "NormalizeScale",
    "CosineClassifier",
    "NormSoftmaxLoss",
    "CentralizedRankingLoss",
    "CentroidTripletLoss",
    "SVMaxRegularizer",
    "TwoHeadLoss",
    "EmbeddingHead",
    "CrossBatchMemory",
    "PKSampler",
    "MultiLabelPKSampler",
    "GradCache",
    "NoValidTripletWarning",
    "distributed",
    "samplers",
    "functional",
    "metrics",
    "reference",
    "explain",
    "evolution",
    "__version__",
]

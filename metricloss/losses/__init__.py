"""``nn.Module`` drop-ins, one file per family. They hold hyper-parameters and buffers only."""

from .centralized import CentralizedRankingLoss
from .memory import CrossBatchMemory
from .cosine import CosineClassifier, NormalizeScale, NormSoftmaxLoss
from .centroid import CentroidTripletLoss
from .triplet import BatchAllTripletLoss, BatchHardTripletLoss, EPHNLoss, MiningSchedule, SCTLoss, SemiHardTripletLoss, TripletLoss
from .warp import WARPLoss
from .svmax import SVMaxRegularizer
from .two_head import EmbeddingHead, TwoHeadLoss

__all__ = ["TripletLoss", "BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss", "SCTLoss", "EPHNLoss", "MiningSchedule",
           "WARPLoss",
           "NormalizeScale", "CosineClassifier", "NormSoftmaxLoss", "CentralizedRankingLoss",
           "CentroidTripletLoss", "SVMaxRegularizer", "TwoHeadLoss", "EmbeddingHead", "CrossBatchMemory"]

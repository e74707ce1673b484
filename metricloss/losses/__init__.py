"""``nn.Module`` drop-ins, one file per family. They hold hyper-parameters and buffers only."""

from .centroid import CentroidTripletLoss
from .triplet import BatchAllTripletLoss, BatchHardTripletLoss, SemiHardTripletLoss, TripletLoss

__all__ = ["TripletLoss", "BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss"]
__all__ += ["CentroidTripletLoss"]

"""Warnings that point at the user's line, and the one for a batch that cannot train.

:func:`warn_at_caller` issues a warning attributed to the first stack frame outside metricloss (and outside
torch, whose ``Module.__call__`` sits between a loss module and its caller), so ``warnings`` shows the
user's own call, not a line inside the package, whatever the call depth.

:class:`NoValidTripletWarning` is issued once per process when a triplet loss sees a batch without a
single valid (anchor, positive, negative): every label distinct (per-sample ids) or a single class. The
loss is then 0 with a zero gradient, so training would silently do nothing. The check reads nothing from
the device beyond what mining already reads (the largest class size).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Type

import torch

__all__ = ["NoValidTripletWarning", "warn_at_caller", "warn_if_no_valid_multi_hot", "warn_if_no_valid_triplet"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


class NoValidTripletWarning(UserWarning):
    """A triplet loss got a batch with no valid triplet (its loss is 0, its gradient 0).

    Silence it with ``warnings.filterwarnings("ignore", category=metricloss.NoValidTripletWarning)``.
    """


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)


def warn_at_caller(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside metricloss and torch."""
    frame = sys._getframe(1)
    level = 2  # 1 would be this function, 2 its caller
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


_lock = threading.Lock()
_warned = {"no_valid_triplet": False}


def warn_if_no_valid_triplet(max_count: int, num_refs: int, self_ref: bool, where: str) -> None:
    """Warn once per process when the labels leave no valid triplet.

    Args:
        max_count: size of the largest class among the references (mining reads it anyway).
        num_refs: number of references M (the batch itself when ``self_ref``).
        self_ref: the references are the batch (anchor i is reference i).
        where: the loss's name, for the message.

    The two cases detected exactly from these host values: every label distinct in the batch itself
    (``self_ref`` and ``max_count == 1``: no anchor has a positive), and a single class among the references
    (``max_count == num_refs``: an anchor of that class has no negative, any other anchor no positive).
    """
    if _warned["no_valid_triplet"] or num_refs == 0:
        return
    distinct = self_ref and max_count <= 1
    single = max_count == num_refs
    if not (distinct or single):
        return
    cause = (f"all {num_refs} labels are distinct, so no anchor has a positive" if distinct else
             f"all {num_refs} {'labels' if self_ref else 'reference labels'} are one class, so there is no "
             f"negative of that class and no positive of any other")
    _warn_once(where, cause, "P classes x K >= 2 samples each, e.g. with DataLoader(dataset, "
                             "batch_sampler=metricloss.PKSampler(labels, p, k))")


def warn_if_no_valid_multi_hot(valid: torch.Tensor, where: str) -> None:
    """:func:`warn_if_no_valid_triplet` for multi-hot labels: warn once per process when no anchor has both a
    positive (a label in common) and a negative (none in common). ``valid``: (N,) bool per anchor (reads one
    scalar from the device per call until it has warned)."""
    if _warned["no_valid_triplet"] or valid.numel() == 0 or bool(valid.any()):
        return
    _warn_once(where, f"none of the {valid.numel()} anchors has both a reference sharing a label and one "
                      "sharing none", "P labels x K >= 2 samples each, e.g. with DataLoader(dataset, "
                      "batch_sampler=metricloss.MultiLabelPKSampler(labels, p, k))")


def _warn_once(where: str, cause: str, remedy: str) -> None:
    with _lock:
        if _warned["no_valid_triplet"]:
            return
        _warned["no_valid_triplet"] = True
    warn_at_caller(
        f"metricloss.{where}: this batch has no valid triplet ({cause}); the loss is 0 with a zero gradient, "
        f"so training does nothing. Build batches of {remedy}. Shown once per process; "
        f"silence it with warnings.filterwarnings('ignore', category=metricloss.NoValidTripletWarning).",
        NoValidTripletWarning)


def _reset_for_tests() -> None:
    """Forget that the once-per-process warning was shown (tests only)."""
    _warned["no_valid_triplet"] = False

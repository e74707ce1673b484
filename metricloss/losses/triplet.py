"""Triplet losses as ``nn.Module`` drop-ins: :class:`TripletLoss` and its three mining presets."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

import copy
import math

from .. import _checks as C
from .._backend import BACKENDS
from ..functional import _triplet
from ..monitor import CollapseMonitor, TripletStats
from ..ops.distance import DISTANCES
from ..ops.reduction import REDUCTIONS, LossTerms
from ..ops.labels import Relation
from ..ops.triplet import MININGS

__all__ = ["TripletLoss", "BatchHardTripletLoss", "BatchAllTripletLoss", "SemiHardTripletLoss", "SCTLoss",
           "EPHNLoss", "MiningSchedule"]


def _check_monitor(monitor: object, where: str) -> Optional[CollapseMonitor]:
    if monitor is True:
        return CollapseMonitor()
    if monitor is False or monitor is None:
        return None
    if isinstance(monitor, CollapseMonitor):
        return monitor
    raise TypeError(f"{where}: `monitor` must be a bool or a metricloss.CollapseMonitor, got {type(monitor).__name__}")


class TripletLoss(nn.Module):
    """Triplet loss with on-device mining that never holds an N×N matrix.

    Args:
        margin: float >= 0 (hinge [m + d_ap − d_an]_+), or ``"soft"`` (softplus, Hermans et al.). Default 0.2.
        mining: ``"batch_hard"`` (default; Hermans et al. 2017), ``"batch_all"`` or ``"semi_hard"``
            (FaceNet, with TF-Addons semantics: the nearest negative farther than the positive, else the
            farthest negative).
        distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"cosine"``.
        normalize: L2-normalise embeddings first. Default True.
        reduction: ``"mean"`` (default; over valid anchors / triplets / (a, p) pairs), ``"mean_nonzero"``
            (PML's AvgNonZero), ``"sum"`` or ``"none"`` (per-anchor sums, (N,)).
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"`` or ``"reference"``.
        chunk_bytes: memory budget of one anchor chunk (default 64 MiB, or ``METRICLOSS_CHUNK_BYTES``).
        positive: batch-hard's positive, ``"hardest"`` (default) or ``"easiest"`` (the most similar one that is
            not a near-duplicate; Xuan et al.). The Triton kernel mines the hardest only: ``"easiest"`` runs
            on the torch engine.
        loss: ``"triplet"`` (default: the margin's hinge or softplus), ``"nca"`` (EPHN) or ``"sct"``
            (selectively contrastive); the latter two need ``distance="cosine"`` and ignore ``margin``.
        temperature: T of ``"nca"`` / ``"sct"`` (default 0.1).
        hard_threshold: ``"sct"``: a triplet is hard when S_an > S_ap or S_an > this (default 0.8).
        hard_weight: ``"sct"``: λ of λ·S_an on hard triplets (default 1.0).
        duplicate_similarity: a reference more similar than this is a near-duplicate: never an easy positive,
            and ``"sct"`` drops an anchor whose hardest negative is one (default 0.9999; None: no rule).
        min_similarity: ``"nca"`` counts only anchors with S_ap and S_an above this (default None).
            Settings a form does not use are ignored (``temperature`` by ``"triplet"``, ``hard_threshold`` and
            ``hard_weight`` by all but ``"sct"``, ``min_similarity`` by all but ``"nca"``).
        relation: optional callable ``relation(labels_chunk, ref_labels) -> (c, M)`` bool tensor, True where
            reference j is a positive of anchor i, False where it is a negative (default None: label equality,
            or a label in common for multi-hot rows); e.g. ``lambda a, b: a[:, None] // 10 == b[None, :] // 10``
            (the same super-class). Called per chunk of anchors, never on all N × M at once; every mining.
            Labels are then whatever it takes (any tensor of N rows; under ``DistributedLoss`` and
            ``CrossBatchMemory``, integer (N,) or 0/1 (N, L) rows, what those wrappers carry).
        monitor: watch the training for a collapse and warn once (:class:`~metricloss.CollapseMonitor`):
            True (default, a monitor with default settings), False, or a monitor. It reads the step's
            record every ``check_every`` steps in training mode (on an accelerator one host sync per 10 steps
            by default; pass False for a sync-free, CUDA-graph-capturable loop).

    Attributes:
        last_stats: :class:`~metricloss.TripletStats` of the last forward (None before the first, and for the
            ``"reference"`` backend): d_ap, d_an, counts, loss; nothing is read from the device until asked.

    Shapes:
        - embeddings: (N, D) float (fp16/bf16/fp32/fp64); labels: (N,) int, or (N, L) multi-hot rows (bool or
          0/1; positive iff a label in common, negative iff none), or with ``relation`` any tensor of N rows.
        - ref_embeddings: (M, D), ref_labels: (M,), optional: mine the anchors against this set instead.
        - ref_self_index: (N,) int, optional: the reference row that is anchor i (-1: none).
        - output: () or (N,) for ``reduction="none"``, fp32 (fp64 for fp64 input).

    Example::

        >>> criterion = TripletLoss(margin=0.2, mining="batch_hard")
        >>> loss = criterion(torch.randn(32, 128, requires_grad=True), torch.arange(8).repeat(4))
        >>> loss.backward()
    """

    def __init__(self, margin: Union[float, str] = 0.2, mining: str = "batch_hard", distance: str = "euclidean",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 chunk_bytes: Optional[int] = None, *, positive: str = "hardest", loss: str = "triplet",
                 temperature: float = 0.1, hard_threshold: float = 0.8, hard_weight: float = 1.0,
                 duplicate_similarity: Optional[float] = 0.9999, min_similarity: Optional[float] = None,
                 monitor: Union[bool, CollapseMonitor] = True, relation: Optional[Relation] = None):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = type(self).__name__
        C.check_relation(relation, where)
        self.relation = relation
        self.margin = C.check_margin(margin, "margin", where)
        self.mining = C.check_option(mining, "mining", MININGS, where)
        self.distance = C.check_option(distance, "distance", DISTANCES, where)
        if not isinstance(normalize, bool):
            raise TypeError(f"{where}: `normalize` must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.reduction = C.check_option(reduction, "reduction", REDUCTIONS, where)
        self.backend = C.check_option(backend, "backend", BACKENDS, where)
        self.chunk_bytes = C.check_chunk_bytes(chunk_bytes, where)
        self.form = C.check_triplet_form(where, mining, distance, normalize, positive, loss, temperature,
                                         hard_threshold, hard_weight, duplicate_similarity, min_similarity)
        self.monitor = _check_monitor(monitor, where)
        self.last_stats: Optional[TripletStats] = None

    @property
    def collapse_value(self) -> Optional[float]:
        """The per-term loss when d_ap = d_an: the margin (hinge), ln 2 (softplus, nca); None for sct."""
        if self.form.loss == "sct":
            return None
        return math.log(2.0) if (self.form.loss == "nca" or self.margin == "soft") else float(self.margin)

    def _run(self, embeddings, labels, ref_embeddings, ref_labels, ref_self_index, reduction):
        # no record while torch.compile traces: a Python object per step, and a counter Dynamo would guard on
        # (one recompile per step)
        compiling = torch.compiler.is_compiling()
        stats = None if compiling else {}
        out = _triplet(type(self).__name__, embeddings, labels, ref_embeddings, ref_labels, self.margin,
                       self.mining, self.distance, self.normalize, reduction, self.backend, self.chunk_bytes,
                       ref_self_index, self.form, stats, relation=self.relation)
        if compiling:
            return out
        self.last_stats = None
        if "num_terms" in stats:
            # the loss as computed (detach is a view: no kernel); from loss_terms, the pieces, reduced on request
            loss = out.detach() if reduction is not None else LossTerms(out.per_anchor.detach(), out.num_terms,
                                                                         out.num_nonzero)
            self.last_stats = TripletStats(loss, stats["num_terms"], stats["num_nonzero"], stats.get("d"),
                                           stats.get("valid"), self.reduction)
            if self.monitor is not None and self.training and torch.is_grad_enabled():
                self.monitor.observe(self.last_stats, embeddings, type(self).__name__, self.collapse_value)
        return out

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None,
                ref_self_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The triplet loss of a batch, mined on the fly with this module's settings.

        Args:
            embeddings: (N, D) anchors, a float tensor (fp16, bf16, fp32 or fp64), N >= 1, D >= 1.
            labels: (N,) integer class labels (any integer dtype, any values, negative ones included), or
                (N, L) multi-hot rows (a label in common: positive), or with ``relation`` what it takes.
            ref_embeddings: optional (M, D) reference set the anchors are mined against (cross-batch
                memory, other ranks), same D; given together with ``ref_labels``. Without it the batch
                is its own reference set and an anchor is never its own positive. Gradients flow to it.
            ref_labels: optional (M,) integer labels of ``ref_embeddings`` ((M, L) with multi-hot ``labels``).
            ref_self_index: optional (N,) integer tensor, the reference row that *is* anchor i (-1: none),
                excluded from anchor i's positives and negatives by index. Default: ``arange(N)`` when
                ``ref_embeddings is embeddings``, else none.

        Returns:
            A 0-dim loss, or (N,) per-anchor sums for ``reduction="none"`` (0 for anchors without a
            positive or a negative), in fp32 (fp64 when the embeddings are fp64), autocast or not. With
            no valid term it is 0 and still connected to the graph. NaN or Inf in the input gives NaN.

        Raises:
            TypeError, ValueError: bad dtypes or shapes, named in the message (see *Design › Bad input* in the docs).
        """
        return self._run(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, self.reduction)

    def loss_terms(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                   ref_labels: Optional[torch.Tensor] = None,
                   ref_self_index: Optional[torch.Tensor] = None) -> LossTerms:
        """The unreduced pieces of :meth:`forward` (this module's ``reduction`` is not applied).

        Same arguments as :meth:`forward`. Returns :class:`~metricloss.ops.reduction.LossTerms`
        ``(per_anchor (N,), num_terms (), num_nonzero ())``; ``terms.reduce(self.reduction)`` equals
        :meth:`forward`. For wrappers that reduce across ranks or steps: sum ``per_anchor.sum()`` and the
        counts over them, then divide.
        """
        return self._run(embeddings, labels, ref_embeddings, ref_labels, ref_self_index, None)

    def extra_repr(self) -> str:
        """The constructor arguments, as ``repr(module)`` shows them."""
        extra = ""
        if self.form.positive != "hardest":
            extra += f", positive={self.form.positive!r}"
        if self.form.loss != "triplet":
            extra += f", loss={self.form.loss!r}, temperature={self.form.temperature!r}"
        if self.relation is not None:
            extra += f", relation={getattr(self.relation, '__name__', type(self.relation).__name__)}"
        return (f"margin={self.margin!r}, mining={self.mining!r}, distance={self.distance!r}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}" + extra)


class BatchHardTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="batch_hard"``: hardest positive and hardest negative per anchor.

    ``BatchHardTripletLoss(margin=0.2, reduction="mean_nonzero")`` equals PML's
    ``TripletMarginLoss(margin=0.2)`` with ``BatchHardMiner()``.
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None, *,
                 positive: str = "hardest", loss: str = "triplet", temperature: float = 0.1,
                 hard_threshold: float = 0.8, hard_weight: float = 1.0, duplicate_similarity: Optional[float] = 0.9999,
                 min_similarity: Optional[float] = None, monitor: Union[bool, CollapseMonitor] = True,
                 relation: Optional[Relation] = None):
        """Build the loss; every argument, its default and its valid range are in :class:`TripletLoss`'s
        docstring."""
        super().__init__(margin, "batch_hard", distance, normalize, reduction, backend, chunk_bytes,
                         positive=positive, loss=loss, temperature=temperature, hard_threshold=hard_threshold,
                         hard_weight=hard_weight, duplicate_similarity=duplicate_similarity,
                         min_similarity=min_similarity, monitor=monitor, relation=relation)


class BatchAllTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="batch_all"``: every valid (a, p, n), exactly, in O(chunk·N) memory.

    ``BatchAllTripletLoss(margin=0.2, reduction="mean_nonzero")`` equals PML's ``TripletMarginLoss(margin=0.2)``
    without a miner (Hermans' BA≠0).
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None, *,
                 monitor: Union[bool, CollapseMonitor] = True, relation: Optional[Relation] = None):
        """Build the loss; every argument, its default and its valid range are in :class:`TripletLoss`'s
        docstring."""
        super().__init__(margin, "batch_all", distance, normalize, reduction, backend, chunk_bytes, monitor=monitor,
                         relation=relation)


class SemiHardTripletLoss(TripletLoss):
    """:class:`TripletLoss` with ``mining="semi_hard"`` (FaceNet; TF-Addons ``triplet_semihard_loss`` semantics).

    TF-Addons' defaults correspond to ``SemiHardTripletLoss(margin=1.0, distance="squared_euclidean",
    normalize=False)``, except that anchors without a negative contribute nothing here.
    """

    def __init__(self, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None, *,
                 monitor: Union[bool, CollapseMonitor] = True, relation: Optional[Relation] = None):
        """Build the loss; every argument, its default and its valid range are in :class:`TripletLoss`'s
        docstring."""
        super().__init__(margin, "semi_hard", distance, normalize, reduction, backend, chunk_bytes, monitor=monitor,
                         relation=relation)


class SCTLoss(TripletLoss):
    """Selectively contrastive triplet loss (Xuan, Stylianou, Liu & Pless, "Hard negative examples are hard,
    but useful", ECCV 2020): batch-hard that does not collapse.

    Per anchor, on cosine similarities of L2-normalised embeddings: the *easiest* positive (the most similar
    same-class sample that is not a near-duplicate, S ≤ ``duplicate_similarity``) and the hardest negative.
    A triplet is *hard* when S_an > S_ap or S_an > ``hard_threshold``: its term is ``hard_weight``·S_an, which
    only pushes the negative away. An *easy* triplet (S_an < S_ap and S_an < ``hard_threshold``) gets
    −log softmax([S_ap, S_an]/``temperature``)[0]. An anchor whose hardest negative is a near-duplicate is
    dropped. ``"mean"`` divides by the number of hard plus easy triplets, as the authors' code.
    ``TripletLoss(mining="batch_hard", positive="easiest", loss="sct", distance="cosine")``.

    Args:
        temperature: T (default 0.1).
        hard_threshold: τ (default 0.8).
        hard_weight: λ (default 1.0).
        duplicate_similarity: the near-duplicate threshold (default 0.9999).
        reduction: as :class:`TripletLoss` (default ``"mean"``).
        backend: as :class:`TripletLoss` (default ``"auto"``).
        chunk_bytes: as :class:`TripletLoss` (default None).
        monitor: as :class:`TripletLoss` (default True).

    Shapes: as :class:`TripletLoss`; ``last_stats.hard_negative_ratio`` is the papers' logged ratio.
    """

    def __init__(self, temperature: float = 0.1, hard_threshold: float = 0.8, hard_weight: float = 1.0,
                 duplicate_similarity: Optional[float] = 0.9999, reduction: str = "mean", backend: str = "auto",
                 chunk_bytes: Optional[int] = None, monitor: Union[bool, CollapseMonitor] = True):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__(0.0, "batch_hard", "cosine", True, reduction, backend, chunk_bytes, positive="easiest",
                         loss="sct", temperature=temperature, hard_threshold=hard_threshold,
                         hard_weight=hard_weight, duplicate_similarity=duplicate_similarity, monitor=monitor)


class EPHNLoss(TripletLoss):
    """Easy-positive hard-negative loss (Xuan, Stylianou & Pless, "Improved Embeddings with Easy Positive
    Triplet Mining", WACV 2020): the easiest positive, the hardest negative, and an NCA over the two.

    Per anchor, on cosine similarities of L2-normalised embeddings: term = −log softmax([S_ap, S_an]/T)[0] =
    softplus((S_an − S_ap)/T), the easy positive excluding near-duplicates (S > ``duplicate_similarity``).
    With ``min_similarity`` m (default 0.0, the authors' code) only anchors with S_ap > m and S_an > m
    count. ``TripletLoss(mining="batch_hard", positive="easiest", loss="nca", distance="cosine")``.

    Args:
        temperature: σ (default 0.1).
        duplicate_similarity: the near-duplicate threshold (default 0.9999).
        min_similarity: default 0.0 (None: every anchor).
        reduction: as :class:`TripletLoss` (default ``"mean"``).
        backend: as :class:`TripletLoss` (default ``"auto"``).
        chunk_bytes: as :class:`TripletLoss` (default None).
        monitor: as :class:`TripletLoss` (default True).
    """

    def __init__(self, temperature: float = 0.1, duplicate_similarity: Optional[float] = 0.9999,
                 min_similarity: Optional[float] = 0.0, reduction: str = "mean", backend: str = "auto",
                 chunk_bytes: Optional[int] = None, monitor: Union[bool, CollapseMonitor] = True):
        """Build the loss; every argument, its default and its valid range are in the class docstring."""
        super().__init__(0.0, "batch_hard", "cosine", True, reduction, backend, chunk_bytes, positive="easiest",
                         loss="nca", temperature=temperature, duplicate_similarity=duplicate_similarity,
                         min_similarity=min_similarity, monitor=monitor)


class MiningSchedule(nn.Module):
    """A triplet loss whose mining changes with the training step: e.g. all triplets first, then semi-hard,
    then hard (the usual cure for batch-hard stuck at the margin from the first step).

    Args:
        stages: ``[(start_step, stage), ...]`` with strictly increasing starts, the first 0. A stage is a mining
            name (``"batch_all"``, ``"semi_hard"``, ``"batch_hard"``: a :class:`TripletLoss` with the settings
            below) or any loss module with ``loss_terms`` and a ``reduction`` (e.g. :class:`SCTLoss`).
        margin: the margin of the stages given by name (default 0.2).
        distance: their distance (default ``"euclidean"``).
        normalize: whether they L2-normalise the embeddings (default True).
        reduction: their reduction (default ``"mean"``).
        backend: their backend (default ``"auto"``).
        chunk_bytes: their chunk budget (default None: 64 MiB).
        monitor: their collapse monitors (default True: one each; a monitor given is copied per stage).

    The step counts the calls in training mode with gradients enabled (``forward`` and ``loss_terms``: one per
    training step, also under :class:`~metricloss.distributed.DistributedLoss` and
    :class:`~metricloss.CrossBatchMemory`); :meth:`set_step` sets it (e.g. to the optimiser step when
    accumulating gradients). It is in ``state_dict``, so a resumed run continues in the right stage. Every
    DDP rank counts the same steps and so mines alike.

    Example::

        >>> schedule = MiningSchedule([(0, "batch_all"), (2000, "semi_hard"), (6000, "batch_hard")], margin=0.1)
        >>> loss = schedule(torch.randn(32, 128, requires_grad=True), torch.arange(8).repeat(4))
    """

    def __init__(self, stages, margin: Union[float, str] = 0.2, distance: str = "euclidean", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", chunk_bytes: Optional[int] = None,
                 monitor: Union[bool, CollapseMonitor] = True):
        """Build the schedule; every argument, its default and its valid range are in the class docstring."""
        super().__init__()
        where = "MiningSchedule"
        try:
            stages = list(stages)
        except TypeError:
            raise TypeError(f"{where}: `stages` must be a sequence of (start_step, mining or loss) pairs") from None
        if not stages:
            raise ValueError(f"{where}: `stages` is empty")
        starts, losses = [], []
        for i, entry in enumerate(stages):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise TypeError(f"{where}: stage {i} must be a (start_step, mining or loss) pair, got {entry!r}")
            start, stage = entry
            start = C.check_positive_int(start, f"stages[{i}] start", where, minimum=0)
            if (i == 0 and start != 0) or (i > 0 and start <= starts[-1]):
                raise ValueError(f"{where}: stage starts must begin at 0 and increase strictly, got "
                                 f"{[s for s, _ in stages]}")
            if isinstance(stage, str):
                stage = TripletLoss(margin, C.check_option(stage, f"stages[{i}] mining", MININGS, where), distance,
                                    normalize, reduction, backend, chunk_bytes,
                                    monitor=monitor if isinstance(monitor, bool) else copy.deepcopy(monitor))
            elif not (isinstance(stage, nn.Module) and callable(getattr(stage, "loss_terms", None))
                      and isinstance(getattr(stage, "reduction", None), str)):
                raise TypeError(f"{where}: stage {i} must be a mining name or a loss module with loss_terms(...) and "
                                f"a `reduction`, got {type(stage).__name__}")
            starts.append(start)
            losses.append(stage)
        self.starts = starts
        self.stages = nn.ModuleList(losses)
        self.step = 0

    def set_step(self, step: int) -> None:
        """Set the step the schedule is at (the stage follows)."""
        self.step = C.check_positive_int(step, "step", "MiningSchedule.set_step", minimum=0)

    @property
    def stage_index(self) -> int:
        """Index of the stage in force at the current step."""
        i = 0
        while i + 1 < len(self.starts) and self.step >= self.starts[i + 1]:
            i += 1
        return i

    @property
    def current(self) -> nn.Module:
        """The loss module in force at the current step."""
        return self.stages[self.stage_index]

    @property
    def reduction(self) -> str:
        """The current stage's reduction (what wrappers reduce the pieces with)."""
        return self.current.reduction

    @property
    def last_stats(self) -> Optional[TripletStats]:
        """The current stage's :class:`~metricloss.TripletStats` of the last step, where it keeps one."""
        return getattr(self.current, "last_stats", None)

    def _advance(self) -> None:
        if self.training and torch.is_grad_enabled():
            self.step += 1

    # the step is a Python counter that picks the stage: traced, it would recompile every step, so the
    # schedule runs eagerly (compile the network, not the loss)
    @torch.compiler.disable
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None,
                ref_self_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The current stage's loss of the batch (arguments, shapes and return as :meth:`TripletLoss.forward`);
        in training mode the step then advances by one. Runs eagerly under ``torch.compile``."""
        out = self.current(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
        self._advance()
        return out

    @torch.compiler.disable
    def loss_terms(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: Optional[torch.Tensor] = None,
                   ref_labels: Optional[torch.Tensor] = None,
                   ref_self_index: Optional[torch.Tensor] = None) -> LossTerms:
        """The current stage's :meth:`TripletLoss.loss_terms`; in training mode the step then advances by one.
        Wrappers read :attr:`reduction` before calling it (the stage that computes the terms reduces them)."""
        out = self.current.loss_terms(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
        self._advance()
        return out

    def get_extra_state(self) -> dict:
        """The step, saved in ``state_dict``."""
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        """Restore the step from ``state_dict``."""
        self.set_step(int(state["step"]))

    def extra_repr(self) -> str:
        """The stage starts and the current step."""
        return f"starts={self.starts}, step={self.step}"

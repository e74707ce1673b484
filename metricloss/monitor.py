"""The collapse monitor: what a triplet loss's last step looked like, and a warning when training has collapsed.

Every triplet loss module keeps, from values its step computed anyway, a :class:`TripletStats` record
(``loss_fn.last_stats``): the selected distances d_ap and d_an (batch-hard and its variants), the counts of
valid and non-zero terms, the loss. Nothing is reduced or read from the device until asked: the record costs
no kernel launch per step.

A :class:`CollapseMonitor` reads one record every ``check_every`` steps (on an accelerator that is one host
read per ``check_every`` steps; none while ``torch.compile`` traces or a CUDA graph is captured) and warns
once, with a :class:`CollapseWarning`, when the run looks collapsed: for ``patience`` checks in a row the
loss sat within ``tolerance`` of its value at d_ap = d_an (the margin for the hinge, ln 2 for softplus and
NCA) and nearly every anchor's selected negative was nearer than its positive (hard-negative ratio ≥
``min_hard_ratio``), while d_ap and d_an both shrank over those checks: the embeddings contract instead of
separating. With ``spread=True`` a check also counts when the batch's mean singular value sits near its
lower bound (every embedding along one direction). The verdict needs the selected distances, which
batch-hard and its variants keep; batch-all and semi-hard report their counts and loss only. See
*Collapse-proof batch-hard* in the docs for what the figures mean.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch

__all__ = ["CollapseWarning", "TripletStats", "CollapseMonitor"]


class CollapseWarning(UserWarning):
    """A triplet loss's training looks collapsed (see :class:`CollapseMonitor`). Silence it with
    ``warnings.filterwarnings("ignore", category=metricloss.CollapseWarning)`` or ``monitor=False``."""


_FIELDS = ("loss", "num_terms", "num_nonzero", "active_fraction", "d_ap_mean", "d_ap_std", "d_an_mean",
           "d_an_std", "hard_negative_ratio", "relative_gap")


class TripletStats:
    """One step of a triplet loss, as tensors on the loss's device; :meth:`as_dict` reads them (one host read).

    Args:
        loss: the step's loss (detached): a () tensor, (N,) per-anchor sums, or the unreduced
            :class:`~metricloss.ops.reduction.LossTerms` (reduced with ``reduction`` when read).
        num_terms: () int64, the valid terms.
        num_nonzero: () int64, the non-zero terms.
        d: (2, N) the selected d_ap (row 0) and d_an (row 1) per anchor, detached (batch-hard and its
            variants; for ``loss="nca"`` / ``"sct"`` the cosine distance 1 − S); None for batch-all / semi-hard.
        valid: (N,) bool, the anchors whose term counts (with ``d``).
        reduction: the loss's reduction; the record's ``loss`` is per term: ``"sum"`` and ``"none"`` report the
            ``"mean"``.

    Fields of :meth:`as_dict` (floats; NaN where undefined, e.g. no valid anchor or no ``d``): ``loss``,
    ``num_terms``, ``num_nonzero``, ``active_fraction`` (non-zero over valid terms), ``d_ap_mean`` /
    ``d_ap_std`` / ``d_an_mean`` / ``d_an_std`` (over valid anchors; population std), ``hard_negative_ratio``
    (the valid anchors whose negative is nearer than their positive, d_an < d_ap) and ``relative_gap``
    (mean (d_an − d_ap) over mean (d_an + d_ap)/2).
    """

    def __init__(self, loss, num_terms: torch.Tensor, num_nonzero: torch.Tensor, d: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None, reduction: str = "mean"):
        """Hold the step's tensors (no copy, no kernel); the arguments are in the class docstring."""
        self.loss, self.num_terms, self.num_nonzero, self.d, self.valid = loss, num_terms, num_nonzero, d, valid
        self.reduction = reduction
        self._values: Optional[Dict[str, float]] = None

    def _loss(self) -> torch.Tensor:
        from .ops.reduction import LossTerms, reduce_loss

        # the loss per term whatever the reduction ("sum" and "none" as "mean"), so that it compares with the
        # value of one term at d_ap = d_an
        reduction = "mean" if self.reduction in ("none", "sum") else self.reduction
        if isinstance(self.loss, LossTerms):
            return self.loss.reduce(reduction)
        if self.loss.dim() == 1:
            return reduce_loss(self.loss, self.num_terms, self.num_nonzero, reduction)
        if self.reduction == "sum":
            return self.loss / self.num_terms.clamp_min(1).to(self.loss.dtype)
        return self.loss

    def _tensor(self) -> torch.Tensor:
        """All fields as one fp64 vector, so that reading them is one transfer."""
        nan = torch.full((), float("nan"), dtype=torch.float64, device=self.num_terms.device)
        terms, nonzero = self.num_terms.to(torch.float64), self.num_nonzero.to(torch.float64)
        loss = self._loss().to(torch.float64).reshape(())
        if self.d is None:
            rest = [nan] * 6
        else:
            d, w = self.d.to(torch.float64), self.valid.to(torch.float64)
            count = w.sum()
            mean = (d * w).sum(1) / count                                            # (2,)
            std = (((d - mean.unsqueeze(1)) ** 2 * w).sum(1) / count).sqrt()
            hard = ((d[1] < d[0]).to(torch.float64) * w).sum() / count
            gap = (mean[1] - mean[0]) / ((mean[0] + mean[1]) / 2)
            rest = [mean[0], std[0], mean[1], std[1], hard, gap]
        return torch.stack([loss, terms, nonzero, nonzero / terms] + rest)

    def as_dict(self) -> Dict[str, float]:
        """The record's fields as floats (computed once, then cached)."""
        if self._values is None:
            self._values = dict(zip(_FIELDS, self._tensor().tolist()))
        return dict(self._values)

    def __repr__(self) -> str:
        return "TripletStats(" + ", ".join(f"{k}={v:.4g}" for k, v in self.as_dict().items()) + ")"


def _reads_allowed() -> bool:
    """No host read while torch.compile traces or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class CollapseMonitor:
    """Watches a triplet loss's :class:`TripletStats` and warns once when its training looks collapsed.

    Args:
        check_every: read the record once every this many steps (default 10). On CPU the read is free; on an
            accelerator it is one host sync per ``check_every`` steps.
        patience: consecutive collapsed-looking checks before the warning (default 10: 100 steps).
        tolerance: how close, relatively, the loss must sit to its value at d_ap = d_an (default 0.1), and how
            close the spread to its lower bound.
        min_hard_ratio: the hard-negative ratio (anchors with d_an < d_ap) a collapsed check has at least
            (default 0.9).
        spread: also read the batch's mean singular value s_μ of the L2-normalised embeddings at each check
            (one small SVD per check) and count a check as collapsed when s_μ is within ``tolerance`` of its
            lower bound (relative to the bounds' range; :func:`metricloss.ops.svmax.svmax_bounds`). Default False.

    Attributes:
        history: one dict per check (``step`` and :class:`TripletStats` fields, plus ``spread`` when asked).
        collapsed_at: the step at which the warning fired, or None.

    Call :meth:`observe` after each step (the loss modules do it in training mode). State is plain Python;
    ``state_dict`` / ``load_state_dict`` carry it.
    """

    def __init__(self, check_every: int = 10, patience: int = 10, tolerance: float = 0.1, spread: bool = False,
                 min_hard_ratio: float = 0.9):
        """Build the monitor; every argument, its default and its valid range are in the class docstring."""
        from . import _checks as C

        where = "CollapseMonitor"
        self.check_every = C.check_positive_int(check_every, "check_every", where)
        self.patience = C.check_positive_int(patience, "patience", where)
        self.tolerance = C.check_positive(tolerance, "tolerance", where)
        if not isinstance(spread, bool):
            raise TypeError(f"{where}: `spread` must be a bool, got {type(spread).__name__}")
        self.spread = spread
        self.min_hard_ratio = C.check_nonnegative(min_hard_ratio, "min_hard_ratio", where)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.collapsed_at: Optional[int] = None
        self._streak = 0

    def observe(self, stats: TripletStats, embeddings: Optional[torch.Tensor] = None, name: str = "TripletLoss",
                collapse_value: Optional[float] = None) -> None:
        """Count one step; every ``check_every`` steps read ``stats`` and update the verdict.

        Args:
            stats: the step's record. embeddings: the step's (N, D) embeddings, for ``spread``.
            name: the loss's name for the warning. collapse_value: the loss at d_ap = d_an (the margin, ln 2),
                named in the warning.
        """
        self.step += 1
        if self.step % self.check_every or not _reads_allowed():
            return
        rec = {"step": self.step, **stats.as_dict()}
        if self.spread and embeddings is not None and embeddings.dim() == 2 and embeddings.shape[0] > 1:
            rec["spread"] = self._spread(embeddings)
        self.history.append(rec)
        if self._looks_collapsed(rec, collapse_value):
            self._streak += 1
        else:
            self._streak = 0
        if self._streak >= self.patience and self.collapsed_at is None and self._shrinking():
            self.collapsed_at = self.step
            self._warn(rec, name, collapse_value)

    @staticmethod
    def _spread(embeddings: torch.Tensor) -> float:
        """(s_μ − L)/(U − L) of the L2-normalised batch: 0 = one direction, 1 = a tight frame."""
        from .ops.svmax import svmax_bounds

        e = torch.nn.functional.normalize(embeddings.detach().to(torch.float64), dim=1)
        lower, upper = svmax_bounds(*e.shape)
        s_mu = float(torch.linalg.svdvals(e).mean())
        return (s_mu - lower) / (upper - lower) if upper > lower else float("nan")

    def _looks_collapsed(self, rec: Dict[str, float], collapse_value: Optional[float]) -> bool:
        if "spread" in rec and rec["spread"] <= self.tolerance:
            return True
        # NaN fields (no selected distances, no valid anchor) compare False: never collapsed
        at_value = collapse_value is None or abs(rec["loss"] - collapse_value) <= self.tolerance * collapse_value
        return at_value and rec["hard_negative_ratio"] >= self.min_hard_ratio

    def _shrinking(self) -> bool:
        """Over the streak, d_ap and d_an both ended smaller than they started (or the spread is at its bound)."""
        window = self.history[-self.patience:]
        first, last = window[0], window[-1]
        if "spread" in last and last["spread"] <= self.tolerance:
            return True
        return last["d_ap_mean"] < first["d_ap_mean"] and last["d_an_mean"] < first["d_an_mean"]

    def _warn(self, rec: Dict[str, float], name: str, collapse_value: Optional[float]) -> None:
        at = f" (the loss at d_ap = d_an is {collapse_value:.4g})" if collapse_value is not None else ""
        warnings.warn(
            f"{name} looks collapsed at step {self.step}: for the last {self.patience} checks (every "
            f"{self.check_every} steps) the loss stayed at {rec['loss']:.4g}{at} and the hardest negative was "
            f"nearer than the positive for {100 * rec['hard_negative_ratio']:.0f}% of the anchors, while d_ap "
            f"(now {rec['d_ap_mean']:.4g}) and d_an (now {rec['d_an_mean']:.4g}) shrank together. Remedies: an easy "
            f"positive with a contrastive form (metricloss.SCTLoss, metricloss.EPHNLoss), a mining schedule that "
            f"starts with batch-all (metricloss.MiningSchedule), a smaller margin (about 0.05-0.12); the soft margin "
            f"only on unnormalised Euclidean embeddings. What each did on the main job: the docs' page "
            f"'Collapse-proof batch-hard'. loss_fn.last_stats and loss_fn.monitor.history have the figures; "
            f"silence with monitor=False or warnings.filterwarnings('ignore', category=metricloss.CollapseWarning).",
            CollapseWarning, stacklevel=4)

    def state_dict(self) -> Dict[str, object]:
        """The monitor's state: step, streak, verdict and history."""
        return {"step": self.step, "streak": self._streak, "collapsed_at": self.collapsed_at,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.step, self._streak = int(state["step"]), int(state["streak"])
        self.collapsed_at = state["collapsed_at"]
        self.history = [dict(h) for h in state["history"]]

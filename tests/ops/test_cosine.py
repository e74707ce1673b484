"""Cosine ops: row normalisation without autograd, and the class-streamed ops never allocate (B, C)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import metricloss.functional as MF
from metricloss.ops import cosine as cosine_ops


def test_unit_rows_and_normalize_backward_match_autograd_of_f_normalize():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w[1] = 0.0           # zero row
    w[2] *= 1e-14        # below eps
    w[3] *= 1e-9         # tiny, above eps
    upstream = torch.randn(6, 5, generator=g, dtype=torch.float64)
    leaf = w.clone().requires_grad_()
    want_v = F.normalize(leaf, dim=1)
    (want_v * upstream).sum().backward()
    v, norm, active = cosine_ops.unit_rows(w, torch.float64)
    torch.testing.assert_close(v, want_v.detach(), rtol=0, atol=0)
    assert active.tolist() == [True, False, False, True, True, True]
    got = cosine_ops.normalize_backward(upstream.clone(), v, norm, active)
    torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=0)
    assert torch.isfinite(got).all()


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# B > D and C > D, so B·C is larger than the (C, D) weight gradient and the (B, D) features
B, D, C, CHUNK = 64, 8, 300, 32


@pytest.mark.parametrize("loss", ["norm_softmax", "centralized_penalty", "centralized_none_reduction"])
def test_streamed_ops_never_allocate_batch_by_classes(loss):
    x = torch.randn(B, D, requires_grad=True)
    w = torch.randn(C, D, requires_grad=True)
    y = torch.randint(0, C, (B,))

    def run(class_chunk):
        if loss == "norm_softmax":
            return MF.norm_softmax_loss(x, y, w, class_chunk=class_chunk)
        reduction = "none" if loss == "centralized_none_reduction" else "mean"
        return MF.centralized_ranking_loss(x, y, w, decorrelation="penalty", reduction=reduction,
                                           class_chunk=class_chunk).sum()

    with _LargestAllocation() as dense:
        run(None).backward()
    with _LargestAllocation() as streamed:
        run(CHUNK).backward()
    assert dense.largest >= B * C                     # the probe sees the dense (B, C) block
    assert streamed.largest <= max(B * CHUNK, C * D, D * D) < B * C

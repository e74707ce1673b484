"""Loss reductions and the fast row arg-reductions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metricloss.ops.reduction import mask_nonfinite, reduce_loss, row_argmax, row_argmin


@given(rows=st.integers(1, 5), cols=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       levels=st.sampled_from([0, 3, 1000]), nan=st.booleans())
def test_row_arg_matches_torch_min_max(rows, cols, seed, levels, nan):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if levels:  # heavy ties
        x = torch.randint(0, levels, (rows, cols), generator=g).float()
    if nan:
        x[0, torch.randint(0, cols, (1,), generator=g)] = float("nan")
    for fast, slow in ((row_argmin, torch.min), (row_argmax, torch.max)):
        v, i = fast(x)
        ref = slow(x, dim=1)
        assert torch.equal(i, ref.indices)
        torch.testing.assert_close(v, ref.values, equal_nan=True)


def test_row_arg_on_inf_and_tail():
    x = torch.full((2, 200), float("inf"))
    x[0, 199] = 1.0
    assert row_argmin(x)[1].tolist() == [199, 0]
    x[1, 130] = float("nan")
    assert row_argmin(x)[1].tolist() == [199, 130]


@pytest.mark.parametrize("reduction, expected", [("sum", 6.0), ("mean", 1.5), ("mean_nonzero", 3.0)])
def test_reduce_loss(reduction, expected):
    per_anchor = torch.tensor([1.0, 0.0, 5.0], requires_grad=True)
    out = reduce_loss(per_anchor, torch.tensor(4), torch.tensor(2), reduction)
    assert out.item() == expected
    assert reduce_loss(per_anchor, torch.tensor(4), torch.tensor(2), "none") is per_anchor


def test_reduce_loss_without_terms_is_connected_zero():
    x = torch.randn(3, requires_grad=True)
    no_valid = torch.zeros(3, dtype=torch.bool)
    per_anchor = torch.where(no_valid, x * 2.0, torch.zeros(3))  # how losses mask invalid anchors
    out = reduce_loss(per_anchor, torch.tensor(0), torch.tensor(0), "mean")
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros(3))


def test_mask_nonfinite():
    loss = torch.tensor(1.0)
    assert mask_nonfinite(loss, torch.ones(3)).item() == 1.0
    assert torch.isnan(mask_nonfinite(loss, torch.tensor([1.0, float("inf")])))
    assert torch.isnan(mask_nonfinite(loss, torch.ones(2), torch.tensor([float("nan")])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mask_nonfinite_sees_every_kind_of_nonfinite_value(dtype):
    """NaN, +Inf and -Inf anywhere in a (N, D) input (the min/max pass), in any float dtype; empty and
    integer inputs are finite."""
    loss = torch.tensor(2.0)
    x = torch.randn(64, 8).to(dtype)
    assert mask_nonfinite(loss, x).item() == 2.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[37, 5] = bad
        assert torch.isnan(mask_nonfinite(loss, x, y))
    assert mask_nonfinite(loss, torch.empty(0, 8, dtype=dtype), torch.arange(5)).item() == 2.0

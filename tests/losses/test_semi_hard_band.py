"""Semi-hard's tie band is each slot's Gram error bound (``tie_rtol_slots``), not the worst case over every
entry: in fp32 a negative 0.5% farther than the positive is farther, the fp32 loss is the fp64 one to
rounding, and every path (native, torch, the dense reference) makes the same choices."""

import pytest
import torch

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops.mining import tie_rtol, tie_rtol_slots

PATHS = ["1", "0"]  # METRICLOSS_NATIVE: native, torch


def test_band_is_the_slots_gram_error_bound():
    d_ap = torch.tensor([[1.0, 0.5, 0.0]])
    a_sq, r_max = torch.tensor([1.0]), torch.tensor(1.0)
    got = tie_rtol_slots(d_ap, a_sq, r_max, 512, torch.float32, "euclidean")
    eps = torch.finfo(torch.float32).eps
    want = 2.0 * 514 * eps * 2.0 / torch.tensor([1.0, 0.25])  # SAFETY · (D+2)·eps·(‖a‖² + R) / d_ap²
    torch.testing.assert_close(got[0, :2], want, rtol=1e-6, atol=0)
    assert got[0, 2] == pytest.approx(tie_rtol(512, torch.float32))  # d_ap = 0: the worst case
    assert float(got.max()) <= tie_rtol(512, torch.float32)
    assert float(got[0, 0]) < tie_rtol(512, torch.float32) / 60  # normalised rows: far narrower
    sq = tie_rtol_slots(d_ap * d_ap, a_sq, r_max, 512, torch.float32, "squared_euclidean")
    torch.testing.assert_close(sq[0, :2], 2 * want, rtol=1e-6, atol=0)  # twice the relative error on d²
    cos = tie_rtol_slots(d_ap, a_sq, r_max, 512, torch.float32, "cosine")
    assert torch.all(cos == cos[0, 0]) and float(cos[0, 0]) == pytest.approx(2.0 * 4.0 * 514 * eps)
    huge = tie_rtol_slots(d_ap[:, :1], torch.tensor([1e12]), torch.tensor(1e12), 512, torch.float32, "euclidean")
    assert float(huge) == pytest.approx(tie_rtol(512, torch.float32))  # capped


@pytest.mark.parametrize("native", PATHS)
def test_a_negative_half_a_percent_farther_is_farther(monkeypatch, native):
    """fp32, D = 512: the worst-case band (1.6%) called it tied with the positive and took another."""
    monkeypatch.setenv("METRICLOSS_NATIVE", native)
    d = 512
    a = torch.zeros(d)
    a[0] = 1.0
    p = torch.zeros(d)
    p[1] = 1.0                                   # d_ap = √2
    n_close = torch.zeros(d)
    n_close[0], n_close[2] = -0.01, 1.0          # d_an = √(1.01² + 1) ≈ d_ap·1.005
    n_far = torch.zeros(d)
    n_far[0] = -1.0                              # d_an = 2
    fill = torch.zeros(d)
    fill[3] = 1.0
    x = torch.stack([a, p, n_close, n_far, fill, fill]).float()
    y = torch.tensor([0, 0, 1, 2, 3, 3])
    loss = MF.triplet_loss_terms(x, y, mining="semi_hard", margin=0.5, normalize=False)
    d_an = float(torch.linalg.vector_norm(a - n_close))
    want = 0.5 + 2 ** 0.5 - d_an  # anchor 0's hinge with n_close, not with the farther fill rows (√2 + 0)
    assert float(loss.per_anchor[0]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("n,dim", [(256, 512), (384, 128)])
def test_fp32_semi_hard_is_the_fp64_loss(monkeypatch, native, n, dim):
    """Random P×K batches, normalised: fp32 within 2e-3 of the fp64 loss (the worst-case band gave 15.5% and
    3.9% below it), and the dense reference with the fp32 band decides exactly as the fp32 path does."""
    monkeypatch.setenv("METRICLOSS_NATIVE", native)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = torch.arange(n // 4).repeat_interleave(4)
    got = float(MF.triplet_loss(x, y, mining="semi_hard", margin=0.2))
    fp64 = float(reference.triplet_loss(x.double(), y, mining="semi_hard", margin=0.2))
    same_band = float(reference.triplet_loss(x.double(), y, mining="semi_hard", margin=0.2, tie_dtype=torch.float32))
    assert abs(got - fp64) <= 2e-3 * fp64
    assert got == pytest.approx(same_band, rel=1e-5)

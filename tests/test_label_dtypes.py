"""Any integer label dtype, unsigned ones included: every entry point gives the int64 result (value and
gradient). torch's sort, searchsorted, aminmax, promotion and cross_entropy take no uint16/32/64 (and
cross_entropy no int8/16/32), so the package converts where it must."""

import warnings

import pytest
import torch

import metricloss as ml
import metricloss.functional as MF

DTYPES = [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32, torch.int64]
LABELS = torch.arange(4).repeat_interleave(4)


def _x():
    return torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()


def _entry_points():
    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(0)
    return {
        "batch_hard": lambda x, y: ml.TripletLoss(mining="batch_hard")(x, y),
        "batch_all": lambda x, y: ml.TripletLoss(mining="batch_all")(x, y),
        "semi_hard": lambda x, y: ml.TripletLoss(mining="semi_hard")(x, y),
        "mine_batch_hard": lambda x, y: torch.stack(MF.mine_batch_hard(x.detach(), y)).double().sum() + 0 * x.sum(),
        "ref_labels": lambda x, y: MF.triplet_loss(x[:6], y[:6], x, y, mining="batch_all"),
        "xbm": lambda x, y: ml.CrossBatchMemory(ml.TripletLoss(), 8, 32).double()(x, y),
        "centroid": lambda x, y: ml.CentroidTripletLoss(4, 8).double()(x, y),
        "normsoftmax": lambda x, y: _seeded(lambda: ml.NormSoftmaxLoss(8, 4)).double()(x, y),
        "normsoftmax_streamed": lambda x, y: _seeded(lambda: ml.NormSoftmaxLoss(8, 4, class_chunk=2)).double()(x, y),
        "dgcrl": lambda x, y: _seeded(lambda: ml.CentralizedRankingLoss(8, 4)).double()(x, y),
        "cosine_classifier": lambda x, y: _seeded(lambda: ml.CosineClassifier(8, 4, margin=0.1)).double()(x, y).sum(),
        "warp_exact": lambda x, y: ml.WARPLoss(mode="exact")(x[:, :4] + scores, y),
        "warp_sampled": lambda x, y: ml.WARPLoss(generator=torch.Generator().manual_seed(3))(x[:, :4] + scores, y),
        "two_head": lambda x, y: MF.two_head_loss(x[:, :4] * 3, x, y),
    }


def _seeded(make):
    torch.manual_seed(0)
    return make()


ENTRY_POINTS = list(_entry_points())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_integer_dtype_gives_the_int64_result(entry, dtype):
    fn = _entry_points()[entry]
    x_ref, x = _x(), _x()
    want = fn(x_ref, LABELS)
    got = fn(x, LABELS.to(dtype))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want.backward()
    got.backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "semi_hard"])
def test_uint64_labels_of_2_pow_63_and_more_are_compared_exactly(mining):
    big = torch.tensor([2 ** 63 + 1, 2 ** 64 - 1, 7, 2 ** 63], dtype=torch.uint64).repeat_interleave(4)
    x_ref, x = _x(), _x()
    want = ml.TripletLoss(mining=mining)(x_ref, LABELS)
    torch.testing.assert_close(ml.TripletLoss(mining=mining)(x, big), want, rtol=1e-12, atol=1e-12)


def test_uint64_against_signed_labels_is_refused_clearly():
    x = _x().detach()
    with pytest.raises(TypeError, match="uint64 labels can only be compared with unsigned labels"):
        MF.triplet_loss(x[:4], LABELS[:4], x, LABELS.to(torch.uint64))
    # unsigned against unsigned compares by value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(MF.triplet_loss(x[:4], LABELS[:4].to(torch.uint8), x, LABELS.to(torch.uint64)),
                                   MF.triplet_loss(x[:4], LABELS[:4], x, LABELS))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_out_of_range_unsigned_class_labels_raise_the_range_error(dtype):
    bad = LABELS.to(dtype).clone()
    bad[0] = 9
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        ml.NormSoftmaxLoss(8, 4)(_x(), bad)
    if dtype == torch.uint64:
        bad = torch.cat([torch.tensor([2 ** 63 + 5], dtype=torch.uint64), bad[1:]])
        with pytest.raises(ValueError, match="2\\*\\*63 or more"):
            ml.NormSoftmaxLoss(8, 4)(_x(), bad)

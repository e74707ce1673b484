"""Every input check raises TypeError/ValueError naming the argument, before any work (*Design › Bad input*)."""

import pytest
import torch

import metricloss as ml
import metricloss.functional as MF
from metricloss import _checks as C

X = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("call, exc, name", [
    (lambda: MF.triplet_loss([[1.0]], Y), TypeError, "embeddings"),
    (lambda: MF.triplet_loss(torch.ones(6, 4, dtype=torch.int64), Y), TypeError, "embeddings"),
    (lambda: MF.triplet_loss(torch.randn(6), Y), ValueError, "embeddings"),
    (lambda: MF.triplet_loss(torch.randn(0, 4), Y[:0]), ValueError, "embeddings"),
    (lambda: MF.triplet_loss(torch.randn(6, 0), Y), ValueError, "embeddings"),
    (lambda: MF.triplet_loss(X, Y.float()), TypeError, "labels"),
    (lambda: MF.triplet_loss(X, Y.bool()), TypeError, "labels"),
    (lambda: MF.triplet_loss(X, Y[:5]), ValueError, "labels"),
    (lambda: MF.triplet_loss(X, Y[:, None]), ValueError, "labels"),
    (lambda: MF.triplet_loss(X, Y.tolist()), TypeError, "labels"),
    (lambda: MF.triplet_loss(X, Y, ref_embeddings=X), ValueError, "ref_labels"),
    (lambda: MF.triplet_loss(X, Y, ref_labels=Y), ValueError, "ref_embeddings"),
    (lambda: MF.triplet_loss(X, Y, torch.randn(5, 3), Y[:5]), ValueError, "ref_embeddings"),
    (lambda: MF.triplet_loss(X, Y, torch.randn(5, 4), Y), ValueError, "ref_labels"),
    (lambda: MF.triplet_loss(X, Y, margin=-0.1), ValueError, "margin"),
    (lambda: MF.triplet_loss(X, Y, margin=float("nan")), ValueError, "margin"),
    (lambda: MF.triplet_loss(X, Y, margin="hard"), ValueError, "margin"),
    (lambda: MF.triplet_loss(X, Y, margin=None), TypeError, "margin"),
    (lambda: MF.triplet_loss(X, Y, mining="hardest"), ValueError, "mining"),
    (lambda: MF.triplet_loss(X, Y, distance="l1"), ValueError, "distance"),
    (lambda: MF.triplet_loss(X, Y, reduction="avg"), ValueError, "reduction"),
    (lambda: MF.triplet_loss(X, Y, backend="cuda"), ValueError, "backend"),
    (lambda: MF.triplet_loss(X, Y, chunk_bytes=0), ValueError, "chunk_bytes"),
    (lambda: MF.triplet_loss(X, Y, chunk_bytes=1.5), TypeError, "chunk_bytes"),
    (lambda: MF.triplet_loss(X, Y, normalize="yes"), TypeError, "normalize"),
    (lambda: MF.mine_batch_hard(X, Y[:4]), ValueError, "labels"),
    (lambda: MF.mine_batch_hard(X, Y, distance="manhattan"), ValueError, "distance"),
    (lambda: MF.pairwise_distance(X, torch.randn(3, 5)), ValueError, "y"),
    (lambda: MF.pairwise_distance(X, distance="dot"), ValueError, "distance"),
    (lambda: ml.TripletLoss(mining="all"), ValueError, "mining"),
    (lambda: ml.TripletLoss(margin=-1), ValueError, "margin"),
    (lambda: ml.TripletLoss(reduction="avg"), ValueError, "reduction"),
    (lambda: ml.BatchHardTripletLoss(distance="l2"), ValueError, "distance"),
    (lambda: ml.SemiHardTripletLoss(backend="gpu"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'batch_hard', 'batch_all', 'semi_hard'"):
        MF.triplet_loss(X, Y, mining="hard")


def test_labels_on_another_device_is_reported():
    meta = torch.empty(6, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="`labels` is on meta"):
        MF.triplet_loss(X, meta)


def test_generic_checks():
    assert C.check_positive(2, "scale") == 2.0
    with pytest.raises(ValueError, match="`scale`"):
        C.check_positive(0.0, "scale")
    with pytest.raises(TypeError, match="`scale`"):
        C.check_positive("2", "scale")
    with pytest.raises(ValueError, match="`eps`"):
        C.check_nonnegative(-1e-3, "eps")
    assert C.check_positive_int(3, "max_trials") == 3
    with pytest.raises(ValueError, match="`max_trials`"):
        C.check_positive_int(0, "max_trials")
    with pytest.raises(TypeError, match="`max_trials`"):
        C.check_positive_int(True, "max_trials")
    C.check_label_range(torch.tensor([0, 4]), 5)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 5\)"):
        C.check_label_range(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="`labels` must lie"):
        C.check_label_range(torch.tensor([-1, 2]), 5)
    assert C.check_margin(0, "margin") == 0.0
    with pytest.raises(ValueError, match="`margin`"):
        C.check_margin("soft", "margin", allow_soft=False)

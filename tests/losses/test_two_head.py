"""TwoHeadLoss == cross-entropy + λ·(the existing triplet loss), exactly; gradcheck; EmbeddingHead."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metricloss as ml
import metricloss.functional as MF


def _batch(b=24, c=6, d=10, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype)
    emb = torch.randn(b, d, generator=g, dtype=dtype)
    labels = torch.arange(b) % c
    return logits, emb, labels


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_is_cross_entropy_plus_weighted_semi_hard_triplet_exactly(weight, dtype):
    logits, emb, labels = _batch(dtype=dtype)
    loss = ml.TwoHeadLoss(triplet_weight=weight)(logits, emb, labels)
    triplet = ml.SemiHardTripletLoss(margin=0.2, distance="squared_euclidean")
    expected = F.cross_entropy(logits, labels) + weight * triplet(emb, labels)
    assert torch.equal(loss, expected)
    assert torch.equal(MF.two_head_loss(logits, emb, labels, triplet_weight=weight), expected)
    if weight > 0:
        assert triplet(emb, labels) > 0  # the batch exercises the triplet term


def test_batch_hard_option_and_custom_triplet():
    logits, emb, labels = _batch()
    hard = ml.TwoHeadLoss(triplet="batch_hard")
    expected = F.cross_entropy(logits, labels) + ml.BatchHardTripletLoss(margin=0.2, distance="squared_euclidean")(
        emb, labels)
    assert torch.equal(hard(logits, emb, labels), expected)
    assert torch.equal(MF.two_head_loss(logits, emb, labels, mining="batch_hard"), expected)
    assert isinstance(ml.TwoHeadLoss("semi_hard").triplet, ml.SemiHardTripletLoss)
    custom = ml.TripletLoss(margin=0.5, mining="batch_all")
    assert torch.equal(ml.TwoHeadLoss(custom, 2.0)(logits, emb, labels),
                       F.cross_entropy(logits, labels) + 2.0 * custom(emb, labels))
    calls = []

    def fn(e, y):
        calls.append(e.shape)
        return e.sum() * 0 + 1.5

    assert torch.equal(ml.TwoHeadLoss(fn, 0.5)(logits, emb, labels), F.cross_entropy(logits, labels) + 0.5 * 1.5)
    assert calls == [emb.shape]
    assert isinstance(ml.TwoHeadLoss(custom).triplet, ml.TripletLoss)  # registered as a submodule
    assert "triplet_weight=1.0" in repr(ml.TwoHeadLoss())


@pytest.mark.parametrize("mining", ["semi_hard", "batch_hard"])
def test_gradcheck(mining):
    logits, emb, labels = _batch(b=8, c=2, d=4, dtype=torch.float64, seed=3)
    criterion = ml.TwoHeadLoss(mining, triplet_weight=0.7)
    assert torch.autograd.gradcheck(lambda lo, em: criterion(lo, em, labels),
                                    (logits.requires_grad_(), emb.requires_grad_()))


def test_half_logits_use_fp32_cross_entropy():
    logits, emb, labels = _batch()
    loss = ml.TwoHeadLoss()(logits.to(torch.bfloat16), emb, labels)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.to(torch.bfloat16).float(), labels) + ml.TwoHeadLoss().triplet(emb, labels)
    assert torch.equal(loss, expected)


def test_two_head_training_step_with_embedding_head():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    classifier, head = nn.Linear(16, 4), ml.EmbeddingHead(16, 6)
    criterion = ml.TwoHeadLoss()
    x, y = torch.randn(16, 8), torch.arange(16) % 4
    feats = backbone(x)
    loss = criterion(classifier(feats), head(feats), y)
    loss.backward()
    for m in (backbone, classifier, head):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in m.parameters())


def test_embedding_head_unit_rows_flattening_and_init():
    head = ml.EmbeddingHead(3 * 2 * 2, 5)
    x = torch.randn(7, 3, 2, 2)
    out = head(x)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(out, F.normalize(head.linear(x.flatten(1)), dim=1), rtol=0, atol=0)
    assert torch.equal(head(x.flatten(1)), out)
    bound = math.sqrt(6.0 / (12 + 5))  # Xavier-uniform, gain 1
    assert head.linear.weight.abs().max() <= bound and head.linear.weight.abs().max() > 0.5 * bound
    assert torch.equal(head.linear.bias, torch.zeros(5))
    assert ml.EmbeddingHead(4, 3, bias=False).linear.bias is None
    assert "embedding_dim=5" in repr(head)
    assert torch.equal(head(torch.zeros(2, 12)), torch.zeros(2, 5))  # zero output stays zero (eps floor)


def test_bad_arguments():
    logits, emb, labels = _batch()
    loss = ml.TwoHeadLoss()
    with pytest.raises(ValueError, match="triplet"):
        ml.TwoHeadLoss("batch_all")
    with pytest.raises(TypeError, match="triplet"):
        ml.TwoHeadLoss(3)
    with pytest.raises(ValueError, match="triplet_weight"):
        ml.TwoHeadLoss(triplet_weight=-0.1)
    with pytest.raises(ValueError, match="embeddings"):
        loss(logits, emb[:-1], labels)
    with pytest.raises(ValueError, match="labels"):
        loss(logits, emb, labels[:-1])
    with pytest.raises(ValueError, match=r"labels.*\[0, 6\)"):
        loss(logits, emb, labels + 1)
    with pytest.raises(TypeError, match="logits"):
        loss(logits.long(), emb, labels)
    with pytest.raises(ValueError, match="mining"):
        MF.two_head_loss(logits, emb, labels, mining="batch_all")
    with pytest.raises(ValueError, match="embeddings"):
        MF.two_head_loss(logits, emb[:3], labels)
    with pytest.raises(ValueError, match="in_features"):
        ml.EmbeddingHead(0, 4)
    with pytest.raises(TypeError, match="embedding_dim"):
        ml.EmbeddingHead(4, 2.5)
    with pytest.raises(ValueError, match="shape"):
        ml.EmbeddingHead(4, 2)(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        ml.EmbeddingHead(4, 2)(torch.ones(3, 4, dtype=torch.int64))

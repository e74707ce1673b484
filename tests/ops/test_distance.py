"""Shared distances: Gram blocks with exact refinement, paired distances, the GEMM backward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metricloss.functional as MF
from metricloss import reference
from metricloss.ops import distance as D

DISTANCES = D.DISTANCES


@given(n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       distance=st.sampled_from(DISTANCES), normalize=st.booleans(), dup=st.booleans())
def test_pairwise_distance_matches_reference_fp64(n, m, d, seed, distance, normalize, dup):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    if dup:
        y[0] = x[0]
    got = MF.pairwise_distance(x, y, distance, normalize=normalize)
    want = reference.pairwise_distance(x, y, distance, normalize=normalize)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", DISTANCES)
def test_self_distance_is_exactly_zero_with_zero_gradient(distance):
    x = (torch.randn(50, 16) * 100).requires_grad_()
    d = MF.pairwise_distance(x, distance=distance)
    assert (d.diagonal() == 0).all() or distance == "cosine"
    assert d.diagonal().abs().max() < 1e-6
    d.diagonal().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-5


def test_refinement_recovers_small_distances_in_fp32():
    # Points 1e-3 apart at norm 100: the Gram expansion alone loses every digit in fp32.
    x = torch.randn(64, 32, dtype=torch.float64) * 100
    y = x + torch.randn_like(x) * 1e-3
    exact = reference.pairwise_distance(x, y).diagonal()
    got = MF.pairwise_distance(x.float(), y.float()).diagonal().double()
    x32, y32 = x.float().double(), y.float().double()
    exact32 = (x32 - y32).norm(dim=1)  # exact distance of the fp32-rounded points
    torch.testing.assert_close(got, exact32, rtol=1e-5, atol=0)
    assert (got - exact).abs().max() < 1e-3


@pytest.mark.parametrize("distance", DISTANCES)
def test_paired_distance_gradient_is_finite_at_zero(distance):
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    d = D.paired_distance(a, a.detach().clone(), distance)
    d.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_safe_sqrt():
    u = torch.tensor([0.0, -1e-9, 4.0, float("nan")], requires_grad=True)
    s = D.safe_sqrt(u)
    assert s[:3].tolist() == [0.0, 0.0, 2.0] and torch.isnan(s[3])
    s[:3].sum().backward()
    assert u.grad[:3].tolist() == [0.0, 0.0, 0.25]


@pytest.mark.parametrize("distance", DISTANCES)
def test_gram_backward_equals_autograd_of_weighted_sum(distance):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    r = torch.randn(9, 5, generator=g, dtype=torch.float64)
    r[2] = a[3]  # a coincident pair: its subgradient is 0
    if distance == "cosine":
        a, r = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(r, dim=1)
    w = torch.randn(7, 9, generator=g, dtype=torch.float64)
    a_, r_ = a.clone().requires_grad_(), r.clone().requires_grad_()
    (w * reference._dist(a_, r_, distance)).sum().backward()
    dist = D.GramFactors(a, r, distance).distance_block(0, a.shape[0])
    grad_r = torch.zeros_like(r)
    colsum = torch.zeros(r.shape[0], dtype=r.dtype)
    grad_a = D.gram_backward(D.scale_distance_weights_(w.clone(), dist, distance), a, r, distance, grad_r, colsum)
    grad_r.addcmul_(colsum.unsqueeze(1), r)
    torch.testing.assert_close(grad_a, a_.grad)
    torch.testing.assert_close(grad_r, r_.grad)


def test_prepare_embeddings_upcasts_and_normalizes():
    x = torch.randn(4, 3, dtype=torch.bfloat16)
    p = D.prepare_embeddings(x, "euclidean", normalize=True)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.norm(dim=1), torch.ones(4))
    assert D.prepare_embeddings(x.double(), "cosine", normalize=False).dtype == torch.float64
    assert D.accumulation_dtype(torch.float16) == torch.float32


# --- the duplicate-row proof shared by the miners and the retrieval metrics --------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_may_have_duplicate_rows_proves_distinct_rows(dtype):
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert not D.may_have_duplicate_rows(x)
    assert not D.may_have_duplicate_rows(x[:1])  # one row: nothing to duplicate
    assert not D.may_have_duplicate_rows(x[:0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_may_have_duplicate_rows_flags_equal_rows(dtype):
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[250] = x[17]
    assert D.may_have_duplicate_rows(x)
    # -0.0 and +0.0 compare equal (as torch.unique compares them)
    y = torch.zeros(2, 3, dtype=dtype)
    y[1, 1] = -0.0
    assert D.may_have_duplicate_rows(y)


def test_may_have_duplicate_rows_spans_hash_chunks():
    x = torch.randn(D._HASH_ROWS + 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert not D.may_have_duplicate_rows(x)
    x[-1] = x[0]  # the copies lie in different hash chunks
    assert D.may_have_duplicate_rows(x)


@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_canonical_columns_matches_unique(m, d, seed):
    # small integer rows: many exact duplicates; the result must be the first copy of each row
    r = torch.randint(-1, 2, (m, d), generator=torch.Generator().manual_seed(seed)).double()
    first = torch.tensor([next(j for j in range(m) if torch.equal(r[j], r[i])) for i in range(m)])
    canon = D.canonical_columns(r)
    if bool((first == torch.arange(m)).all()):
        assert canon is None
    else:
        assert torch.equal(canon, first)


@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_canonical_columns_for_an_accelerator_reads_nothing_and_agrees(m, d, seed):
    # On an accelerator's path (up to DENSE_CANONICAL_MAX_ROWS rows) the dense form answers, without a host
    # read: the first copy of each row, the identity where rows are distinct (the host form's None).
    from benchmarks.gpu_check import make_sync_counter
    from metricloss._checks import accelerator_rules

    r = torch.randint(-1, 2, (m, d), generator=torch.Generator().manual_seed(seed)).double()
    host = D.canonical_columns_for(r)
    assert host is None or host.shape == (m,)                        # CPU eager: the host form
    with accelerator_rules(), make_sync_counter() as syncs:
        dense = D.canonical_columns_for(r)
    assert syncs.total == 0
    assert torch.equal(dense, torch.arange(m) if host is None else host)


def test_canonical_columns_for_large_reference_sets_keeps_the_host_form():
    from metricloss._checks import accelerator_rules

    r = torch.zeros(D.DENSE_CANONICAL_MAX_ROWS + 1, 2)
    with accelerator_rules():
        assert torch.equal(D.canonical_columns_for(r), torch.zeros(D.DENSE_CANONICAL_MAX_ROWS + 1, dtype=torch.int64))
    r[:, 0] = torch.arange(r.shape[0])
    with accelerator_rules():
        assert D.canonical_columns_for(r) is None                    # the host form: None when all differ


def test_rows_that_differ_by_sign_flips_do_not_collide():
    # (1, −1) and (−1, 1) differ by two sign bits: 2^63 each, which an odd multiplier alone keeps at 2^63, so
    # their sum would cancel for every coefficient; the hash folds the high bits down first
    for dtype in (torch.float64, torch.float32, torch.float16):
        r = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [-2.0, 2.0], [2.0, -2.0]], dtype=dtype)
        assert len(set(D._row_hashes(r).tolist())) == 4
        assert D.canonical_columns_dense(r).tolist() == [0, 1, 0, 3, 4]

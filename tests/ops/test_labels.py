"""ClassIndex: counts and member tables against brute force."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from metricloss.ops.labels import ClassIndex


@given(m=st.integers(1, 30), classes=st.integers(1, 8), n=st.integers(1, 10), seed=st.integers(0, 2**31 - 1),
       self_ref=st.booleans())
def test_counts_and_member_tables(m, classes, n, seed, self_ref):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, classes, (m,), generator=g) * 3 - 5  # arbitrary (negative) ints
    labels = ref if self_ref else torch.randint(0, classes + 2, (n,), generator=g) * 3 - 5
    index = ClassIndex(ref)
    cls = index.anchor_classes(labels, self_ref)
    width = max(index.max_count - int(self_ref), 0)
    members, valid = index.positive_table(cls, width)
    for i, lab in enumerate(labels.tolist()):
        expect = [j for j in range(m) if ref[j] == lab and not (self_ref and j == i)]
        assert cls.num_pos[i] == len(expect)
        assert cls.num_neg[i] == sum(1 for v in ref.tolist() if v != lab)
        assert members[i][valid[i]].tolist() == expect  # increasing index order
        assert (members[i] >= 0).all() and (members[i] < m).all()
    assert index.max_count == int(torch.bincount(ref + 5).max())

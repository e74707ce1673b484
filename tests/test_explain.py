"""L2-CAF: a head reading one location gets its map maximum there, unit norm, the network untouched."""

import pytest
import torch
from torch import nn

from metricloss.explain import l2_caf


@pytest.fixture(autouse=True)
def _one_thread():
    # hundreds of tiny ops per call: on a loaded 2-core box, 2 intra-op threads make BatchNorm ~500x slower
    torch.set_num_threads(1)
    yield


class OneLocationHead(nn.Module):
    """BatchNorm over the channels, then a linear layer that reads only the feature vector at (i, j)."""

    def __init__(self, channels: int, out: int, i: int, j: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, out)
        self.i, self.j = i, j
        with torch.no_grad():  # non-trivial running statistics, so eval mode matters
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.bn(x)[:, :, self.i, self.j])


class PoolHead(nn.Module):
    def __init__(self, channels: int, out: int):
        super().__init__()
        self.fc = nn.Linear(channels, out)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()},
            {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()},
            [m.training for m in module.modules()])


def _assert_unchanged(module, snap):
    state, params, training = snap
    for k, v in module.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k  # bitwise (parameters and buffers)
    for n, p in module.named_parameters():
        requires_grad, grad = params[n]
        assert p.requires_grad == requires_grad, n
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad), n
    assert [m.training for m in module.modules()] == training


@pytest.mark.parametrize("i, j", [(0, 0), (2, 5), (6, 3)])
def test_class_oblivious_map_peaks_at_the_only_location_the_head_reads(i, j):
    torch.manual_seed(i * 7 + j)
    head = OneLocationHead(16, 8, i, j)
    head.fc.weight.requires_grad_(False)  # a frozen parameter keeps its flag
    head.train()
    head.bn.eval()  # mixed modes are restored exactly
    head.fc.bias.grad = torch.full_like(head.fc.bias, 0.25)  # an existing .grad is not touched
    snap = _snapshot(head)
    feats = torch.randn(16, 7, 7).abs() + 0.1
    amap = l2_caf(feats, head, steps=200, lr=0.5)  # the authors' SGD with polynomial decay
    assert amap.shape == (7, 7) and amap.dtype == torch.float32
    assert divmod(int(amap.argmax()), 7) == (i, j)
    torch.testing.assert_close(amap.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)
    _assert_unchanged(head, snap)
    # Adam is scale-free: the whole unit budget moves to where the output is read (uniform start: 1/7)
    amap = l2_caf(feats, head, steps=200, lr=0.05, optimizer="adam")
    others = amap.flatten()[torch.arange(49) != i * 7 + j]
    assert amap[i, j] > 0.99 and others.abs().max() < 0.05
    torch.testing.assert_close(amap.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)
    _assert_unchanged(head, snap)


def test_class_specific_map_peaks_at_the_location_and_the_network_is_untouched():
    torch.manual_seed(1)
    feats = torch.randn(16, 7, 7)
    head = OneLocationHead(16, 4, 3, 2)
    with torch.no_grad():  # class 0's logit reads the direction of the (3, 2) features: a positive evidence
        head.fc.weight[0] = 3.0 * head.bn.eval()(feats[None])[0, :, 3, 2]
        head.fc.bias.zero_()
    head.train()
    snap = _snapshot(head)
    amap = l2_caf(feats, head, target=0, steps=300, lr=0.5)
    assert divmod(int(amap.argmax()), 7) == (3, 2)
    torch.testing.assert_close(amap.norm(), torch.tensor(1.0), rtol=1e-6, atol=0)
    _assert_unchanged(head, snap)
    # the same target given as a tensor gives the same map
    assert torch.equal(l2_caf(feats, head, target=torch.tensor([0]), steps=300, lr=0.5), amap)


def test_pooling_head_attends_to_the_strongly_activated_location():
    torch.manual_seed(2)
    feats = 0.1 * torch.rand(32, 7, 7)
    feats[:, 5, 1] += 2.0 * torch.rand(32)
    head = PoolHead(32, 10)
    amap = l2_caf(feats, head)
    assert divmod(int(amap.argmax()), 7) == (5, 1)


def test_batch_gets_one_independent_map_per_image():
    torch.manual_seed(3)
    feats = torch.randn(3, 8, 5, 6).abs()
    head = OneLocationHead(8, 4, 1, 4)
    maps = l2_caf(feats, head, steps=60, tol=0.0)
    assert maps.shape == (3, 5, 6)
    torch.testing.assert_close(maps.flatten(1).norm(dim=1), torch.ones(3), rtol=1e-6, atol=0)
    for b in range(3):
        torch.testing.assert_close(maps[b], l2_caf(feats[b], head, steps=60, tol=0.0), rtol=1e-5, atol=1e-6)
    targets = torch.tensor([0, 2, 1])
    per_target = l2_caf(feats, head, target=targets, steps=40, tol=0.0)
    for b in range(3):
        torch.testing.assert_close(per_target[b], l2_caf(feats[b], head, target=int(targets[b]), steps=40, tol=0.0),
                                   rtol=1e-5, atol=1e-6)


def test_stopping_rule_schedule_optimizers_and_grad_mode():
    torch.manual_seed(4)
    feats = torch.randn(8, 4, 4).abs()
    head = OneLocationHead(8, 3, 2, 2)
    _, full = l2_caf(feats, head, steps=120, tol=0.0, return_steps=True)
    assert full == 120
    _, early = l2_caf(feats, head, steps=2000, tol=1e-3, lr=0.5, return_steps=True)
    assert early < 2000 and early % 50 == 0
    with torch.no_grad():  # works inside a no_grad region (the filter's graph is built regardless)
        amap = l2_caf(feats, head, optimizer="adam", lr=0.05, steps=300)
    assert divmod(int(amap.argmax()), 4) == (2, 2)
    fp64 = l2_caf(feats.double(), head.double(), steps=10)
    assert fp64.dtype == torch.float64


def test_plain_function_head_and_features_that_require_grad():
    feats = torch.randn(4, 3, 3, requires_grad=True)
    amap = l2_caf(feats, lambda x: x[:, :, 0, 1] * 2.0, steps=200, lr=0.5)
    assert divmod(int(amap.argmax()), 3) == (0, 1) and feats.grad is None


def test_bad_arguments():
    head = PoolHead(4, 3)
    feats = torch.randn(4, 3, 3)
    with pytest.raises(TypeError, match="features"):
        l2_caf(feats.numpy(), head)
    with pytest.raises(TypeError, match="floating-point"):
        l2_caf(feats.long(), head)
    with pytest.raises(ValueError, match="features"):
        l2_caf(torch.randn(4, 3), head)
    with pytest.raises(TypeError, match="head"):
        l2_caf(feats, "head")
    with pytest.raises(TypeError, match="target"):
        l2_caf(feats, head, target=1.5)
    with pytest.raises(ValueError, match="target"):
        l2_caf(feats, head, target=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"target.*\[0, 3\)"):
        l2_caf(feats, head, target=3)
    with pytest.raises(ValueError, match="steps"):
        l2_caf(feats, head, steps=0)
    with pytest.raises(ValueError, match="lr"):
        l2_caf(feats, head, lr=0.0)
    with pytest.raises(ValueError, match="min_lr"):
        l2_caf(feats, head, lr=0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="optimizer"):
        l2_caf(feats, head, optimizer="lbfgs")
    with pytest.raises(ValueError, match="check_every"):
        l2_caf(feats, head, check_every=0)
    with pytest.raises(ValueError, match="logits"):
        l2_caf(feats, lambda x: x.mean(1), target=0)
    with pytest.raises(ValueError, match="head"):
        l2_caf(feats, lambda x: x.mean())

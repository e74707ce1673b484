"""Knowledge Evolution: KELS mask shapes, bitwise fit-hypothesis under re-initialisation, slim == zeroed dense."""

import math

import pytest
import torch
from torch import nn

from metricloss import evolution as KE


class Net(nn.Module):
    """conv-BN-ReLU ×2 (with a residual add), global pool, linear embedding (like the examples' CNN)."""

    def __init__(self, width=6, out=5, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.wide = nn.Sequential(nn.Conv2d(width, 2 * width + 1, 1), nn.ReLU())
        self.embed = nn.Linear(2 * width + 1, out)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn(self.conv(x)))  # residual: equal-width maps added channel by channel
        return self.embed(self.wide(x).mean((2, 3)))


def _trained_looking(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


@pytest.mark.parametrize("split_rate", [0.5, 0.3, 0.8, 1.0])
def test_kels_mask_shapes_and_blocks(split_rate):
    model = Net(width=6, out=5)
    masks = KE.kels_masks(model, split_rate)
    params = dict(model.named_parameters())
    assert set(masks) == set(params)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape, name
    k = lambda n: math.ceil(split_rate * n)  # noqa: E731

    def block(shape, n_out, n_in=None):
        m = torch.zeros(shape, dtype=torch.bool)
        m[(slice(0, n_out),) if n_in is None else (slice(0, n_out), slice(0, n_in))] = True
        return m

    # first layer: all input channels; last layer: all outputs; the rest ⌈s·C_out⌉ × ⌈s·C_in⌉
    assert torch.equal(masks["stem.0.weight"], block((6, 1, 3, 3), k(6), 1))
    assert torch.equal(masks["conv.weight"], block((6, 6, 3, 3), k(6), k(6)))
    assert torch.equal(masks["conv.bias"], block((6,), k(6)))
    assert torch.equal(masks["wide.0.weight"], block((13, 6, 1, 1), k(13), k(6)))
    assert torch.equal(masks["embed.weight"], block((5, 13), 5, k(13)))
    assert torch.equal(masks["embed.bias"], torch.ones(5, dtype=torch.bool))
    for bn in ("stem.1", "bn"):
        assert torch.equal(masks[f"{bn}.weight"], block((6,), k(6))) and torch.equal(masks[f"{bn}.bias"],
                                                                                     block((6,), k(6)))
    if split_rate == 1.0:
        assert all(m.all() for m in masks.values())


def test_kels_custom_keep_all_and_minimum_one_unit():
    model = Net(width=6, out=5)
    masks = KE.kels_masks(model, 0.5, keep_all_inputs=["stem.0", "conv"], keep_all_outputs="wide.0")
    assert masks["conv.weight"][:3].all() and not masks["conv.weight"][3:].any()  # all inputs kept
    assert masks["wide.0.weight"][:, :3].all() and not masks["wide.0.weight"][:, 3:].any()  # all outputs kept
    assert masks["embed.weight"][:3, :7].all() and not masks["embed.weight"][3:].any()  # now split
    tiny = KE.kels_masks(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(2, 1)), 0.01)
    assert int(tiny["1.weight"].sum()) == 1  # ⌈0.01·2⌉ = 1: a layer never vanishes


def test_reinitialization_keeps_the_fit_hypothesis_bitwise_and_redraws_the_rest():
    torch.manual_seed(0)
    model = _trained_looking(Net())
    masks = KE.kels_masks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    KE.reinitialize_reset_hypothesis(model, masks, generator=torch.Generator().manual_seed(5))
    after = model.state_dict()
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name  # bitwise
    conv_like = [n for n in masks if not n.startswith(("stem.1", "bn."))]
    for name in conv_like:
        reset = ~masks[name]
        if reset.any():
            changed = (after[name][reset] != before[name][reset]).float().mean()
            assert changed > 0.99, name
            fan_in = after[name].shape[1] * int(torch.tensor(after[name].shape[2:]).prod()) \
                if after[name].dim() > 1 else None
            if fan_in:  # Kaiming-uniform with a = √5 is U(±1/√fan_in)
                assert after[name][reset].abs().max() <= 1 / math.sqrt(fan_in)
    for name in ("stem.1.weight", "stem.1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert torch.equal(after[name], before[name]), name  # BatchNorm is left alone, as the authors
    # reproducible with a generator
    again = _trained_looking(Net())
    again.load_state_dict(before)
    KE.reinitialize_reset_hypothesis(again, masks, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in after.items())


@pytest.mark.parametrize("split_rate", [0.5, 0.35, 0.75])
def test_slim_network_output_equals_dense_with_reset_part_zeroed(split_rate):
    torch.manual_seed(1)
    model = _trained_looking(Net(width=8, out=6, in_channels=3)).double().eval()
    masks = KE.kels_masks(model, split_rate)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    slim = KE.extract_slim(model, masks)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())  # the dense model is untouched
    k = math.ceil(split_rate * 8)
    assert slim.conv.weight.shape == (k, k, 3, 3) and slim.stem[0].weight.shape == (k, 3, 3, 3)
    assert slim.bn.num_features == k and slim.embed.weight.shape == (6, math.ceil(split_rate * 17))
    assert not slim.training and slim.conv.weight.dtype == torch.float64
    fit, total = KE.fit_hypothesis_size(model, masks)
    assert fit == sum(p.numel() for p in slim.parameters()) and total == sum(p.numel() for p in model.parameters())
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    zeroed = _trained_looking(Net(width=8, out=6, in_channels=3)).double().eval()
    zeroed.load_state_dict(original)
    KE.zero_reset_hypothesis(zeroed, masks)
    with torch.no_grad():
        dense_out, slim_out = zeroed(x), slim(x)
        assert not torch.allclose(model(x), dense_out)  # zeroing the reset part matters
    torch.testing.assert_close(slim_out, dense_out, rtol=1e-12, atol=1e-12)


def test_slim_of_a_bare_layer_and_after_a_generation():
    layer = nn.Linear(6, 4)
    masks = KE.kels_masks(layer, 0.5)  # first and last layer at once: nothing is split
    assert all(m.all() for m in masks.values())
    assert torch.equal(KE.extract_slim(layer, masks).weight, layer.weight)
    seq = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = KE.kels_masks(seq, 0.5)
    KE.reinitialize_reset_hypothesis(seq, masks)
    slim = KE.extract_slim(seq, masks)
    x = torch.randn(5, 6)
    KE.zero_reset_hypothesis(seq, masks)
    torch.testing.assert_close(slim(x), seq(x), rtol=1e-6, atol=1e-6)
    assert slim[0].weight.shape == (4, 6) and slim[2].weight.shape == (3, 4)


def test_bad_arguments():
    model = Net()
    with pytest.raises(TypeError, match="model"):
        KE.kels_masks("net")
    with pytest.raises(ValueError, match="split_rate"):
        KE.kels_masks(model, 0.0)
    with pytest.raises(ValueError, match="split_rate"):
        KE.kels_masks(model, 1.5)
    with pytest.raises(TypeError, match="split_rate"):
        KE.kels_masks(model, True)
    with pytest.raises(ValueError, match="LayerNorm"):
        KE.kels_masks(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    with pytest.raises(ValueError, match="grouped"):
        KE.kels_masks(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match="no Conv or Linear"):
        KE.kels_masks(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="keep_all_inputs"):
        KE.kels_masks(model, keep_all_inputs=["nope"])
    masks = KE.kels_masks(model)
    with pytest.raises(ValueError, match="not a parameter"):
        KE.reinitialize_reset_hypothesis(model, {"x.weight": masks["conv.weight"]})
    with pytest.raises(ValueError, match="bool tensor"):
        KE.zero_reset_hypothesis(model, {"conv.weight": masks["conv.weight"].float()})
    with pytest.raises(TypeError, match="masks"):
        KE.extract_slim(model, [masks])
    scattered = dict(masks)
    scattered["conv.weight"] = torch.rand(masks["conv.weight"].shape) > 0.5
    with pytest.raises(ValueError, match="leading block"):
        KE.extract_slim(model, scattered)
    with pytest.raises(TypeError, match="generator"):
        KE.reinitialize_reset_hypothesis(model, masks, generator=3)


@pytest.mark.parametrize("track", [True, False])
def test_slim_batchnorm_without_affine_follows_the_layer_before(track):
    """A BatchNorm with ``affine=False`` has no weight to carry a mask: it keeps the channels that the
    Conv before it keeps (it used to keep all 8 after a conv cut to 4, and the slim net failed to run)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=track), nn.ReLU(),
                          nn.Conv2d(8, 5, 3)).double()
    with torch.no_grad():  # running statistics that differ per channel
        model(torch.randn(6, 3, 9, 9, dtype=torch.float64))
    model.eval()
    masks = KE.kels_masks(model, 0.5)
    slim = KE.extract_slim(model, masks)
    assert slim[0].weight.shape[0] == 4 and slim[1].num_features == 4
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    KE.zero_reset_hypothesis(model, masks)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-12, atol=1e-12)

"""WideResNet against the paper's Table 1 parameter counts (exact counts from its code) and shapes."""

import pytest
import torch

from dsimagenet.model import WideResNet, count_parameters, default_depth, num_stacks


@pytest.mark.parametrize("depth, width, size, params", [
    (20, 1, 16, 122_744), (28, 2, 32, 1_596_216), (28, 10, 32, 37_118_264), (36, 2, 64, 6_185_784),
])
def test_parameter_counts(depth, width, size, params):
    assert count_parameters(WideResNet(depth, width, 1000, size)) == params


@pytest.mark.parametrize("depth, width, size, millions", [
    (20, 2, 16, 0.42), (20, 10, 16, 8.9), (28, 0.5, 32, 0.13), (28, 5, 32, 9.5), (36, 0.5, 64, 0.44),
    (36, 5, 64, 37.6),
])
def test_table1_rounded_counts(depth, width, size, millions):
    decimals = len(str(millions).split(".")[1])  # Table 1 gives two significant digits
    got = count_parameters(WideResNet(depth, width, 1000, size)) / 1e6
    assert abs(got - millions) <= 0.5 * 10**-decimals + 1e-9


def test_hand_count_wrn_20_1():
    # stem conv 3*16*9 + BN 32; stack 1: first block conv 2304, BN 32, conv 2304+16, 1x1 256; three more blocks
    # of BN 32 + 2304 + BN 32 + 2320; stack 2 likewise at 32 filters; final BN 64; linear 32*1000+1000
    stack1 = (2304 + 32 + 2320 + 256) + 3 * (32 + 2304 + 32 + 2320)
    stack2 = (32 + 4608 + 64 + 9248 + 512) + 3 * (64 + 9216 + 64 + 9248)
    assert 432 + 32 + stack1 + stack2 + 64 + 33_000 == 122_744


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes(size):
    m = WideResNet(default_depth(size), 0.5, 10, size).eval()
    assert num_stacks(size) == {16: 2, 32: 3, 64: 4}[size]
    assert m(torch.zeros(2, 3, size, size)).shape == (2, 10)


def test_bad_depth():
    with pytest.raises(ValueError, match="try 28"):
        WideResNet(26, 1, 10, 32)


def test_decayed_parameters_are_conv_and_linear_weights():
    m = WideResNet(20, 1, 10, 16)
    decay, rest = m.decayed_parameters()
    assert all(p.dim() in (2, 4) for p in decay) and all(p.dim() == 1 for p in rest)
    convs = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(decay) == len(convs)
    assert sum(p.numel() for p in decay) + sum(p.numel() for p in rest) == count_parameters(m)
    # biases of the second convs and of the linear layer, and BN affine parameters, are not decayed
    assert sum(1 for mod in convs if mod.bias is not None) + 2 * sum(
        1 for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)) == len(rest)


@pytest.mark.parametrize("depth, width, classes, size", [(6, 1, 10, 8), (10, 0.0625, 1000, 8), (20, 1, 1000, 16),
                                                         (28, 2, 100, 32), (36, 3, 1000, 64), (28, 1.3, 7, 32)])
def test_parameter_count_without_building_the_model(depth, width, classes, size):
    from dsimagenet.model import parameter_count

    assert parameter_count(depth, width, classes, size) == count_parameters(WideResNet(depth, width, classes, size))
    # the formula scales to models that could never be built: linear in the blocks of each stack
    big = parameter_count(4 + 2 * 10**9, 1, 10, 8)
    assert big - parameter_count(4 + 2 * (10**9 - 1), 1, 10, 8) == 2 * 16 + 9 * 16 * 16 * 2 + 2 * 16 + 16

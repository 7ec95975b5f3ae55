"""The paper's Wide ResNets: pre-activation WRN-N-k (Zagoruyko & Komodakis), as in the SGDR code it used.

    >>> m = WideResNet(depth=28, width=10, num_classes=1000, image_size=32)
    >>> sum(p.numel() for p in m.parameters())
    37118264

Stacks of n blocks with 16k, 32k, 64k, 128k filters; one stack per halving from image_size down to 8 px:
2 stacks at 16 px (WRN-20-k), 3 at 32 px (WRN-28-k), 4 at 64 px (WRN-36-k); depth = 4 + 2 * n * stacks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_DEPTH = {16: 20, 32: 28, 64: 36}


def num_stacks(image_size: int) -> int:
    """Stacks so that the last one works on 8x8 maps: 16 px -> 2, 32 -> 3, 64 -> 4."""
    return max(1, round(math.log2(image_size / 8)) + 1)


def default_depth(image_size: int) -> int:
    return DEFAULT_DEPTH.get(image_size, 4 + 8 * num_stacks(image_size))


def stack_widths(width: float, stacks: int) -> list[int]:
    """Filters of each stack: 16k, 32k, 64k, 128k, rounded."""
    return [int(round(16 * width * 2**s)) for s in range(stacks)]


def parameter_count(depth: int, width: float, num_classes: int = 1000, image_size: int = 32) -> int:
    """What ``count_parameters(WideResNet(...))`` would give, worked out without building the model (which for
    a depth or width far beyond the machine would take hours or all of its memory before failing)."""
    stacks = num_stacks(image_size)
    n = (depth - 4) // (2 * stacks)
    total, cin = 3 * 16 * 9 + 2 * 16, 16  # stem conv, its BN (weight and bias)
    for s, cout in enumerate(stack_widths(width, stacks)):
        block = 2 * cout + 9 * cin * cout + 9 * cout * cout + cout  # conv1, BN2, conv2 and its bias
        total += block + cin * cout + (2 * cin if s > 0 else 0)  # first block: projection; BN1 but in the very first
        total += (n - 1) * (2 * cout + 9 * cout * cout + 2 * cout + 9 * cout * cout + cout)  # the others
        cin = cout
    return total + 2 * cin + cin * num_classes + num_classes  # final BN, fc


class Block(nn.Module):
    """BN-ReLU -> conv3x3 (no bias) -> BN-ReLU -> dropout -> conv3x3 (bias); a 1x1 projection shortcut
    (no bias) in the first block of each stack, taking the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int, project: bool, preact: bool, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin) if preact else None  # the very first block follows the stem's BN-ReLU
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x)) if self.bn1 is not None else x
        y = self.conv1(o)
        y = torch.relu(self.bn2(y))
        if self.drop is not None:
            y = self.drop(y)
        y = self.conv2(y)
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: float, num_classes: int = 1000, image_size: int = 32,
                 dropout: float = 0.0, stacks: int | None = None):
        super().__init__()
        stacks = stacks or num_stacks(image_size)
        n, rem = divmod(depth - 4, 2 * stacks)
        if rem or n < 1:
            raise ValueError(f"depth {depth} is not 4 + 2 * n * {stacks} for {stacks} stacks ({image_size} px): "
                             f"try {4 + 8 * stacks} (n = 4)")
        if width <= 0:
            raise ValueError(f"width must be positive, not {width}")
        self.depth, self.width, self.image_size, self.num_classes = depth, width, image_size, num_classes
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for s, cout in enumerate(stack_widths(width, stacks)):
            for b in range(n):
                first = b == 0
                blocks.append(Block(cin, cout, 2 if first and s > 0 else 1, project=first,
                                    preact=not (s == 0 and b == 0), dropout=dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")  # He-normal
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def decayed_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(conv and linear weights, everything else): the paper decays only the former."""
        decay = [m.weight for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        ids = {id(p) for p in decay}
        return decay, [p for p in self.parameters() if id(p) not in ids]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

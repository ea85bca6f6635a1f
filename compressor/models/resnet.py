"""CIFAR-style ResNets.

``resnet18/34``: the ImageNet block layout (64-512 channels) with a 3x3 stride-1 stem
and no max-pool, as is usual for 32x32 inputs. ``resnet20/56``: He et al.'s CIFAR
networks (16-32-64 channels, 3 stages of n blocks). Down-sampling shortcuts are 1x1
conv + BN (option B) rather than zero padding (option A), so that Torch-Pruning's
dependency graph sees real layers on every residual path.
"""
import torch.nn as nn

from . import register


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths, depths, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, stride=2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


@register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


@register("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((64, 128, 256, 512), (3, 4, 6, 3), num_classes, in_channels)


@register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels)


@register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ResNet((16, 32, 64), (9, 9, 9), num_classes, in_channels)

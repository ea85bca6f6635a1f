"""Conv-4 for 28x28 grayscale digits (MNIST), as used by the sensitivity paper."""
import torch.nn as nn

from . import register


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Conv4(nn.Module):
    """Four 3x3 conv+BN+ReLU layers (32-32-64-64), 2x2 max-pool after the 1st and 3rd,
    global average pool, linear head.

    Early pooling keeps the cost at about 7.4 M MACs per 28x28 image, so that the CPU
    experiments on MNIST stay within minutes. The paper's exact Conv-4 is not given.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(32, 32, 64, 64)):
        super().__init__()
        w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w1),
            nn.MaxPool2d(2),
            conv_bn_relu(w1, w2),
            conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),
            conv_bn_relu(w3, w4),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(w4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register("conv4")
def conv4(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return Conv4(num_classes, in_channels)

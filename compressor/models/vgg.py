"""CIFAR-style VGG with BatchNorm (32x32 inputs, five 2x2 pools down to 1x1).

``vgg11/13/19`` and ``vgg14`` end in one linear classifier. ``vgg16`` follows Li et al.
("Pruning Filters for Efficient ConvNets"): the same 13 conv layers with a two-layer head
512 -> 512 -> classes. ``vgg14`` is our reading of SMOEA's "VGG-14": the vgg16 body,
13 conv + 1 linear. So vgg14 and vgg16 differ only in the hidden 512x512 linear layer.
"""
import torch.nn as nn

from . import register

M = "M"
BODIES = {
    "vgg11": [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg13": [64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    "vgg16": [64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M],
    "vgg19": [64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512, 512, M],
}


class VGG(nn.Module):
    def __init__(self, body, num_classes: int = 10, in_channels: int = 3, hidden: int = 0):
        super().__init__()
        layers, cin = [], in_channels
        for item in body:
            if item == M:
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                cin = item
        layers.append(nn.AdaptiveAvgPool2d(1))  # 1x1 already at 32x32; keeps other sizes working
        self.features = nn.Sequential(*layers)
        if hidden:
            self.classifier = nn.Sequential(
                nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _register(name: str, body_name: str, hidden: int = 0):
    @register(name)
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return VGG(BODIES[body_name], num_classes, in_channels, hidden)

    factory.__name__ = name
    return factory


for _name in ("vgg11", "vgg13", "vgg19"):
    _register(_name, _name)
_register("vgg14", "vgg16")
_register("vgg16", "vgg16", hidden=512)

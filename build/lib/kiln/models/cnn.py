"""Convolutional image classifiers: the classic MNIST network, a small CIFAR-style ResNet, and
torchvision architectures by name. Every builder takes (num_classes, channels, image_size) and
returns a module mapping (B, C, S, S) float images to (B, num_classes) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MnistNet(nn.Module):
    """The Keras MNIST example network: conv32-conv64-maxpool-dropout-dense128-dropout-dense."""

    def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28):
        super().__init__()
        if image_size < 6:
            raise ValueError(f"mnist_cnn needs images of at least 6x6 pixels, got {image_size}")
        self.conv1 = nn.Conv2d(channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        pooled = (image_size - 4) // 2
        self.drop1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * pooled * pooled, 128)
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (B, 32, S-2, S-2)
        x = F.relu(self.conv2(x))  # (B, 64, S-4, S-4)
        x = F.max_pool2d(x, 2)  # (B, 64, (S-4)//2, (S-4)//2)
        x = self.drop1(torch.flatten(x, 1))
        x = self.drop2(F.relu(self.fc1(x)))  # (B, 128)
        return self.fc2(x)  # (B, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers, widths 16-32-64); global pooling makes it
    size-agnostic."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 32, n: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))  # (B, 64, S/4, S/4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GrayToRGB(nn.Module):
    """Lets a three-channel torchvision network take one-channel images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def torchvision_builder(name: str):
    def build(num_classes: int, channels: int, image_size: int) -> nn.Module:
        import torchvision

        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return GrayToRGB(net) if channels == 1 else net

    return build


CNN_ARCHS = {
    "mnist_cnn": MnistNet,
    "resnet8": lambda num_classes, channels, image_size: CifarResNet(
        num_classes, channels, image_size, n=1
    ),
    "resnet20": lambda num_classes, channels, image_size: CifarResNet(
        num_classes, channels, image_size, n=3
    ),
}
# torchvision architectures, untrained: they need inputs of at least 32x32 pixels.
TORCHVISION_ARCHS = (
    "resnet18", "resnet34", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
)
for _name in TORCHVISION_ARCHS:
    CNN_ARCHS[_name] = torchvision_builder(_name)


def build_cnn(arch: str, num_classes: int, channels: int, image_size: int) -> nn.Module:
    if arch not in CNN_ARCHS:
        raise ValueError(f"unknown CNN architecture {arch!r}; choose one of {sorted(CNN_ARCHS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return CNN_ARCHS[arch](num_classes=num_classes, channels=channels, image_size=image_size)

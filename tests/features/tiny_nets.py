"""Tiny models for the feature-distillation tests (no downloads): kdkit's zoo CNN, a torchvision-style ResNet and
Hugging Face ViT / ResNet classifiers built from small configs, each wrapped as kdkit builds it (ImageClassifier)."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.config.schema import ModelConfig
from kdkit.models import build_model


def classifier(spec: dict, size: int = 8, channels: int = 1, num_classes: int = 10):
    torch.manual_seed(0)
    return build_model(ModelConfig(**spec), num_classes=num_classes, channels=channels, data_size=(size, size))


def zoo_cnn(width: int = 4, depth: int = 1) -> dict:
    return {"factory": "kdkit.models.zoo:fmnist_cnn", "kwargs": {"width": width, "depth": depth, "dropout": 0.0}}


def hf_vit(hidden: int = 8, layers: int = 2, heads: int = 2, patch: int = 2, image: int = 8) -> dict:
    # initializer_range 0.5: peaked attention (the default 0.02 gives nearly uniform attention and KLs near 0)
    return {"hf_config": {"model_type": "vit", "hidden_size": hidden, "num_hidden_layers": layers,
                          "num_attention_heads": heads, "intermediate_size": 2 * hidden, "image_size": image,
                          "patch_size": patch, "initializer_range": 0.5}}


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, small."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """The layout of torchvision's resnet18 (conv1/bn1/relu/maxpool, layer1..layer3 of BasicBlocks, avgpool, fc),
    plus an auxiliary head that runs in training mode only."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 4 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.aux = nn.Linear(4 * width, num_classes)  # an auxiliary head that runs in training only (as Inception's)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = torch.flatten(self.avgpool(x), 1)
        return self.fc(pooled) + (0 * self.aux(pooled) if self.training else 0)


def tiny_resnet(num_classes: int = 10, in_channels: int = 1, width: int = 4) -> nn.Module:
    return TinyResNet(num_classes, in_channels, width)

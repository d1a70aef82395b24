"""Write ImageNet-shaped CNNs with random weights and BatchNormalization kept, for the speed benchmark.

    python tools/make_imagenet_models.py OUT_DIR [--models resnet18 resnet50 ...]

Needs PyTorch (a tools-only dependency; torchvision is not needed). The
topologies follow the published networks layer for layer (1000 classes,
224x224 input): ResNet-18 (basic blocks), ResNet-50 and ResNet-101
(bottleneck blocks), MobileNetV2 (inverted residuals, depthwise, ReLU6) and
DenseNet-121 (pre-activation dense layers joined by Concat). Seeded, exported
with the TorchScript exporter at opset 17 in training-preserving mode, so the
BatchNormalization nodes stay in the file as a user's export would keep them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from make_zoo import Bottleneck, InvertedResidual, conv_bn, randomise_batchnorm


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al. 2016: a 7x7 stem, four stages of ``depths`` blocks, global pooling, a 1000-way classifier."""

    def __init__(self, depths: tuple[int, ...], bottleneck: bool, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for stage, depth in enumerate(depths):
            width = 64 * 2 ** stage
            cout = width * 4 if bottleneck else width
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Bottleneck(cin, width, cout, stride) if bottleneck else BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class MobileNetV2(nn.Module):
    """Sandler et al. 2018, width 1.0: (expansion, channels, repeats, stride) per stage."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for expand, cout, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand) if expand > 1
                              else DepthwiseSeparable(cin, cout))
                cin = cout
        layers.append(conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNetV2's first block (expansion 1): depthwise 3x3 with ReLU6, then a linear 1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn(cin, cin, 3, groups=cin, act=nn.ReLU6), conv_bn(cin, cout, 1, act=None))

    def forward(self, x):
        return self.block(x)


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (4k channels) then BN-ReLU-Conv3x3 (k channels), concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet121(nn.Module):
    """Huang et al. 2017: growth 32, blocks of 6, 12, 24, 16 layers, transitions halving the channels."""

    def __init__(self, classes: int = 1000, growth: int = 32, depths: tuple[int, ...] = (6, 12, 24, 16)):
        super().__init__()
        layers, channels = [conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for i, depth in enumerate(depths):
            for _ in range(depth):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if i < len(depths) - 1:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


MODELS = {
    "resnet18": lambda: ResNet((2, 2, 2, 2), bottleneck=False),
    "resnet50": lambda: ResNet((3, 4, 6, 3), bottleneck=True),
    "resnet101": lambda: ResNet((3, 4, 23, 3), bottleneck=True),
    "mobilenetv2": MobileNetV2,
    "densenet121": DenseNet121,
}


def export(name: str, out: Path, size: int = 224) -> Path:
    """Export ``MODELS[name]`` (seeded, BatchNorm statistics randomised) to OUT/NAME.onnx."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    path = out / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = export(name, args.out)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

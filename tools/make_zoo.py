"""Write the small architecture zoo in models/: random-weight CNNs exported from PyTorch, for pair-finding tests.

    python tools/make_zoo.py [--out models]

Needs PyTorch (a tools-only dependency). Every model is exported with the
TorchScript exporter, as third-party models usually are, and seeded, so the
files come out the same each time:

- ``vgg_chain.onnx``: plain Conv-BN-ReLU chain with max pooling, BN kept;
- ``mobilenetv2_block.onnx``: stem, two inverted-residual blocks (1x1
  expand, 3x3 depthwise, ReLU6, linear 1x1 projection; one with a residual
  Add), 1x1 head conv, classifier; BN folded by the exporter, ReLU6 as Clip;
- ``bottleneck_resnet.onnx``: stem and two bottleneck blocks (1x1, 3x3, 1x1,
  residual Add; the first with a projection shortcut), BN kept;
- ``concat_net.onnx``: SqueezeNet fire modules (squeeze 1x1, expand 1x1 and
  3x3 joined by a channel Concat) and a DenseNet-style Concat of a block's
  input with its output, BN kept;
- ``old_opset9.onnx``: a Conv-BN-ReLU chain at opset 9 with the
  initializers also listed as graph inputs, as old exporters wrote them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class VGGChain(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), nn.MaxPool2d(2), conv_bn(8, 16), conv_bn(16, 16),
                                      nn.MaxPool2d(2), conv_bn(16, 16))
        self.classifier = nn.Linear(16, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(conv_bn(cin, hidden, 1, act=nn.ReLU6),
                                   conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                                   conv_bn(hidden, cout, 1, act=None))

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2Block(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=nn.ReLU6)
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2))
        self.head = conv_bn(16, 32, 1, act=nn.ReLU6)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, cout, 1, act=None))
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class BottleneckResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.blocks = nn.Sequential(Bottleneck(16, 8, 32, 2), Bottleneck(32, 8, 32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], 1)


class ConcatNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.fire1 = Fire(16, 4, 8)
        self.fire2 = Fire(16, 4, 8)
        self.dense = conv_bn(16, 8)
        self.transition = conv_bn(24, 16, 1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.fire2(self.fire1(self.stem(x)))
        x = self.transition(torch.cat([x, self.dense(x)], 1))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class OldChain(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8))
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.features(x), 2)
        return self.fc(x.view(x.size(0), -1))


ZOO = {
    # name: (module, input size, opset, BN kept, initializers as inputs)
    "vgg_chain": (VGGChain, 16, 17, True, False),
    "mobilenetv2_block": (MobileNetV2Block, 16, 13, False, False),
    "bottleneck_resnet": (BottleneckResNet, 16, 17, True, False),
    "concat_net": (ConcatNet, 16, 17, True, False),
    "old_opset9": (OldChain, 8, 9, True, True),
}


def randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters away from the identity, so that folding them matters."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


def export(name: str, out: Path) -> Path:
    make, size, opset, keep_bn, inputs = ZOO[name]
    torch.manual_seed(0)
    model = make().eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    path = out / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.randn(1, 3, size, size), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], keep_initializers_as_inputs=inputs,
                          training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=not keep_bn)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ZOO:
        path = export(name, args.out)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

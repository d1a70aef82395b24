"""Tiny ONNX graphs built with onnx.helper, and the shared-folder locations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import settings
from onnx import TensorProto, helper, numpy_helper

# the first call of a Numba function loads or compiles it, which can take longer than hypothesis's 200 ms
# deadline on a busy machine; the property tests check values, not speed
settings.register_profile("values", deadline=None)
settings.load_profile("values")

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = Path(__file__).resolve().parents[1] / "models"
RESNET20 = MODELS / "cifar10_resnet20.onnx"
"""The pretrained CIFAR-10 ResNet-20 that ships with the project (models/cifar10_resnet20.LICENSE)."""


class GraphBuilder:
    """Append nodes and random initializers, then ``model()``."""

    def __init__(self, input_shape=(1, 3, 8, 8), seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def const_int(self, name: str, values) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        name = name or self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = False,
             name: str | None = None) -> str:
        name = name or self._name("Conv")
        w = self.const(f"{name}.w", self.rng.normal(0, 0.3, (cout, cin // group, k, k)))
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.normal(0, 0.1, cout)))
        return self.node("Conv", inputs, name=name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        name = name or self._name("BatchNormalization")
        params = [self.const(f"{name}.gamma", self.rng.uniform(0.5, 1.5, c)),
                  self.const(f"{name}.beta", self.rng.normal(0, 0.2, c)),
                  self.const(f"{name}.mean", self.rng.normal(0, 0.2, c)),
                  self.const(f"{name}.var", self.rng.uniform(0.5, 2.0, c))]
        return self.node("BatchNormalization", [x] + params, name=name, epsilon=1e-5)

    def gemm(self, x: str, fin: int, fout: int, name: str | None = None) -> str:
        name = name or self._name("Gemm")
        w = self.const(f"{name}.w", self.rng.normal(0, 0.3, (fout, fin)))
        b = self.const(f"{name}.b", self.rng.normal(0, 0.1, fout))
        return self.node("Gemm", [x, w, b], name=name, transB=1)

    def model(self, output: str, opset: int = 17) -> onnx.ModelProto:
        probe = helper.make_graph(self.nodes, "tiny", [self.input], [helper.make_value_info(output, onnx.TypeProto())],
                                  self.initializers)
        inferred = onnx.shape_inference.infer_shapes(
            helper.make_model(probe, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))
        out = next(v for v in list(inferred.graph.value_info) + list(inferred.graph.output) if v.name == output)
        graph = helper.make_graph(self.nodes, "tiny", [self.input], [out], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        onnx.checker.check_model(model)
        return model


def chain_model(n_convs: int = 4, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A plain (VGG-style) chain: stem, n x (Conv-BN-Relu), GlobalAveragePool, Flatten, Gemm."""
    g = GraphBuilder(seed=seed)
    x = g.node("Relu", [g.bn(g.conv("x", 3, channels, name="stem"), channels)])
    for i in range(n_convs):
        x = g.node("Relu", [g.bn(g.conv(x, channels, channels, name=f"conv{i}"), channels)])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    return g.model(g.gemm(x, channels, 10, name="fc"))


def residual_model(channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    """Stem and one ResNet basic block: conv1-BN-Relu-conv2-BN, Add with the block input, Relu, head."""
    g = GraphBuilder(seed=seed)
    stem = g.node("Relu", [g.bn(g.conv("x", 3, channels, name="stem"), channels)])
    h = g.node("Relu", [g.bn(g.conv(stem, channels, channels, name="block.conv1"), channels)])
    h = g.bn(g.conv(h, channels, channels, name="block.conv2"), channels)
    x = g.node("Relu", [g.node("Add", [h, stem], name="block.add")])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    return g.model(g.gemm(x, channels, 10, name="fc"))


def run_model(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture
def resnet20() -> Path:
    return RESNET20

"""The vector-Jacobian products of pointwise ops (activations and arithmetic), as ONNX nodes; see
``gradient_rules.py``."""

from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError
from .gradients import Builder, attributes, static_shape


def relu(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    return [b.op("Mul", [dy[0], b.mask(b.op("Greater", [node.input[0], b.const(0.0)]))])]


def leaky_relu(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """dX = dY (slope + (1 - slope) [X > 0])."""
    slope = b.const(attributes(node).get("alpha", 0.01)) if node.op_type == "LeakyRelu" else node.input[1]
    positive = b.mask(b.op("Greater", [node.input[0], b.const(0.0)]))
    factor = b.op("Add", [slope, b.op("Mul", [positive, b.op("Sub", [b.const(1.0), slope])])])
    return [b.op("Mul", [dy[0], factor])] + [None] * (len(node.input) - 1)


def clip(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    attrs = attributes(node)
    bound = lambda index, name: attrs.get(name) if len(node.input) <= index or not node.input[index] else float(
        b.constants[node.input[index]].reshape(-1)[0])
    low, high = bound(1, "min"), bound(2, "max")
    inside = None
    for bound, compare in ((low, "Greater"), (high, "Less")):
        if bound is not None:
            test = b.op(compare, [node.input[0], b.const(bound)])
            inside = test if inside is None else b.op("And", [inside, test])
    dx = dy[0] if inside is None else b.op("Mul", [dy[0], b.mask(inside)])
    return [dx] + [None] * (len(node.input) - 1)


def sigmoid(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    y = node.output[0]
    return [b.op("Mul", [dy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


def hard_sigmoid(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    y, alpha = node.output[0], attributes(node).get("alpha", 0.2)
    inside = b.mask(b.op("And", [b.op("Greater", [y, b.const(0.0)]), b.op("Less", [y, b.const(1.0)])]))
    return [b.op("Mul", [dy[0], b.op("Mul", [inside, b.const(alpha)])])]


def hard_swish(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """y = x h(x), h = HardSigmoid(1/6, 1/2): dy/dx = h(x) + x / 6 inside (-3, 3)."""
    x = node.input[0]
    h = b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    inside = b.mask(b.op("And", [b.op("Greater", [h, b.const(0.0)]), b.op("Less", [h, b.const(1.0)])]))
    slope = b.op("Add", [h, b.op("Mul", [inside, b.op("Mul", [x, b.const(1 / 6)])])])
    return [b.op("Mul", [dy[0], slope])]


def elementwise(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """Sqrt, Exp, Tanh, Erf, and Pow with a constant exponent: dX = dY f'(X), f' from X or Y."""
    x, y = node.input[0], node.output[0]
    if node.op_type == "Sqrt":
        slope = b.op("Div", [b.const(0.5), y])
    elif node.op_type == "Exp":
        slope = y
    elif node.op_type == "Tanh":
        slope = b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])
    elif node.op_type == "Erf":
        slope = b.op("Mul", [b.const(2 / np.sqrt(np.pi)), b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])])
    else:
        if node.input[1] not in b.constants:
            raise InputError(f"distillation needs Pow {node.name} to have a constant exponent")
        p = float(b.constants[node.input[1]].reshape(-1)[0])
        slope = b.op("Mul", [b.const(p), b.op("Pow", [x, b.const(p - 1)])])
    return [b.op("Mul", [dy[0], slope])] + [None] * (len(node.input) - 1)


def softmax(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """dX = Y (dY - sum(dY Y) along the axis)."""
    y = node.output[0]
    axis = attributes(node).get("axis", -1) % len(static_shape(b, y))
    inner = b.reduce_sum(b.op("Mul", [dy[0], y]), [axis])
    return [b.op("Mul", [y, b.op("Sub", [dy[0], inner])])]


def cast(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    if attributes(node).get("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        raise InputError(f"distillation does not differentiate through Cast to a non-float type ({node.name})")
    return [dy[0]]


def arithmetic(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    a, c = node.input[0], node.input[1]
    y = static_shape(b, node.output[0])
    if node.op_type in ("Add", "Sub"):
        terms = [dy[0], dy[0] if node.op_type == "Add" else b.op("Neg", [dy[0]])]
    elif node.op_type == "Mul":
        terms = [b.op("Mul", [dy[0], c]), b.op("Mul", [dy[0], a])]
    else:  # Div: d(a/c) = da / c - dc a / c^2 = da / c - dc y / c
        quotient = b.op("Div", [dy[0], c])
        terms = [quotient, b.op("Neg", [b.op("Mul", [quotient, node.output[0]])])]
    return [b.unbroadcast(t, y, static_shape(b, name)) if name not in b.constants else None for t, name in zip(terms, (a, c))]

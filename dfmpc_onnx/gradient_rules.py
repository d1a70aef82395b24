"""The vector-Jacobian product of each op of exported CNNs, as ONNX nodes (for ``gradients.backward``):
convolutions, pools, layout and linear ops here, pointwise ops in ``gradient_pointwise.py``.

Each rule takes the builder, the forward node and the gradients of its outputs (None where the loss does
not reach an output) and returns one gradient per input (None for inputs that are constants). Shapes are
static, so every shape, pad and axis is a constant.
"""

from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError
from .gradient_pointwise import (arithmetic, cast, clip, elementwise, hard_sigmoid, hard_swish, leaky_relu, relu,
                                 sigmoid, softmax)
from .gradients import Builder, attributes, static_shape




def _spatial_pads(node: onnx.NodeProto, x: tuple, y: tuple, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """Explicit (begins..., ends...) pads of a Conv or pool, auto_pad resolved from the static shapes."""
    attrs = attributes(node)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    rank = len(kernel)
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * rank))
    if auto == "VALID":
        return [0] * 2 * rank
    totals = [max(0, (y[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x[2 + i]) for i in range(rank)]
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    return small + large if auto == "SAME_UPPER" else large + small


def _transposed(b: Builder, dy: str, weight: str, x: tuple, y: tuple, kernel: list[int], strides: list[int],
                dilations: list[int], pads: list[int], group: int) -> str:
    """ConvTranspose(dy, weight): the gradient of a convolution with respect to its input (of shape x)."""
    rank = len(kernel)
    covered = [(y[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[rank + i]
               for i in range(rank)]
    extra = [x[2 + i] - covered[i] for i in range(rank)]
    if any(e < 0 or e >= max(strides[i], dilations[i]) for i, e in enumerate(extra)):
        raise InputError("distillation cannot invert a convolution or pool whose windows pass the input's end")
    return b.op("ConvTranspose", [dy, weight], group=group, strides=strides, dilations=dilations, pads=pads,
                kernel_shape=kernel, output_padding=extra)


def conv(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """dX = ConvTranspose(dY, W); with stride 1 and a constant W, the same as a Conv of dY with W's
    input and output channels swapped and its kernel flipped, which onnxruntime runs faster."""
    attrs = attributes(node)
    x, y = static_shape(b, node.input[0]), static_shape(b, node.output[0])
    kernel = list(static_shape(b, node.input[1])[2:])
    rank, group = len(kernel), int(attrs.get("group", 1))
    strides, dilations = list(attrs.get("strides", [1] * rank)), list(attrs.get("dilations", [1] * rank))
    pads = _spatial_pads(node, x, y, kernel, strides, dilations)
    reach = [(k - 1) * d for k, d in zip(kernel, dilations)]
    flipped_pads = [reach[i % rank] - p for i, p in enumerate(pads)]
    if set(strides) == {1} and node.input[1] in b.constants and min(flipped_pads) >= 0:
        dx = b.op("Conv", [dy[0], b.const(_flipped(b.constants[node.input[1]], group))], group=group,
                  dilations=dilations, pads=flipped_pads, kernel_shape=kernel)
    else:
        dx = _transposed(b, dy[0], node.input[1], x, y, kernel, strides, dilations, pads, group)
    return [dx] + [None] * (len(node.input) - 1)


def _flipped(weight: np.ndarray, group: int) -> np.ndarray:
    """W (M, C/g, k...) as the weight (C, M/g, k...) of the transposed convolution, kernel flipped."""
    m, c = weight.shape[0] // group, weight.shape[1]
    kernel = weight.shape[2:]
    swapped = weight.reshape(group, m, c, *kernel).swapaxes(1, 2).reshape(group * c, m, *kernel)
    return np.ascontiguousarray(np.flip(swapped, axis=tuple(range(2, swapped.ndim))))


def batchnorm(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    gamma, _, _, var = (b.constants[name].astype(np.float64) for name in node.input[1:5])
    scale = gamma / np.sqrt(var + attributes(node).get("epsilon", 1e-5))
    shape = [1, -1] + [1] * (len(static_shape(b, node.input[0])) - 2)
    return [b.op("Mul", [dy[0], b.const(scale.reshape(shape))])] + [None] * 4


def max_pool(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """The gradient goes to where each window's maximum was: the Indices output (flat over the input),
    summed where windows overlap."""
    if len(node.output) < 2 or not node.output[1]:
        raise InputError(f"MaxPool {node.name} has no Indices output")  # ``with_pool_indices`` adds it
    x = static_shape(b, node.input[0])
    flat = b.op("ScatterElements", [b.const(np.zeros(int(np.prod(x)))), b.reshape(node.output[1], [-1]),
                                    b.reshape(dy[0], [-1])], axis=0, reduction="add")
    return [b.reshape(flat, x)]


def average_pool(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    attrs = attributes(node)
    x, y = static_shape(b, node.input[0]), static_shape(b, node.output[0])
    if node.op_type == "GlobalAveragePool":
        scaled = b.op("Mul", [dy[0], b.const(1.0 / np.prod(x[2:]))])
        return [b.op("Expand", [scaled, b.ints(x)])]
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    pads = _spatial_pads(node, x, y, kernel, strides, [1] * rank)
    counts = _window_counts(x[2:], y[2:], kernel, strides, pads, bool(attrs.get("count_include_pad", 0)))
    scaled = b.op("Div", [dy[0], b.const(counts)])
    ones = b.const(np.ones([x[1], 1] + kernel))
    return [_transposed(b, scaled, ones, x, y, kernel, strides, [1] * rank, pads, x[1])]


def _window_counts(x: tuple, y: tuple, kernel: list[int], strides: list[int], pads: list[int],
                   include_pad: bool) -> np.ndarray:
    """How many inputs each output of an average pool averages (per output position)."""
    rank = len(kernel)
    counts = np.ones(y)
    for axis in range(rank):
        starts = np.arange(y[axis]) * strides[axis] - pads[axis]
        ends = starts + kernel[axis]
        if not include_pad:
            starts, ends = np.maximum(starts, 0), np.minimum(ends, x[axis])
        else:
            ends = np.minimum(ends, x[axis] + pads[rank + axis])
        shape = [1] * rank
        shape[axis] = -1
        counts = counts * (ends - starts).reshape(shape)
    return counts.astype(np.float32)


def global_max_pool(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    hit = b.mask(b.op("Equal", [node.input[0], node.output[0]]))
    return [b.op("Mul", [hit, dy[0]])]


def reduce_mean(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    x, y = static_shape(b, node.input[0]), static_shape(b, node.output[0])
    attrs = attributes(node)
    axes = attrs.get("axes") if len(node.input) < 2 else b.constants[node.input[1]].tolist()
    axes = list(range(len(x))) if not axes else [a % len(x) for a in axes]
    kept = [1 if axis in axes else d for axis, d in enumerate(x)]
    gradient = b.reshape(dy[0], kept) if tuple(kept) != tuple(y) else dy[0]
    if node.op_type == "ReduceMean":
        gradient = b.op("Mul", [gradient, b.const(1.0 / np.prod([x[a] for a in axes]))])
    return [b.op("Expand", [gradient, b.ints(x)])] + [None] * (len(node.input) - 1)


def pad(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    attrs = attributes(node)
    mode = attrs.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise InputError(f"distillation supports constant Pad only ({node.name})")
    x = static_shape(b, node.input[0])
    pads = b.constants[node.input[1]].tolist() if len(node.input) > 1 else list(attrs["pads"])
    if len(node.input) > 3 and node.input[3]:
        raise InputError(f"distillation does not support Pad with axes ({node.name})")
    begins = pads[:len(x)]
    if min(pads) < 0:
        raise InputError(f"distillation does not support negative pads ({node.name})")
    dx = b.op("Slice", [dy[0], b.ints(begins), b.ints([s + d for s, d in zip(begins, x)]), b.ints(range(len(x)))])
    return [dx] + [None] * (len(node.input) - 1)


def slice_(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    """Each sliced axis in turn: zeros between the kept steps, then zeros before and after."""
    x, y = static_shape(b, node.input[0]), static_shape(b, node.output[0])
    starts, ends = (b.constants[name].tolist() for name in node.input[1:3])
    axes = b.constants[node.input[3]].tolist() if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = b.constants[node.input[4]].tolist() if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    gradient, shape = dy[0], list(y)
    for start, axis, step in zip(starts, axes, steps):
        axis %= len(x)
        if step < 1:
            raise InputError(f"distillation does not support negative Slice steps ({node.name})")
        start = min(max(start + x[axis] if start < 0 else start, 0), x[axis])
        if step > 1:
            gradient, shape = _spread(b, gradient, shape, axis, step)
        before, after = start, x[axis] - start - shape[axis]
        if after < 0:
            gradient = b.op("Slice", [gradient, b.ints([0]), b.ints([x[axis] - start]), b.ints([axis])])
            after, shape[axis] = 0, x[axis] - start
        widths = [0] * (2 * len(x))
        widths[axis], widths[len(x) + axis] = before, after
        gradient = b.op("Pad", [gradient, b.ints(widths)])
        shape[axis] = x[axis]
    return [gradient] + [None] * (len(node.input) - 1)


def _spread(b: Builder, gradient: str, shape: list[int], axis: int, step: int) -> tuple[str, list[int]]:
    """``step - 1`` zeros after every element along ``axis``."""
    widths = [0] * (2 * (len(shape) + 1))
    widths[len(shape) + 1 + axis + 1] = step - 1
    spread = b.op("Pad", [b.op("Unsqueeze", [gradient, b.ints([axis + 1])]), b.ints(widths)])
    shape = shape[:axis] + [shape[axis] * step] + shape[axis + 1:]
    return b.reshape(spread, shape), shape


def concat(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    y = static_shape(b, node.output[0])
    axis = attributes(node)["axis"] % len(y)
    gradients, offset = [], 0
    for name in node.input:
        size = static_shape(b, name)[axis]
        gradients.append(b.op("Slice", [dy[0], b.ints([offset]), b.ints([offset + size]), b.ints([axis])]))
        offset += size
    return gradients


def split(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    parts = [g if g is not None else b.const(np.zeros(static_shape(b, o))) for g, o in zip(dy, node.output)]
    return [b.op("Concat", parts, axis=attributes(node).get("axis", 0))] + [None] * (len(node.input) - 1)


def reshape(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    return [b.reshape(dy[0], static_shape(b, node.input[0]))] + [None] * (len(node.input) - 1)


def transpose(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    perm = attributes(node).get("perm") or list(reversed(range(len(static_shape(b, node.input[0])))))
    return [b.op("Transpose", [dy[0]], perm=list(np.argsort(perm)))]


def identity(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    return [dy[0]] + [None] * (len(node.input) - 1)


def gemm(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    attrs = attributes(node)
    if node.input[1] not in b.constants:
        raise InputError(f"distillation needs Gemm {node.name} to have a constant B")
    # Y = alpha A' B' (+ beta C): dA' = alpha dY B'^T, and dA = dA'^T when A' = A^T
    da = b.op("Gemm", [dy[0], node.input[1]], alpha=float(attrs.get("alpha", 1.0)),
              transB=0 if attrs.get("transB", 0) else 1)
    if attrs.get("transA", 0):
        da = b.op("Transpose", [da], perm=[1, 0])
    return [da] + [None] * (len(node.input) - 1)


def matmul(b: Builder, node: onnx.NodeProto, dy: list) -> list:
    a, c = node.input
    shapes = static_shape(b, a), static_shape(b, c)
    y = static_shape(b, node.output[0])
    if min(len(s) for s in shapes) < 2:
        raise InputError(f"distillation does not support MatMul of vectors ({node.name})")
    swap = lambda name, rank: b.op("Transpose", [name], perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    da = b.op("MatMul", [dy[0], swap(c, len(shapes[1]))]) if a not in b.constants else None
    dc = b.op("MatMul", [swap(a, len(shapes[0])), dy[0]]) if c not in b.constants else None
    return [None if g is None else b.unbroadcast(g, y[:-2] + s[-2:], s) for g, s in zip((da, dc), shapes)]


RULES = {
    "Conv": conv, "BatchNormalization": batchnorm, "Relu": relu, "LeakyRelu": leaky_relu, "PRelu": leaky_relu,
    "Clip": clip, "Sigmoid": sigmoid, "HardSigmoid": hard_sigmoid, "HardSwish": hard_swish,
    "Add": arithmetic, "Sub": arithmetic, "Mul": arithmetic, "Div": arithmetic,
    "MaxPool": max_pool, "AveragePool": average_pool, "GlobalAveragePool": average_pool,
    "GlobalMaxPool": global_max_pool, "ReduceMean": reduce_mean, "ReduceSum": reduce_mean, "Pad": pad,
    "Slice": slice_, "Concat": concat, "Split": split, "Flatten": reshape, "Reshape": reshape,
    "Squeeze": reshape, "Unsqueeze": reshape, "Transpose": transpose, "Identity": identity, "Dropout": identity,
    "Gemm": gemm, "MatMul": matmul, "Sqrt": elementwise, "Exp": elementwise, "Tanh": elementwise,
    "Erf": elementwise, "Pow": elementwise, "Softmax": softmax, "Cast": cast,
}

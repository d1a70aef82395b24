"""How a MatMul's features move through a transformer graph, for the pairs stage (``pairs.py``): on the last
axis, split into heads and merged again, and mixed across tokens by the attention."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Layer, constant_value, value_users


def consumer_problem(producer: Layer, consumer: Layer, tensor: gs.Tensor, axes: tuple[int, ...]) -> str | None:
    """Why ``consumer``, reached by ``tensor`` with the producer's channels on ``axes``, cannot compensate
    them; None if its input features are exactly the producer's channels."""
    node = consumer.node
    if node.inputs[0] is not tensor:
        return f"reaches {consumer.name} as its weight, not its data input"
    if node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("transA", 0)):
        return f"{node.op} {consumer.name} does not read the features on its input's last axis"
    if axes != (-1,) or producer.out_channels != consumer.in_channels:
        return (f"the producer's {producer.out_channels} channels are not the {consumer.in_channels} input "
                f"features of {consumer.name}")
    return None


FEATURE_OPS = ("Relu", "LeakyRelu", "PRelu", "Identity", "Dropout")
"""Elementwise ops with f(c x) = c f(x) for c >= 0 that a MatMul's features pass unchanged."""


def feature_step(node: gs.Node, tensor: gs.Tensor, axes: tuple[int, ...]) -> tuple[gs.Tensor, tuple[int, ...]] | str:
    """Pass a MatMul's output ``tensor`` through ``node``, its channels on ``axes`` (negative, major to minor:
    channel j is the row-major index over them), as transformers move them: split into heads and back by
    Reshape, moved by Transpose, and mixed across tokens, not channels, by the attention's MatMul (whose
    other operand does not depend on them). A reason string if the channels are lost. (Clip, ReLU6, is
    ``pairs.channel_step``'s.)"""
    op, label = node.op, f"{node.op} {node.name}"
    if op in ("Mul", "Div") and len(node.inputs) == 2:
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        if constant_value(other) is None or (op == "Div" and node.inputs[0] is not tensor):
            return f"{label} ends the chain (elementwise arithmetic with a tensor that is not a constant factor)"
        return node.outputs[0], axes
    if op in FEATURE_OPS:
        return (node.outputs[0], axes) if node.inputs[0] is tensor else f"reaches {label} on a parameter input"
    if op == "Reshape":
        moved = _reshaped_axes(tensor, node.outputs[0], axes)
        return (node.outputs[0], moved) if moved else f"{label} mixes the channels with other axes (or unknown shapes)"
    if op == "Transpose":
        rank = len(tensor.shape) if tensor.shape is not None else None
        perm = list(node.attrs.get("perm", range(rank - 1, -1, -1) if rank else []))
        if not perm:
            return f"{label} has an unknown rank"
        return node.outputs[0], tuple(perm.index(a % len(perm)) - len(perm) for a in axes)
    if op == "MatMul" and node.inputs[0] is tensor:
        return f"{label} multiplies the channels by a matrix that is not a weight (attention scores)"
    if op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is tensor:
        if -2 in axes:
            return f"{label} sums over the channels"
        return node.outputs[0], axes  # A @ B is linear in B's columns; A does not depend on B (single users)
    return f"{label} is not positively homogeneous or does not keep channels"


SMOOTH_OPS = ("Erf", "Tanh", "Sigmoid", "HardSigmoid", "Gelu", "HardSwish", "Mish", "Softplus")


def smooth_nonlinearity(tensor: gs.Tensor, layers: dict[str, Layer], depth: int = 3) -> gs.Node | None:
    """A smooth activation that exporters write around ``tensor`` itself, which it therefore feeds twice (GELU
    as x * 0.5 * (1 + Erf(x / sqrt 2)), SiLU as x * Sigmoid(x)): within ``depth`` nodes, not past a weighted
    layer; else None."""
    if len(value_users(tensor)) < 2:
        return None
    frontier = [tensor]
    for _ in range(depth):
        nodes = [node for t in frontier for node in value_users(t) if node.name not in layers]
        found = next((node for node in nodes if node.op in SMOOTH_OPS), None)
        if found is not None:
            return found
        frontier = [out for node in nodes for out in node.outputs]
    return None


def _reshaped_axes(source: gs.Tensor, target: gs.Tensor, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The channel axes after a Reshape of ``source`` to ``target``: the trailing block of dims that holds the
    channels, in order, re-factored into another trailing block of the same size, the dims before it kept."""
    before, after = source.shape, target.shape
    if before is None or after is None or axes != tuple(range(-len(axes), 0)) or len(axes) > len(before):
        return None
    tail = before[-len(axes):]
    if any(not isinstance(d, (int, np.integer)) for d in tail):
        return None
    size, product = int(np.prod(tail)), 1
    for m in range(1, len(after) + 1):
        d = after[-m]
        if not isinstance(d, (int, np.integer)) or d <= 0:
            return None
        product *= int(d)
        if product == size:
            lead_before, lead_after = list(before[:-len(axes)]), list(after[:-m])
            return tuple(range(-m, 0)) if lead_before == lead_after else None
        if product > size:
            return None
    return None

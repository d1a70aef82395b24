"""The pairs stage: producer/consumer pairs (spec section 1, the paper's Fig. 2), and why every other
candidate was refused.

A pair is a producer P (quantized to LOW bits) and a consumer C (HIGH bits)
such that C's input channel ``offset + j`` (or feature block ``j`` after a
Flatten) is exactly P's output channel j passed through operations that
commute with a positive per-channel scale:

    P -> [f positively homogeneous] -> [channel-preserving ops] -> C

Every tensor on the way must have a single consumer, otherwise the scaled
channel would leak into a branch that does not compensate it (a residual Add).
A MatMul's features (on the last axis, through a transformer's heads and
attention) are followed by ``features.feature_step``.

Assignment: producers are visited in topological order and each takes its
consumer when neither is in a pair yet. This gives the paper's Fig. 2: basic
block conv1 low / conv2 high; bottleneck 1x1 low / 3x3 high (the 3x3 is
then taken, so the last 1x1 stays unpaired); dense layer 1x1 low / 3x3 high;
plain chains alternate low, high, low, high.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .features import consumer_problem, feature_step, smooth_nonlinearity
from .graph import Layer, constant_value, value_users

# Ops with f(c x) = c f(x) for c >= 0, applied channel by channel.
HOMOGENEOUS_OPS = ("Relu", "LeakyRelu", "PRelu", "Identity", "Dropout",
                   "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


@dataclass(frozen=True)
class Pair:
    """P's output channel j feeds C's input features ``offset + j*block ... offset + (j+1)*block - 1``."""

    producer: str
    consumer: str
    offset: int
    block: int
    path: tuple[str, ...]
    """Op types between producer and consumer."""


@dataclass(frozen=True)
class Refusal:
    """A producer candidate that was not paired, and why."""

    producer: str
    consumer: str | None
    reason: str


@dataclass(frozen=True)
class PairSearch:
    pairs: tuple[Pair, ...]
    refusals: tuple[Refusal, ...]

    def roles(self, layer_names: list[str]) -> dict[str, tuple[str, str | None]]:
        """(role, partner) for every layer: producers ``low``, consumers ``high``, the rest ``unpaired``.

        A consumer fed by several producers through a Concat names them all, comma-separated.
        """
        roles: dict[str, tuple[str, str | None]] = {name: ("unpaired", None) for name in layer_names}
        for pair in self.pairs:
            roles[pair.producer] = ("low", pair.consumer)
            earlier = roles[pair.consumer][1] if roles[pair.consumer][0] == "high" else None
            roles[pair.consumer] = ("high", f"{earlier}, {pair.producer}" if earlier else pair.producer)
        return roles


def kept_out_of_pairs(layer_names: list[str], keep_first: bool, keep_last: bool) -> dict[str, str]:
    """The layers ``--keep-first`` and ``--keep-last`` keep out of pairs, and why."""
    fixed: dict[str, str] = {}
    if layer_names and keep_first:
        fixed[layer_names[0]] = "first layer kept out of pairs at HIGH bits (--keep-first)"
    if layer_names and keep_last:
        fixed[layer_names[-1]] = "last layer kept out of pairs at HIGH bits (--keep-last)"
    return fixed


def find_pairs(graph: gs.Graph, layers: dict[str, Layer], fixed: dict[str, str], relu6: str = "refuse") -> PairSearch:
    """Pair the layers of ``graph`` (``layers`` in topological order).

    ``fixed`` maps layer names that may not join any pair (first layer,
    last layer, excluded) to the reason, which is reported. ``relu6``
    "pair" lets a chain pass Clip(0, hi) (ReLU6): not positively homogeneous,
    but exact when c is applied on the producer, where the clip sees the
    compensated output; "refuse" (default) ends the chain there.
    """
    graph_outputs = {t.name for t in graph.outputs}
    producers: dict[str, str] = {}  # producer -> its consumer
    slices: dict[str, list[tuple[int, int, str]]] = {}  # consumer -> (first, end, producer) input features
    pairs: list[Pair] = []
    refusals: list[Refusal] = []
    for name, layer in layers.items():
        if name in slices:
            continue  # a consumer stays high-bit: it compensates its producers
        if name in fixed:
            refusals.append(Refusal(name, None, fixed[name]))
            continue
        link = trace_consumer(layer, layers, graph_outputs, relu6)
        if isinstance(link, Refusal):
            refusals.append(link)
            continue
        first, end = link.offset, link.offset + layer.out_channels * link.block
        clash = next((p for a, b, p in slices.get(link.consumer, []) if a < end and first < b), None)
        if link.consumer in fixed:
            refusals.append(Refusal(name, link.consumer, f"consumer {link.consumer}: {fixed[link.consumer]}"))
        elif link.consumer in producers:
            refusals.append(Refusal(name, link.consumer, f"consumer {link.consumer} is already the producer of "
                                                         f"the pair with {producers[link.consumer]}"))
        elif clash is not None:
            refusals.append(Refusal(name, link.consumer, f"consumer {link.consumer} already compensates these "
                                                         f"input channels for {clash}"))
        else:
            # Producers reaching disjoint slices of one consumer (Concat) all pair with it.
            pairs.append(link)
            producers[name] = link.consumer
            slices.setdefault(link.consumer, []).append((first, end, name))
    return PairSearch(pairs=tuple(pairs), refusals=tuple(refusals))


def trace_consumer(producer: Layer, layers: dict[str, Layer], graph_outputs: set[str],
                   relu6: str = "refuse") -> Pair | Refusal:
    """Follow P's output forward to the weighted layer that consumes it, or say why not."""
    name = producer.name
    if producer.op == "Gemm" and (producer.node.attrs.get("alpha", 1.0) != 1.0 or producer.node.attrs.get("beta", 1.0) != 1.0):
        return Refusal(name, None, "Gemm with alpha or beta != 1 is not paired as a producer")
    if producer.node.outputs[0].name in graph_outputs:  # before a MatMul's bias Add
        return Refusal(name, None, f"'{producer.node.outputs[0].name}' is a graph output")
    tensor = producer.output
    offset, block, axes = 0, 1, (-1,)
    path: list[str] = []
    while True:
        if tensor.name in graph_outputs:
            return Refusal(name, None, f"'{tensor.name}' is a graph output")
        users = value_users(tensor)
        smooth = smooth_nonlinearity(tensor, layers)
        if smooth is not None:
            return Refusal(name, None, f"{smooth.op} {smooth.name} (GELU, SiLU or similar) is not positively "
                                       f"homogeneous (after {name})")
        if len(users) != 1:
            uses = ", ".join(f"{n.op} {n.name}" for n in users) or "nothing"
            return Refusal(name, None, f"'{tensor.name}' feeds {len(users)} nodes ({uses}); a rescaled channel would leak")
        node = users[0]
        if node.name in layers and producer.op == "MatMul":
            problem = consumer_problem(producer, layers[node.name], tensor, axes)
            return Refusal(name, node.name, problem) if problem else Pair(name, node.name, 0, 1, tuple(path))
        if node.name in layers:
            return _as_consumer(producer, layers[node.name], tensor, offset, block, tuple(path))
        features = producer.op == "MatMul" and node.op != "Clip"  # Clip (ReLU6) is channel_step's either way
        step = feature_step(node, tensor, axes) if features else channel_step(node, tensor, offset, block, relu6)
        if isinstance(step, str):
            return Refusal(name, None, f"{step} (after {name})")
        if features:
            tensor, axes = step
        else:
            tensor, offset, block = step
        path.append(node.op)


def _as_consumer(producer: Layer, consumer: Layer, tensor: gs.Tensor, offset: int, block: int,
                 path: tuple[str, ...]) -> Pair | Refusal:
    node = consumer.node
    if node.inputs[0] is not tensor:
        return Refusal(producer.name, consumer.name, f"reaches {consumer.name} as its weight, not its data input")
    if node.op == "Conv" and block != 1:
        return Refusal(producer.name, consumer.name, "a Conv consumer after a Flatten")
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return Refusal(producer.name, consumer.name, "Gemm consumer with transA=1")
    if offset + producer.out_channels * block > consumer.in_channels:
        return Refusal(producer.name, consumer.name, "channel count does not match the consumer's input")
    return Pair(producer.name, consumer.name, offset, block, path)


def channel_step(node: gs.Node, tensor: gs.Tensor, offset: int, block: int,
                 relu6: str = "refuse") -> tuple[gs.Tensor, int, int] | str:
    """Pass ``tensor`` through ``node`` keeping track of where P's channels are; a reason string if they are lost."""
    op = node.op
    label = f"{op} {node.name}"
    if op == "Clip":
        if relu6 != "pair":
            return f"Relu6/{label} is not positively homogeneous (--relu6 pair passes it)"
        if not is_relu6(node):
            return f"{label} is not a constant Clip(0, max)"
        return node.outputs[0], offset, block
    if op == "BatchNormalization":
        return f"{label} (not folded) adds a per-channel shift, which is not positively homogeneous"
    if op in ("Add", "Sub", "Mul", "Div", "Sum"):
        return f"{label} ends the chain (residual or elementwise arithmetic)"
    if op not in HOMOGENEOUS_OPS + ("Pad", "Flatten", "Reshape", "Concat"):
        return f"{label} is not positively homogeneous or does not keep channels"
    if op != "Concat" and node.inputs[0] is not tensor:
        return f"reaches {label} on a parameter input"
    if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
        return f"{label} has its mask output used"
    if op == "Pad":
        reason = _pad_keeps_channels(node)
        if reason:
            return f"{label} {reason}"
    if op in ("Flatten", "Reshape"):
        spatial = _flattened_block(node, tensor)
        if spatial is None:
            return f"{label} does not flatten (N, C, ...) to (N, C*...) with known shapes"
        offset, block = offset * spatial, block * spatial
    if op == "Concat":
        shifted = _concat_offset(node, tensor)
        if shifted is None:
            return f"{label} is not along channels, repeats the input, or has unknown shapes"
        offset += shifted
    return node.outputs[0], offset, block


def is_relu6(node: gs.Node) -> bool:
    """Whether ``node`` is a Clip(0, max) with constant, finite max."""
    bounds = clip_bounds(node) if node.op == "Clip" else None
    return bounds is not None and bounds[0] == 0.0 and bool(np.isfinite(bounds[1]))


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip node from its attributes (opset < 11) or constant inputs; None if not constant."""
    if len(node.inputs) <= 1:
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    values = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        if len(node.inputs) > index and node.inputs[index].name:
            value = constant_value(node.inputs[index])
            if value is None or np.asarray(value).size != 1:
                return None
            values.append(float(np.asarray(value).reshape(-1)[0]))
        else:
            values.append(default)
    return values[0], values[1]


def _pad_keeps_channels(node: gs.Node) -> str | None:
    if node.attrs.get("mode", "constant") != "constant":
        return f"uses mode '{node.attrs['mode']}'"
    if "pads" in node.attrs:
        pads = np.asarray(node.attrs["pads"])
        value = float(node.attrs.get("value", 0.0))
    else:
        pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        value_t = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(1)
        if pads is None or value_t is None or (len(node.inputs) > 3 and node.inputs[3].name):
            return "has pads that are not constant (or axes)"
        value = float(np.asarray(value_t).reshape(-1)[0]) if np.asarray(value_t).size else 0.0
    if value != 0.0:
        return f"pads with the non-zero value {value}"
    rank = len(pads) // 2
    if rank < 2 or pads[1] != 0 or pads[rank + 1] != 0:
        return "pads the channel axis"
    return None


def _static_shape(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape[1:]):
        return None
    return [int(d) if isinstance(d, (int, np.integer)) else -1 for d in shape]


def _flattened_block(node: gs.Node, tensor: gs.Tensor) -> int | None:
    """Features per channel after a Flatten/Reshape that maps (N, C, ...) to (N, C*...)."""
    in_shape, out_shape = _static_shape(tensor), _static_shape(node.outputs[0])
    if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) != 2:
        return None
    if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
        return None
    if out_shape[1] != int(np.prod(in_shape[1:])):
        return None
    return int(np.prod(in_shape[2:]))


def _concat_offset(node: gs.Node, tensor: gs.Tensor) -> int | None:
    """Channels that come before ``tensor`` in a channel Concat."""
    if sum(t is tensor for t in node.inputs) != 1:
        return None
    out_shape = node.outputs[0].shape
    axis = int(node.attrs.get("axis", 1))
    if out_shape is None or axis not in (1, 1 - len(out_shape)):
        return None
    offset = 0
    for t in node.inputs:
        if t is tensor:
            return offset
        shape = t.shape
        if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
            return None
        offset += int(shape[1])
    return None

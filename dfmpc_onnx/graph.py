"""The small typed model of the graph that every stage shares.

The graph itself is an onnx-graphsurgeon ``gs.Graph``; on top of it a
``Layer`` names one weighted node (Conv, Gemm or MatMul) whose weight is a
constant, with the weight laid out as in the graph and the axis of that
weight that indexes output channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    """A weighted node with a constant float weight.

    ``weight`` is in the graph's layout; ``out_axis`` is the weight axis of
    the output channels (0 for Conv, 0 or 1 for Gemm by ``transB``, 1 for
    MatMul); ``bias`` has one entry per output channel, or is None.
    """

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    out_axis: int
    bias_node: gs.Node | None = None
    """The Add that holds a MatMul's bias (a constant per output channel), which the layer owns."""

    @property
    def output(self) -> gs.Tensor:
        """The layer's output: after the bias Add of a MatMul that has one."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[self.out_axis])

    @property
    def group(self) -> int | None:
        """A Conv's number of groups (its weight's axis 1 holds one group's input channels); None otherwise."""
        return int(self.node.attrs.get("group", 1)) if self.op == "Conv" else None

    @property
    def taps(self) -> int:
        """Spatial taps of one kernel of a Conv (1 for 1x1 convs, Gemm and MatMul): the run of consecutive
        weights of a row (``to_rows``) that one input channel contributes."""
        return int(np.prod(self.weight.shape[2:])) if self.op == "Conv" else 1

    @property
    def in_channels(self) -> int:
        """Input channels of a Conv (all groups), input features of a Gemm or MatMul."""
        if self.group is not None:
            return int(self.weight.shape[1]) * self.group
        return int(self.weight.shape[1 - self.out_axis])


def import_graph(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None) -> gs.Graph:
    """Import into graphsurgeon, sorted topologically, every node with a unique name.

    ``weights`` gives the values of initializers that ``model`` holds
    without data (see ``load.load_split``).
    """
    graph = gs.import_onnx(model)
    if weights:
        tensors = graph.tensors()
        for name, values in weights.items():
            if isinstance(tensors.get(name), gs.Constant):
                tensors[name].values = values
    graph.toposort()
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)
    return graph


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None if not constant."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def find_layers(graph: gs.Graph, exclude: tuple[str, ...] | list[str] = ()) -> tuple[dict[str, Layer], dict[str, str]]:
    """Every weighted node, in topological order: quantizable ``Layer``s, and why the rest stay float
    (``exclude``: names the user keeps in float; each must name a weighted node)."""
    layers: dict[str, Layer] = {}
    left_float: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
            continue
        layer_or_reason = _as_layer(node)
        if isinstance(layer_or_reason, Layer):
            layers[node.name] = layer_or_reason
        else:
            left_float[node.name] = layer_or_reason
    unknown = [name for name in exclude if name not in layers and name not in left_float]
    if unknown:
        raise InputError(f"--exclude: no Conv, Gemm or MatMul named {', '.join(repr(n) for n in unknown)}")
    for name in exclude:
        if name in layers:
            left_float[name] = "excluded (--exclude)"
            del layers[name]
    return layers, left_float


def _as_layer(node: gs.Node) -> Layer | str:
    weight = constant_value(node.inputs[1])
    if weight is None:
        return f"weight '{node.inputs[1].name}' is not a constant"
    if weight.dtype != np.float32:
        return f"weight dtype {weight.dtype} is not float32"
    if node.op == "Conv":
        if weight.ndim < 3:
            return f"Conv weight has rank {weight.ndim}"
        out_axis = 0
    elif node.op == "Gemm":
        if weight.ndim != 2:
            return f"Gemm weight has rank {weight.ndim}"
        out_axis = 0 if node.attrs.get("transB", 0) else 1
    else:
        if weight.ndim != 2:
            return "MatMul weight is not a 2-D matrix"
        bias_node, bias = matmul_bias(node, weight.shape[1])
        return Layer(node=node, weight=weight, bias=bias, out_axis=1, bias_node=bias_node)
    out_channels = weight.shape[out_axis]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        if bias is None:
            return f"bias '{node.inputs[2].name}' is not a constant"
        if node.op == "Gemm" and bias.size not in (1, out_channels):
            return f"Gemm bias of shape {list(bias.shape)} is not per output channel"
        bias = np.broadcast_to(bias.reshape(-1), (out_channels,)).astype(np.float32)
    return Layer(node=node, weight=weight, bias=bias, out_axis=out_axis)


VALUE_FREE_OPS = ("Shape", "Size")
"""Ops that read only their input's shape: a rescaled channel does not reach them."""


def value_users(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``tensor``'s values (not only its shape)."""
    return [node for node in tensor.outputs if node.op not in VALUE_FREE_OPS]


def matmul_bias(node: gs.Node, out_channels: int) -> tuple[gs.Node | None, np.ndarray | None]:
    """The Add that exporters put after a MatMul for its bias, and the bias: the MatMul's only value user,
    adding a float32 constant with one value per output channel along the last axis; else (None, None)."""
    users = value_users(node.outputs[0])
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2:
        return None, None
    add = users[0]
    value = constant_value(add.inputs[bias_operand(add, node)])
    if value is None or value.dtype != np.float32 or value.size != out_channels or value.shape[-1:] != (out_channels,):
        return None, None
    return add, value.reshape(-1).astype(np.float32)


def bias_operand(add: gs.Node, node: gs.Node) -> int:
    """Which input of ``node``'s bias Add (``matmul_bias``) holds the bias: the one that is not ``node``'s output.
    By name, so that it also holds in a copy of the graph."""
    return 1 if add.inputs[0].name == node.outputs[0].name else 0


def to_rows(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """The weight as an (output channels, everything else) matrix: row j is W_j."""
    moved = np.moveaxis(weight, out_axis, 0)
    return np.ascontiguousarray(moved.reshape(moved.shape[0], -1))


def from_rows(rows: np.ndarray, shape: tuple[int, ...], out_axis: int) -> np.ndarray:
    """Inverse of ``to_rows``."""
    moved_shape = (shape[out_axis],) + tuple(s for i, s in enumerate(shape) if i != out_axis)
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved_shape), 0, out_axis))


class NameSource:
    """Fresh tensor and node names for one rewriting pass over ``graph``.

    The graph's names (of tensors and of nodes: exporters often name a node's
    output after the node) are read once and every name handed out is
    remembered, so a pass that adds n tensors costs O(n), not O(n) per name.
    """

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {node.name for node in graph.nodes}

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first name not yet used."""
        name, index = base, 1
        while name in self.taken:
            name = f"{base}_{index}"
            index += 1
        self.taken.add(name)
        return name


def replace_list(tensors: list, new: list) -> None:
    """Replace a node's inputs or outputs in place, keeping graphsurgeon's links in step."""
    new = list(new)
    tensors.clear()
    tensors.extend(new)


def with_weight_inputs(graph: gs.Graph, layers: dict[str, Layer],
                       output_names: list[str]) -> tuple[gs.Graph, dict[str, tuple[str, str | None]]]:
    """A copy of ``graph`` whose ``layers`` read weight and bias from graph inputs NAME::weight and
    NAME::bias (Conv, Gemm, and a MatMul's bias Add), and whose outputs are ``output_names``: one graph that computes any
    assignment of weights (``weight_feed``)."""
    copy = with_outputs(graph, output_names)
    nodes = {node.name: node for node in copy.nodes}
    names: dict[str, tuple[str, str | None]] = {}
    for name, layer in layers.items():
        node = nodes[name]
        weight = gs.Variable(f"{name}::weight", dtype=np.float32, shape=list(layer.weight.shape))
        node.inputs[1] = weight
        copy.inputs.append(weight)
        bias_name = None
        if node.op in ("Conv", "Gemm") or layer.bias_node is not None:
            bias = gs.Variable(f"{name}::bias", dtype=np.float32, shape=[layer.out_channels])
            if layer.bias_node is not None:  # the MatMul's bias Add: its constant operand
                add = nodes[layer.bias_node.name]
                add.inputs[bias_operand(add, node)] = bias
            elif len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            copy.inputs.append(bias)
            bias_name = bias.name
        names[name] = (weight.name, bias_name)
    return copy, names


def weight_feed(weight_inputs: dict[str, tuple[str, str | None]], layers: dict[str, Layer],
                weights: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """The inputs of ``with_weight_inputs`` (``weight_inputs``: layer -> input names) for the layers in
    ``weights`` (layer -> weight in the graph's layout, bias; a missing bias is zero)."""
    feed = {}
    for name, (weight, bias) in weights.items():
        weight_name, bias_name = weight_inputs[name]
        feed[weight_name] = np.asarray(weight, dtype=np.float32)
        if bias_name is not None:
            feed[bias_name] = (np.zeros(layers[name].out_channels, np.float32) if bias is None
                               else np.asarray(bias, dtype=np.float32))
    return feed


def with_outputs(graph: gs.Graph, names: list[str]) -> gs.Graph:
    """A copy of ``graph`` whose outputs are the tensors ``names``."""
    copy = graph.copy()
    tensors = copy.tensors()
    copy.outputs = [tensors[name] for name in names]
    return copy


def batch_chunk(graph: gs.Graph, dynamic: int = 32) -> int:
    """How many synthetic inputs one onnxruntime run of ``graph`` takes: its static batch dim, else ``dynamic``."""
    first = graph.inputs[0].shape[0] if graph.inputs[0].shape else None
    return int(first) if isinstance(first, (int, np.integer)) and first > 0 else dynamic

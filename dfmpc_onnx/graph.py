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

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[self.out_axis])


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


def find_layers(graph: gs.Graph) -> tuple[dict[str, Layer], dict[str, str]]:
    """Every weighted node, in topological order: quantizable ``Layer``s, and why the rest stay float."""
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
        out_axis = 1
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


def to_rows(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """The weight as an (output channels, everything else) matrix: row j is W_j."""
    moved = np.moveaxis(weight, out_axis, 0)
    return np.ascontiguousarray(moved.reshape(moved.shape[0], -1))


def from_rows(rows: np.ndarray, shape: tuple[int, ...], out_axis: int) -> np.ndarray:
    """Inverse of ``to_rows``."""
    moved_shape = (shape[out_axis],) + tuple(s for i, s in enumerate(shape) if i != out_axis)
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved_shape), 0, out_axis))


class NameSource:
    """Fresh tensor names for one rewriting pass over ``graph``.

    The graph's names are read once and every name handed out is remembered,
    so a pass that adds n tensors costs O(n), not O(n) per name.
    """

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors())

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

"""A graph cut after each of a list of convs, run segment by segment on chunks of inputs (``Segments``):
what statistics matching runs the float and the quantized model through, side by side, once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer, with_weight_inputs
from .errors import InternalError
from .runtime import graph_session, own_graph, with_header_of


class Segments:
    """``graph`` cut after each node named in ``cuts`` (a layer's node, or the bias Add of a MatMul), in
    topological order (``self.cuts``): segment k runs the nodes from just after cut k-1 to cut k, reading
    the graph input, the tensors earlier segments left, and the quantized layers' weights and biases (as
    inputs), and leaving every tensor a later segment reads."""

    def __init__(self, graph: gs.Graph, layers: dict[str, Layer], cuts: list[str], extra: set[str],
                 like: onnx.ModelProto):
        probe, self.weight_inputs = with_weight_inputs(graph, layers, [t.name for t in graph.outputs])
        probe.toposort()
        model = with_types(with_header_of(gs.export_onnx(probe, do_type_check=False), like))
        self.input_name = graph.inputs[0].name
        # Constant nodes go into every segment that reads them, as initializers do: passed from an earlier
        # segment as inputs, their values would be unknown to onnxruntime's inference and folding
        constants = {o: node for node in model.graph.node if node.op_type == "Constant" for o in node.output}
        nodes = [node for node in model.graph.node if node.op_type != "Constant"]
        position = {node.name: i for i, node in enumerate(nodes)}
        positions = sorted(position[name] for name in cuts)
        self.cuts = [nodes[c].name for c in positions]
        initializers = {t.name: t for t in model.graph.initializer}
        types = {v.name: v.type for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
        weight_names = {n for pair in self.weight_inputs.values() for n in pair if n}
        bounds = list(zip([0] + [c + 1 for c in positions[:-1]], [c + 1 for c in positions]))
        reads = [set().union(*(_node_reads(n) for n in nodes[a:b])) for a, b in bounds]
        writes = [{o for n in nodes[a:b] for o in n.output if o} for a, b in bounds]
        self.sessions, self.inputs, self.outputs = [], [], []
        self.layers: list[list[str]] = []  # the quantized layers whose weights segment k reads
        self.last_used_by: list[set[str]] = [set() for _ in bounds]
        for k, (a, b) in enumerate(bounds):
            later = set().union(*reads[k + 1:]) if k + 1 < len(reads) else set()
            outputs = sorted(name for name in writes[k] if name in later or name in extra)
            outputs.append(nodes[b - 1].output[0])
            data_inputs = sorted(name for name in reads[k] - writes[k]
                                 if name not in initializers and name not in weight_names and name not in constants)
            weights = sorted(name for name in reads[k] if name in weight_names)
            self.layers.append([layer for layer, pair in self.weight_inputs.items() if set(pair) & reads[k]])
            segment = onnx.helper.make_graph(
                [constants[name] for name in sorted(reads[k]) if name in constants] + nodes[a:b], f"segment{k}",
                [_value_info(name, types) for name in data_inputs + weights],
                [_value_info(name, types) for name in dict.fromkeys(outputs)],
                [initializers[name] for name in sorted(reads[k]) if name in initializers])
            self.sessions.append(graph_session(onnx.helper.make_model(segment), like, "statistics matching"))
            self.inputs.append((data_inputs, weights))
            self.outputs.append(list(dict.fromkeys(outputs)))
        last_use = {}
        for k, names in enumerate(reads):
            for name in names:
                last_use[name] = k
        for name, k in last_use.items():
            if name != self.input_name:
                self.last_used_by[k].add(name)

    def run(self, index: int, values: dict[str, list[np.ndarray]],
            weights: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
        """Segment ``index`` on ``values`` (name -> one array per chunk of inputs): the tensors it leaves,
        per chunk (a tensor such as a Reshape's shape may depend on the chunk's size)."""
        data_inputs, weight_inputs = self.inputs[index]
        feed_weights = {name: weights[name] for name in weight_inputs}
        with own_graph("statistics matching"):
            parts = [self.sessions[index].run(self.outputs[index], {
                **{name: values[name][c] for name in data_inputs}, **feed_weights})
                for c in range(len(values[self.input_name]))]
        return {name: [part[i] for part in parts] for i, name in enumerate(self.outputs[index])}


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensor names a node reads, including those its subgraphs read from the enclosing graph."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | {
                t.name for t in sub.initializer}
            names |= {name for n in sub.node for name in _node_reads(n) if name not in inner}
    return names


def with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the element type of every tensor that crosses a cut: shape inference, and the types
    of Constant nodes' values (inference leaves a tensor that only Constant makes untyped at some opsets)."""
    model = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]
             if v.type.tensor_type.elem_type}
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None) if node.op_type == "Constant" else None
        if value is not None and node.output[0] not in known:
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(node.output[0], value.data_type, None))
    return model


def _value_info(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A value info with the tensor's element type and what inference knows of its shape that holds for every
    chunk size: the rank of a float tensor (its dims may follow the batch), the whole shape of an integer
    one (shapes, indices). Without them onnxruntime's inference takes a Resize's sizes computed from the
    tensor's Shape for an empty tensor and refuses the graph (a ViT's position embedding)."""
    tensor = types[name].tensor_type if name in types else None
    if tensor is None or not tensor.elem_type:
        raise InternalError(f"statistics matching: the type of tensor '{name}' is unknown")
    shape = None
    if tensor.HasField("shape"):
        floating = tensor.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        shape = [None if floating or not d.HasField("dim_value") else d.dim_value for d in tensor.shape.dim]
    return onnx.helper.make_tensor_value_info(name, tensor.elem_type, shape)

"""Reverse-mode gradients as an ONNX graph: one model that onnxruntime runs to return a loss of the
input and its gradient with respect to the input (for ``distill.py``; no PyTorch).

``gradient_model`` takes a forward model whose shapes are all static (``prepare_forward``), keeps the
nodes the loss reads, and appends, in reverse topological order, each node's vector-Jacobian product
(the rules in ``gradient_rules.py``): for a node y = f(x, constants) and the gradient dL/dy, the nodes
that compute dL/dx. Gradients reaching a tensor along several paths are summed. Only tensors that depend
on the input get gradients; weights are constants.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, version_converter

from .errors import InputError, first_line
from .load import default_opset
from .runtime import graph_session, own_graph

GRADIENT_OPSET = 17
"""The lowest opset the gradient graph is built at (ScatterElements with reduction, ReduceSum with axes
as an input); an older forward model is converted to it first."""


class Builder:
    """The nodes and constants a gradient graph adds to its forward graph, with the forward graph's static
    shapes and constant values to read from."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], constants: dict[str, np.ndarray]):
        self.shapes, self.constants = shapes, constants
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"grad{self.count}/{base}"

    def const(self, value, dtype=np.float32) -> str:
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), np.int64)

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        """Emit ``op_type`` on ``inputs``; its output name (a list of names when ``outputs`` > 1)."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def mask(self, condition: str) -> str:
        """A boolean tensor as 1.0 / 0.0: multiplying by it is much faster in onnxruntime than Where."""
        return self.op("Cast", [condition], to=onnx.TensorProto.FLOAT)

    def reshape(self, tensor: str, shape) -> str:
        return self.op("Reshape", [tensor, self.ints(shape)])

    def reduce_sum(self, tensor: str, axes: list[int], keepdims: int = 1) -> str:
        return self.op("ReduceSum", [tensor, self.ints(axes)], keepdims=keepdims)

    def unbroadcast(self, gradient: str, output_shape: tuple[int, ...], shape: tuple[int, ...]) -> str:
        """A gradient of ``output_shape`` summed over the axes along which an operand of ``shape`` was
        broadcast, and given the operand's shape."""
        lead = len(output_shape) - len(shape)
        padded = (1,) * lead + tuple(shape)
        axes = [axis for axis, (o, s) in enumerate(zip(output_shape, padded)) if s == 1 and o != 1] + list(range(lead))
        if axes:
            gradient = self.reduce_sum(gradient, sorted(set(axes)))
        return self.reshape(gradient, shape) if tuple(output_shape) != tuple(shape) else gradient


Rule = Callable[[Builder, onnx.NodeProto, list], list]


def static_shape(b: Builder, name: str) -> tuple[int, ...]:
    """The static shape of tensor ``name`` of the forward graph."""
    if name not in b.shapes:
        raise InputError(f"distillation needs static shapes, and '{name}' has none")
    return b.shapes[name]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def prepare_forward(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (its input shape already static) at opset ``GRADIENT_OPSET`` or above, with every tensor
    that depends only on constants folded, every MaxPool giving its Indices, and static shapes inferred
    for every tensor."""
    if default_opset(model) < GRADIENT_OPSET:
        try:
            model = version_converter.convert_version(model, GRADIENT_OPSET)
        except Exception as err:  # the converter raises several unrelated types
            raise InputError(f"the model cannot be converted to opset {GRADIENT_OPSET} ({first_line(err)})") from None
    graph = gs.import_onnx(model)
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]  # IR 3 lists initializers as inputs
    graph = fold_constant_subgraphs(graph)
    for node in graph.nodes:
        if node.op == "MaxPool" and len(node.outputs) == 1:
            node.outputs.append(gs.Variable(node.outputs[0].name + "::indices", dtype=np.int64))
    folded = gs.export_onnx(graph, do_type_check=False)
    folded.ir_version = max(folded.ir_version, helper.find_min_ir_version_for(list(folded.opset_import), True))
    del folded.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(folded, strict_mode=False, data_prop=True)


def fold_constant_subgraphs(graph: gs.Graph) -> gs.Graph:
    """Replace every tensor computed from constants alone, or from static shapes, by its value
    (evaluated in onnxruntime)."""
    graph.toposort()
    for node in graph.nodes:
        if node.op == "Shape" and _static(node.inputs[0].shape):
            shape = node.inputs[0].shape
            start, end = node.attrs.get("start", 0), node.attrs.get("end", len(shape))
            node.outputs[0].to_constant(np.array(shape[start:end], dtype=np.int64))
            node.outputs.clear()
    graph.cleanup().toposort()
    constant_names: set[str] = set()
    foldable: list[gs.Node] = []
    for node in graph.nodes:
        if node.op == "Constant" or all(isinstance(t, gs.Constant) or t.name in constant_names or not t.name
                                        for t in node.inputs):
            foldable.append(node)
            constant_names.update(t.name for t in node.outputs)
    wanted = [t for node in foldable for t in node.outputs
              if any(consumer not in foldable for consumer in t.outputs) or t in graph.outputs]
    if not wanted:
        return graph
    sub = gs.Graph(nodes=foldable, inputs=[], outputs=wanted, opset=graph.opset)
    model = gs.export_onnx(sub.copy(), do_type_check=False)
    session = graph_session(model, model, "constant folding")
    with own_graph("constant folding"):
        values = session.run([t.name for t in wanted], {})
    for tensor, value in zip(wanted, values):
        tensor.to_constant(np.asarray(value))
    for node in foldable:
        node.outputs.clear()
    graph.cleanup().toposort()
    return graph


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The static shape of every tensor of ``model`` that has one."""
    shapes = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def needed_nodes(nodes: list[onnx.NodeProto], targets: set[str]) -> list[onnx.NodeProto]:
    """The nodes that ``targets`` depend on, in their order."""
    wanted, kept = set(targets), []
    for node in reversed(nodes):
        if any(o in wanted for o in node.output):
            kept.append(node)
            wanted.update(i for i in node.input if i)
    return kept[::-1]


def backward(builder: Builder, nodes: list[onnx.NodeProto], seeds: dict[str, list[str]], source: str,
             rules: dict[str, Rule]) -> str:
    """The gradient of the loss with respect to ``source``: ``seeds`` gives the loss's own gradient
    terms per tensor; every node between ``source`` and them is differentiated by its rule."""
    varying = {source}
    for node in nodes:
        if any(i in varying for i in node.input):
            varying.update(node.output)
    pending = {name: list(terms) for name, terms in seeds.items()}
    for node in reversed(nodes):
        outputs = [_total(builder, pending.pop(o, [])) for o in node.output]
        if not any(outputs) or not any(i in varying for i in node.input):
            continue
        if node.op_type not in rules:
            raise InputError(f"distillation does not support the op {node.op_type} ({node.name})")
        for name, gradient in zip(node.input, rules[node.op_type](builder, node, outputs)):
            if gradient is not None and name in varying:
                pending.setdefault(name, []).append(gradient)
    gradient = _total(builder, pending.pop(source, []))
    if gradient is None:
        raise InputError("the loss does not depend on the model's input")
    return gradient


def _total(builder: Builder, terms: list[str]) -> str | None:
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else builder.op("Sum", terms)


def gradient_model(forward: onnx.ModelProto, loss: Callable[[Builder, onnx.GraphProto], tuple[str, dict]],
                   extra_inputs: list[onnx.ValueInfoProto], rules: dict[str, Rule]) -> onnx.ModelProto:
    """The model that returns ("loss", "gradient") for ``forward``'s one input (and ``extra_inputs``).

    ``loss(builder, graph)`` emits the loss's nodes and returns its scalar tensor and, per forward tensor
    it reads, the loss's gradient with respect to that tensor."""
    graph = forward.graph
    builder = Builder(static_shapes(forward), {t.name: numpy_helper.to_array(t) for t in graph.initializer})
    source = graph.input[0].name
    loss_name, seeds = loss(builder, graph)
    loss_nodes = builder.nodes
    builder.nodes = []
    forward_nodes = needed_nodes(list(graph.node), set(seeds))
    gradient = backward(builder, forward_nodes, {name: [g] for name, g in seeds.items()}, source, rules)
    nodes = forward_nodes + loss_nodes + builder.nodes + [helper.make_node("Identity", [loss_name], ["loss"]),
                                                          helper.make_node("Identity", [gradient], ["gradient"])]
    used = {i for node in nodes for i in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + builder.initializers
    outputs = [helper.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, []),
               helper.make_tensor_value_info("gradient", onnx.TensorProto.FLOAT, builder.shapes[source])]
    result = helper.make_graph(nodes, "gradient", [graph.input[0], *extra_inputs], outputs, initializers)
    model = helper.make_model(result, opset_imports=list(forward.opset_import))
    model.ir_version = forward.ir_version
    return model

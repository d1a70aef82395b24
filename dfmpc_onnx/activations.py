"""The activation stage (``--activations B``): QuantizeLinear/DequantizeLinear on the input and output of
every quantized layer, and around the residual Adds, Concats and pools between them, each range calibrated
on the synthetic inputs, data-free.

Where the tensors go is what lets a runtime run the layers on integers: onnxruntime and OpenVINO turn
DequantizeLinear -> Conv -> QuantizeLinear into one integer convolution (QLinearConv), and likewise
Add, Concat and the pools, but only where every input comes through a DequantizeLinear and the output
goes to a QuantizeLinear; a Relu or Clip(0, max) between the layer and its QuantizeLinear is folded
into the unsigned grid (zero point 0), so the rectified tensor is the one quantized.

Under statistics matching the ranges are measured on the float model before refinement (the quantized
model is matched to it with these activations quantized); otherwise on the graph as emitted, its weights
quantized. The estimators are in ``maths/ranges.py``. The grid is unsigned
and asymmetric (uint8, or uint16 for 16 bits), per tensor, with zero exact, as onnxruntime's and
OpenVINO's QDQ fusions expect for activations.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import NameSource, batch_chunk, constant_value, replace_list, with_outputs
from .maths.ranges import SAMPLES_PER_TENSOR, affine_grid, estimate_range
from .options import Plan
from .pairs import is_relu6
from .plan import QuantizedLayer
from .runtime import graph_session, own_graph

CALIBRATION_CHUNK = 8
"""Synthetic inputs per onnxruntime run while the activations are read (every layer input is an output)."""


def calibrate_activations(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], inputs: np.ndarray | None,
                          plan: Plan, like: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Under ``--activations B``, the range of each of ``integer_tensors`` over ``inputs``, measured on
    ``graph`` as it stands (copies share their source's); none without ``--activations``."""
    options = plan.options
    if options.activations == "none" or not qlayers:
        return {}
    names = integer_tensors(graph, [ql.layer.node for ql in qlayers.values()])
    copies = copied_tensors(graph, names)
    ranges = activation_ranges(graph, like, [name for name in names if name not in copies], inputs,
                               options.activation_range, int(options.activations), options.seed)
    for copy, source in copies.items():
        ranges[copy] = ranges[source]
    return dict(sorted(ranges.items()))


def quantize_activations(graph: gs.Graph, ranges: dict[str, tuple[float, float]], plan: Plan) -> None:
    """A QuantizeLinear/DequantizeLinear pair on each tensor of ``ranges``, in place (``insert_qdq``)."""
    if ranges:
        insert_qdq(graph, ranges, int(plan.options.activations))


def with_quantized_activations(graph: gs.Graph, ranges: dict[str, tuple[float, float]], plan: Plan) -> gs.Graph:
    """A copy of ``graph`` with the activations of ``ranges`` quantized: what statistics matching runs
    the quantized model through under ``--activations``."""
    copy = graph.copy()
    quantize_activations(copy, ranges, plan)
    return copy


INTEGER_OPS = ("Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
"""Ops between quantized layers that runtimes run on integers when their inputs and output are quantized
(an Add only of two activations: a residual, not a bias)."""


def integer_tensors(graph: gs.Graph, layers: list[gs.Node]) -> list[str]:
    """The tensors to quantize so that ``layers`` and the ops between them run on integers: each layer's
    activation input (before a ``padded`` Pad) and its ``rectified`` output; then, in graph order, the
    inputs and rectified output of each of ``INTEGER_OPS`` that reads or writes one of those. Graph
    outputs and ``constant_tensors`` stay float."""
    kept_float = {tensor.name for tensor in graph.outputs}
    weights = constant_tensors(graph)
    dtype = layers[0].inputs[0].dtype
    chosen = {}
    for node in layers:
        for tensor in (padded(node.inputs[0]), rectified(node.outputs[0], kept_float)):
            chosen[tensor.name] = tensor
    for node in graph.nodes:
        activations = [t for t in node.inputs if t.name not in weights]
        if node.op not in INTEGER_OPS or (node.op == "Add" and len(activations) != 2):
            continue
        touching = activations + [rectified(node.outputs[0], kept_float)]
        if any(tensor.name in chosen for tensor in touching):
            chosen.update((tensor.name, tensor) for tensor in touching)
    return sorted(name for name, tensor in chosen.items() if name not in kept_float and tensor.dtype == dtype)


def constant_tensors(graph: gs.Graph) -> set[str]:
    """The tensors computed from constants alone (a bias an exporter reshapes before adding it, say):
    parameters, not activations (OpenVINO refuses a quantized one)."""
    names = {name for name, tensor in graph.tensors().items() if isinstance(tensor, gs.Constant)}
    for node in graph.nodes:  # in graph order; a Constant node has no inputs
        if all(tensor.name in names for tensor in node.inputs if tensor.name):
            names.update(tensor.name for tensor in node.outputs)
    return names


COPYING_OPS = ("Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "MaxPool")
"""Ops whose output values are some of their input's (a Pad's also its constant, when that is 0)."""


def copied_tensors(graph: gs.Graph, names: list[str]) -> dict[str, str]:
    """Each of ``names`` that a ``COPYING_OPS`` node computes from another of them, with that one (followed
    back through chains): the two take one grid, so that a runtime moves the integers instead of a
    DequantizeLinear -> op -> QuantizeLinear round trip (a Pad before each depthwise conv, say)."""
    chosen = set(names)
    copies: dict[str, str] = {}
    for node in graph.nodes:  # in graph order, so a chain resolves to its first tensor
        source, out = node.inputs[0] if node.inputs else None, node.outputs[0]
        if (node.op in COPYING_OPS and out.name in chosen and source is not None and source.name in chosen
                and pads_zeros_only(node)):
            copies[out.name] = copies.get(source.name, source.name)
    return copies


def pads_zeros_only(node: gs.Node) -> bool:
    """False for a Pad that writes a constant other than 0 (or one not known), True for any other node."""
    if node.op != "Pad" or node.attrs.get("mode", "constant") != "constant":
        return True
    if len(node.inputs) > 2 and node.inputs[2].name:  # opset 11 on: the value is an input
        value = constant_value(node.inputs[2])
        return value is not None and not np.any(value)
    return node.attrs.get("value", 0.0) == 0.0


def padded(tensor: gs.Variable) -> gs.Variable:
    """``tensor``, or the input of the zero-constant Pad that computes it for this one reader: runtimes fold
    such a Pad into the convolution after it (onnxruntime's PadFusion), but not once a QuantizeLinear
    stands between them."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if (producer is not None and producer.op == "Pad" and producer.attrs.get("mode", "constant") == "constant"
            and pads_zeros_only(producer) and len(tensor.outputs) == 1):
        return producer.inputs[0]
    return tensor


def rectified(tensor: gs.Variable, kept_float: set[str]) -> gs.Variable:
    """``tensor``, or the output of the Relu or Clip(0, max) that alone reads it (unless ``tensor`` is a
    graph output): a runtime folds that activation into the QuantizeLinear after it."""
    readers = tensor.outputs
    if len(readers) == 1 and (readers[0].op == "Relu" or is_relu6(readers[0])) and tensor.name not in kept_float:
        return readers[0].outputs[0]
    return tensor


def activation_ranges(graph: gs.Graph, like: onnx.ModelProto, names: list[str], inputs: np.ndarray,
                      estimator: str, bits: int, seed: int) -> dict[str, tuple[float, float]]:
    """Range of each named tensor of ``graph`` over ``inputs`` by ``estimator`` (exact min/max over every
    value for ``minmax``; the other estimators see a seeded random subset of each tensor's values)."""
    session = graph_session(with_outputs(graph, names), like, "activation calibration")
    chunk = min(batch_chunk(graph), CALIBRATION_CHUNK)
    runs = -(-len(inputs) // chunk)
    rng = np.random.default_rng(seed)
    kept: dict[str, list[np.ndarray]] = {name: [] for name in names}
    input_name = session.get_inputs()[0].name
    for start in range(0, len(inputs), chunk):
        with own_graph("activation calibration"):
            outputs = session.run(names, {input_name: inputs[start:start + chunk]})
        for name, value in zip(names, outputs):
            flat = value.reshape(-1)
            # min/max needs only each chunk's extremes; the other estimators a random subset of the values
            kept[name].append(np.array([flat.min(), flat.max()]) if estimator == "minmax"
                              else flat[rng.integers(0, flat.size, SAMPLES_PER_TENSOR // runs)])
    return {name: estimate_range(np.concatenate(kept[name]).astype(np.float64), estimator, bits) for name in names}


def insert_qdq(graph: gs.Graph, ranges: dict[str, tuple[float, float]], bits: int) -> None:
    """x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> every node that read x, for each tensor x
    named in ``ranges``."""
    dtype = np.uint8 if bits <= 8 else np.uint16
    names = NameSource(graph)
    tensors = graph.tensors()
    for name, (low, high) in ranges.items():
        x = tensors[name]
        readers = list(x.outputs)
        scale, zero_point = affine_grid(low, high, bits)
        s = gs.Constant(names.fresh(f"{name}.act_scale"), np.array(scale, np.float32))
        z = gs.Constant(names.fresh(f"{name}.act_zero_point"), np.array(zero_point, dtype))
        q = gs.Variable(names.fresh(f"{name}.act_q"), dtype=dtype, shape=x.shape)
        dq = gs.Variable(names.fresh(f"{name}.act_dq"), dtype=np.float32, shape=x.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", names.fresh(f"{name}.QuantizeLinear"), inputs=[x, s, z],
                                   outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", names.fresh(f"{name}.DequantizeLinear"),
                                   inputs=[q, s, z], outputs=[dq]))
        for node in readers:
            replace_list(node.inputs, [dq if t is x else t for t in node.inputs])
    graph.toposort()

"""The activation stage (``--activations B``): QuantizeLinear/DequantizeLinear on the input of every
quantized layer, each range calibrated on the synthetic inputs, data-free.

The ranges are measured on the graph as emitted (its weights already quantized), so each range is that of
the tensor the quantized model computes; the estimators are in ``maths/ranges.py``. The grid is unsigned
and asymmetric (uint8, or uint16 for 16 bits), per tensor, with zero exact, as onnxruntime's and
OpenVINO's QDQ fusions expect for activations.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import NameSource, batch_chunk, with_outputs
from .maths.ranges import SAMPLES_PER_TENSOR, affine_grid, estimate_range
from .options import Plan
from .plan import QuantizedLayer
from .runtime import graph_session, own_graph

CALIBRATION_CHUNK = 8
"""Synthetic inputs per onnxruntime run while the activations are read (every layer input is an output)."""


def quantize_activations(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], inputs: np.ndarray | None,
                         plan: Plan, like: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Under ``--activations B``, put a QuantizeLinear/DequantizeLinear pair on the activation input of each
    layer in ``qlayers`` (shared where several read one tensor), in place; return the range used per
    tensor (none without ``--activations``)."""
    options = plan.options
    if options.activations == "none" or not qlayers:
        return {}
    bits = int(options.activations)
    nodes = [ql.layer.node for ql in qlayers.values()]
    names = sorted({node.inputs[0].name for node in nodes})
    ranges = activation_ranges(graph, like, names, inputs, options.activation_range, bits, options.seed)
    insert_qdq(graph, nodes, ranges, bits)
    return ranges


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


def insert_qdq(graph: gs.Graph, nodes: list[gs.Node], ranges: dict[str, tuple[float, float]], bits: int) -> None:
    """x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z) -> each of ``nodes`` that reads x as its first input."""
    dtype = np.uint8 if bits <= 8 else np.uint16
    names = NameSource(graph)
    dequantized: dict[str, gs.Variable] = {}
    for node in nodes:
        x = node.inputs[0]
        if x.name not in dequantized:
            scale, zero_point = affine_grid(*ranges[x.name], bits)
            s = gs.Constant(names.fresh(f"{x.name}.act_scale"), np.array(scale, np.float32))
            z = gs.Constant(names.fresh(f"{x.name}.act_zero_point"), np.array(zero_point, dtype))
            q = gs.Variable(names.fresh(f"{x.name}.act_q"), dtype=dtype, shape=x.shape)
            dq = gs.Variable(names.fresh(f"{x.name}.act_dq"), dtype=np.float32, shape=x.shape)
            graph.nodes.append(gs.Node("QuantizeLinear", names.fresh(f"{x.name}.QuantizeLinear"), inputs=[x, s, z],
                                       outputs=[q]))
            graph.nodes.append(gs.Node("DequantizeLinear", names.fresh(f"{x.name}.DequantizeLinear"),
                                       inputs=[q, s, z], outputs=[dq]))
            dequantized[x.name] = dq
        node.inputs[0] = dequantized[x.name]
    graph.toposort()

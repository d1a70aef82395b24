"""Stage 6: write the quantized weights back into the graph.

Two placements of the compensation c (spec section 3, "Placement"):

- producer: P's row j and bias b_j are multiplied by c_j; C stays on its
  k-bit grid. Required for ``qdq``: the ternary layer becomes a
  per-output-channel-scaled ternary layer.
- consumer: C's input channel j is multiplied by c_j (the paper's Eq. 7).

Two formats: ``qdq`` stores integer codes and DequantizeLinear with
per-output-channel scales (INT2, INT4, INT8 or INT16 storage, whichever
holds the codes); ``float`` stores the dequantized values as plain float
initializers, runnable anywhere.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import Layer, NameSource, from_rows
from .pairs import Pair
from .plan import QuantizedLayer
from .quantizers import QuantizedWeight

# Signed storage type, its ONNX opset requirement for per-axis DequantizeLinear.
STORAGE = ((2, ml_dtypes.int2, 25), (4, ml_dtypes.int4, 21), (8, np.int8, 13), (16, np.int16, 21))


def storage_for(bits: int) -> tuple[type, int]:
    """The narrowest signed integer type holding ``bits``-bit codes, and the opset it needs."""
    for width, dtype, opset in STORAGE:
        if bits <= width:
            return dtype, opset
    raise ValueError(f"no integer storage for {bits}-bit codes")


def effective_weights(qlayer: QuantizedLayer) -> tuple[QuantizedWeight, np.ndarray | None]:
    """The (codes and scales, bias) the output computes with: the refined ones if refined, else
    producer placement of c, (codes with scale alpha c_j, bias c_j b_j); other roles unchanged."""
    if qlayer.refined is not None:
        return qlayer.refined
    q, bias = qlayer.quantized, qlayer.layer.bias
    if qlayer.compensation is None:
        return q, bias
    c = qlayer.compensation
    new_bias = None if bias is None else (bias.astype(np.float64) * c).astype(np.float32)
    return q.with_scale(q.scale * c), new_bias


def float_weights(qlayers: dict[str, QuantizedLayer], pairs: tuple[Pair, ...],
                  placement: str = "producer") -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Dequantized (weight, bias) per layer, in the graph's layout, with c placed as asked."""
    if placement not in ("producer", "consumer"):
        raise ValueError(f"placement must be 'producer' or 'consumer', not '{placement}'")
    result = {}
    for name, ql in qlayers.items():
        q, bias = effective_weights(ql) if placement == "producer" else (ql.quantized, ql.layer.bias)
        result[name] = (from_rows(q.dequantize(), ql.layer.weight.shape, ql.layer.out_axis), bias)
    if placement == "consumer":
        for pair in pairs:
            c = qlayers[pair.producer].compensation
            if c is not None:
                weight, bias = result[pair.consumer]
                result[pair.consumer] = (scale_input_channels(qlayers[pair.consumer].layer, weight, pair, c), bias)
    return result


def scale_input_channels(consumer: Layer, weight: np.ndarray, pair: Pair, c: np.ndarray) -> np.ndarray:
    """Vtilde[:, j] = c_j V[:, j] (Eq. 7) for the consumer input features that carry P's channel j."""
    factor = np.repeat(c, pair.block)
    first = pair.offset
    weight = weight.astype(np.float64)
    if consumer.op == "Conv":
        group = int(consumer.node.attrs.get("group", 1))
        per_group_in = weight.shape[1]
        per_group_out = weight.shape[0] // group
        for index, f in enumerate(factor):
            channel = first + index
            g = channel // per_group_in
            weight[g * per_group_out:(g + 1) * per_group_out, channel % per_group_in] *= f
    else:
        in_axis = 1 - consumer.out_axis
        shape = [1, 1]
        shape[in_axis] = factor.size
        sl = [slice(None), slice(None)]
        sl[in_axis] = slice(first, first + factor.size)
        weight[tuple(sl)] *= factor.reshape(shape)
    return weight.astype(np.float32)


def emit_float(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], pairs: tuple[Pair, ...],
               placement: str = "producer") -> None:
    """Replace each quantized layer's weight (and bias) by float constants, in place."""
    names = NameSource(graph)
    for name, (weight, bias) in float_weights(qlayers, pairs, placement).items():
        layer = qlayers[name].layer
        layer.node.inputs[1] = gs.Constant(names.fresh(f"{name}.weight_q"), weight)
        _set_bias(names, layer, bias)


def emit_qdq(graph: gs.Graph, qlayers: dict[str, QuantizedLayer]) -> None:
    """Feed each quantized layer's weight through DequantizeLinear(codes, scale), in place.

    The compensation is placed on the producer. The graph's opset must be
    at least what ``storage_for`` names for every layer's codes.
    """
    names = NameSource(graph)
    for name, ql in qlayers.items():
        q, bias = effective_weights(ql)
        layer = ql.layer
        dtype, _ = storage_for(q.storage_bits)
        codes = from_rows(q.codes, layer.weight.shape, layer.out_axis).astype(dtype)
        code_const = gs.Constant(names.fresh(f"{name}.weight_{np.dtype(dtype).name}"),
                                 LazyValues(numpy_helper.from_array(codes)))
        scale = q.scale.astype(np.float32)
        attrs = {}
        if np.all(scale == scale[0]):
            scale = np.array(scale[0], dtype=np.float32)
        else:
            attrs["axis"] = layer.out_axis
        scale_const = gs.Constant(names.fresh(f"{name}.weight_scale"), scale)
        dequantized = gs.Variable(names.fresh(f"{name}.weight_dq"), dtype=np.float32,
                                  shape=list(layer.weight.shape))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}.DequantizeLinear",
                                   inputs=[code_const, scale_const], outputs=[dequantized], attrs=attrs))
        layer.node.inputs[1] = dequantized
        _set_bias(names, layer, bias)
    graph.toposort()


def _set_bias(names: NameSource, layer: Layer, bias: np.ndarray | None) -> None:
    if bias is None or bias is layer.bias:
        return
    constant = gs.Constant(names.fresh(f"{layer.name}.bias_q"), np.asarray(bias, dtype=np.float32))
    if len(layer.node.inputs) > 2:
        layer.node.inputs[2] = constant
    else:
        layer.node.inputs.append(constant)

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
import onnx
import onnx_graphsurgeon as gs
from numba import njit, prange
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import Layer, NameSource, from_rows
from .pairs import Pair
from .plan import QuantizedLayer
from .quantizers import QuantizedWeight

def storage_parts(bits: int) -> tuple[tuple[type, int], ...]:
    """How a layer quantized to ``bits`` is stored: (integer type, step) per part, the step in units of
    the quantizer's scale s.

    Ternary codes T (Eq. 3) go in INT2 with step 1 (W = s T). DoReFa codes q
    (Eq. 6) are odd, so m = (q - 1) / 2 is a signed ``bits``-bit integer and
    W = s (2 m + 1): m goes in INT4, INT8 or INT16 with step 2, or, for 5 and
    6 bits, in an INT4 high part and a UINT2 low part, m = 4 hi + lo (steps
    8 and 2), so that 6-bit weights take 6 bits. The "+ s" is added after the
    DequantizeLinear nodes; the file stores one scale per channel (``emit_qdq``).
    """
    if bits == 2:
        return ((ml_dtypes.int2, 1),)
    if bits <= 4:
        return ((ml_dtypes.int4, 2),)
    if bits <= 6:
        return ((ml_dtypes.int4, 8), (ml_dtypes.uint2, 2))
    if bits <= 8:
        return ((np.int8, 2),)
    if bits <= 16:
        return ((np.int16, 2),)
    raise ValueError(f"no integer storage for {bits}-bit weights")


OPSET_FOR_TYPE = {ml_dtypes.int2: 25, ml_dtypes.uint2: 25, ml_dtypes.int4: 21, np.int8: 13, np.int16: 21}
"""The first opset whose DequantizeLinear takes the type with a per-axis scale."""


def storage_opset(bits: int) -> int:
    """The opset that ``storage_parts(bits)`` needs."""
    return max(OPSET_FOR_TYPE[dtype] for dtype, _ in storage_parts(bits))


def stored_rows(q: QuantizedWeight) -> np.ndarray:
    """The weight rows exactly as the qdq model computes them from its stored integers, in float32:
    each part times (step x scale), summed, plus the scale for DoReFa codes."""
    scale = q.scale.astype(np.float32)[:, None]
    rows = None
    for (_, step), part in zip(storage_parts(q.bits), split_codes(q)):
        term = part.astype(np.float32) * (scale * np.float32(step))
        rows = term if rows is None else rows + term
    return rows + scale if q.bits > 2 else rows


def split_codes(q: QuantizedWeight) -> list[np.ndarray]:
    """The integer parts of ``storage_parts(q.bits)`` for q's codes (rows), in order."""
    if q.bits == 2:
        return [q.codes]
    if len(storage_parts(q.bits)) == 2:
        return list(_high_and_low(q.codes))
    return [(q.codes - 1) // 2]  # odd codes: exact, and in the codes' own integer type


@njit(cache=True, parallel=True)
def _high_and_low(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m = (q - 1) / 2 split as m = 4 hi + lo, hi in [-8, 7], lo in [0, 3], in one pass."""
    high = np.empty(codes.shape, dtype=np.int8)
    low = np.empty(codes.shape, dtype=np.int8)
    for j in prange(codes.shape[0]):
        for k in range(codes.shape[1]):
            m = (np.int32(codes[j, k]) - 1) >> 1
            high[j, k] = m >> 2
            low[j, k] = m & 3
    return high, low


def packed_tensor(name: str, values: np.ndarray, dtype: type) -> onnx.TensorProto:
    """``values`` (integers in range) as a TensorProto of ``dtype``; INT2/UINT2 four and INT4 two to a byte,
    first element in the lowest bits, as the ONNX spec lays them out."""
    if dtype not in (ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.int4):
        return numpy_helper.from_array(values.astype(dtype), name)
    bits = 4 if dtype is ml_dtypes.int4 else 2
    data_type = {ml_dtypes.int2: onnx.TensorProto.INT2, ml_dtypes.uint2: onnx.TensorProto.UINT2,
                 ml_dtypes.int4: onnx.TensorProto.INT4}[dtype]
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=values.shape)
    tensor.raw_data = _pack(np.ascontiguousarray(values, dtype=np.int8).reshape(-1), bits).tobytes()
    return tensor


@njit(cache=True, parallel=True)
def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    count = values.size
    out = np.empty((count + per_byte - 1) // per_byte, dtype=np.uint8)
    for b in prange(out.size):
        byte = 0
        for k in range(per_byte):
            i = b * per_byte + k
            if i < count:
                byte |= (np.int32(values[i]) & mask) << (bits * k)
        out[b] = np.uint8(byte)
    return out


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
        result[name] = (from_rows(stored_rows(q), ql.layer.weight.shape, ql.layer.out_axis), bias)
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
    """Feed each quantized layer's weight through DequantizeLinear(integers, scale) nodes, in place.

    The compensation is placed on the producer. Each weight is stored as
    ``storage_parts`` says, with one DequantizeLinear per part and Adds. The
    graph's opset must be at least ``storage_opset`` of every layer's bits.
    """
    names = NameSource(graph)
    for name, ql in qlayers.items():
        q, bias = effective_weights(ql)
        layer = ql.layer
        parts = storage_parts(q.bits)
        base_step = parts[-1][1]
        scale = q.scale.astype(np.float32) * np.float32(base_step)
        per_tensor = bool(np.all(scale == scale[0]))
        attrs = {} if per_tensor else {"axis": layer.out_axis}
        # the file stores one scale per channel, (step of the last part) x s; the other parts' scales and the
        # DoReFa offset s are exact power-of-two multiples of it, computed in the graph
        base = gs.Constant(names.fresh(f"{name}.weight_scale"), np.array(scale[0]) if per_tensor else scale)
        terms = []
        for index, ((dtype, step), part) in enumerate(zip(parts, split_codes(q))):
            values = from_rows(part, layer.weight.shape, layer.out_axis)
            codes_name = names.fresh(f"{name}.weight_{np.dtype(dtype).name}")
            codes = gs.Constant(codes_name, LazyValues(packed_tensor(codes_name, values, dtype)))
            part_scale = base if step == base_step else _scaled(graph, names, name, base, step / base_step)
            terms.append(gs.Variable(names.fresh(f"{name}.weight_dq"), dtype=np.float32,
                                     shape=list(layer.weight.shape)))
            graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}.DequantizeLinear{index or ''}",
                                       inputs=[codes, part_scale], outputs=[terms[-1]], attrs=attrs))
        if q.bits > 2:  # W = s (2 m + 1): the + s, broadcast along the output-channel axis
            shape = [1] * layer.weight.ndim
            shape[layer.out_axis] = -1
            channels = base if per_tensor else _reshaped(graph, names, name, base, shape)
            terms.append(_scaled(graph, names, name, channels, 1.0 / base_step))
        weight = terms[0]
        for index, term in enumerate(terms[1:]):
            total = gs.Variable(names.fresh(f"{name}.weight_sum"), dtype=np.float32, shape=list(layer.weight.shape))
            graph.nodes.append(gs.Node("Add", name=f"{name}.weight_add{index or ''}", inputs=[weight, term],
                                       outputs=[total]))
            weight = total
        layer.node.inputs[1] = weight
        _set_bias(names, layer, bias)
    graph.toposort()


def _scaled(graph: gs.Graph, names: NameSource, layer: str, tensor: gs.Tensor, factor: float) -> gs.Variable:
    """A Mul node: ``tensor`` x ``factor`` (a power of two here, so exact in float32)."""
    out = gs.Variable(names.fresh(f"{layer}.weight_scale_x{factor:g}"), dtype=np.float32)
    graph.nodes.append(gs.Node("Mul", name=names.fresh(f"{layer}.weight_scale_mul"),
                               inputs=[tensor, gs.Constant(names.fresh(f"{layer}.factor"), np.array(factor, np.float32))],
                               outputs=[out]))
    return out


def _reshaped(graph: gs.Graph, names: NameSource, layer: str, tensor: gs.Tensor, shape: list[int]) -> gs.Variable:
    out = gs.Variable(names.fresh(f"{layer}.weight_scale_reshaped"), dtype=np.float32)
    graph.nodes.append(gs.Node("Reshape", name=names.fresh(f"{layer}.weight_scale_reshape"),
                               inputs=[tensor, gs.Constant(names.fresh(f"{layer}.shape"), np.array(shape, np.int64))],
                               outputs=[out]))
    return out


def _set_bias(names: NameSource, layer: Layer, bias: np.ndarray | None) -> None:
    if bias is None or bias is layer.bias:
        return
    constant = gs.Constant(names.fresh(f"{layer.name}.bias_q"), np.asarray(bias, dtype=np.float32))
    if len(layer.node.inputs) > 2:
        layer.node.inputs[2] = constant
    else:
        layer.node.inputs.append(constant)

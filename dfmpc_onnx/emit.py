"""The emit stage: the quantized weights written back into the graph.

Two placements of the compensation c (spec section 3, "Placement"):

- producer: P's row j and bias b_j are multiplied by c_j; C stays on its
  k-bit grid. Required for ``qdq``: the ternary layer becomes a
  per-output-channel-scaled ternary layer.
- consumer: C's input channel j is multiplied by c_j (the paper's Eq. 7).

Two formats: ``qdq`` stores integer codes and DequantizeLinear with
per-output-channel scales, in the types ``storage.storage_parts`` chooses;
``float`` stores the same weights as plain float initializers, runnable anywhere.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import Layer, NameSource, bias_operand, from_rows, replace_list
from .pairs import Pair
from .maths.quantizers import QuantizedWeight
from .plan import QuantizedLayer
from .storage import (packed_tensor, split_codes, storage_parts, stored_rows, stores_offset,
                      with_stored_scale, LOG_SCALE_ZERO, LogScales)


def emit(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], pairs: tuple[Pair, ...], format: str,
         placement: str, storage: str = "exact") -> None:
    """Rewrite ``graph`` in place with every quantized layer in ``format`` (qdq, its integers stored as
    ``storage`` says, or float)."""
    if format == "qdq":
        emit_qdq(graph, qlayers, storage)
    else:
        emit_float(graph, qlayers, pairs, placement)


def float_weights(qlayers: dict[str, QuantizedLayer], pairs: tuple[Pair, ...],
                  placement: str = "producer") -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Dequantized (weight, bias) per layer, in the graph's layout, with c placed as asked."""
    if placement not in ("producer", "consumer"):
        raise ValueError(f"placement must be 'producer' or 'consumer', not '{placement}'")
    result = {}
    for name, ql in qlayers.items():
        q, bias = (ql.weight, ql.bias) if placement == "producer" else (ql.quantized, ql.layer.bias)
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
    if consumer.group is not None:
        per_group_in = weight.shape[1]
        per_group_out = weight.shape[0] // consumer.group
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
        _set_bias(graph, names, layer, bias)


def emit_qdq(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], storage: str = "exact") -> None:
    """Feed each quantized layer's weight through DequantizeLinear(integers, scale) nodes, in place.

    The compensation is placed on the producer. Each weight is stored as
    ``storage_parts(bits, storage)`` says, with one DequantizeLinear per part and Adds. The
    graph's opset must be at least ``storage_opset`` of every layer's bits.
    """
    names = NameSource(graph)
    constants: dict[tuple, gs.Constant] = {}
    for name, ql in qlayers.items():
        (q, stored), bias = with_stored_scale(ql.weight, storage), ql.bias
        layer = ql.layer
        parts = storage_parts(q.bits, storage, q.grid)
        base_step = parts[-1][1]
        per_tensor = not q.block and bool(np.all(q.scale == q.scale[0]))
        attrs = {} if per_tensor else {"axis": layer.out_axis}
        if q.block:  # a scale per block of inputs: DequantizeLinear's blocks run along the input axis
            attrs = {"axis": _input_axis(layer), "block_size": q.block}
        # the file stores one scale per channel (or block), (step of the last part) x s; the other parts' scales
        # and the DoReFa offset s are exact power-of-two multiples of it, computed in the graph
        base = _scale_input(graph, names, constants, layer, q, stored, base_step)
        terms = []
        for index, ((dtype, step), part) in enumerate(zip(parts, split_codes(q, storage))):
            values = from_rows(part, layer.weight.shape, layer.out_axis)
            codes_name = names.fresh(f"{name}.weight_{np.dtype(dtype).name}")
            codes = gs.Constant(codes_name, LazyValues(packed_tensor(codes_name, values, dtype)))
            part_scale = base if step == base_step else _scaled(graph, names, constants, name, base, step / base_step)
            terms.append(gs.Variable(names.fresh(f"{name}.weight_dq"), dtype=np.float32,
                                     shape=list(layer.weight.shape)))
            graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}.DequantizeLinear{index or ''}",
                                       inputs=[codes, part_scale], outputs=[terms[-1]], attrs=attrs))
        if stores_offset(q.bits, storage, q.grid):  # W = s (2 m + 1): the + s, broadcast along the output-channel axis
            if q.block:
                raise ValueError("block-wise scales hold integer-grid codes, which need no offset")
            shape = [1] * layer.weight.ndim
            shape[layer.out_axis] = -1
            channels = base if per_tensor else _reshaped(graph, names, constants, name, base, shape)
            terms.append(_scaled(graph, names, constants, name, channels, 1.0 / base_step))
        weight = terms[0]
        for index, term in enumerate(terms[1:]):
            total = gs.Variable(names.fresh(f"{name}.weight_sum"), dtype=np.float32, shape=list(layer.weight.shape))
            graph.nodes.append(gs.Node("Add", name=f"{name}.weight_add{index or ''}", inputs=[weight, term],
                                       outputs=[total]))
            weight = total
        layer.node.inputs[1] = weight
        _set_bias(graph, names, layer, bias)
    graph.toposort()


def _input_axis(layer: Layer) -> int:
    """The weight axis of the layer's input features: the other axis of a 2-D weight, axis 1 of a conv's."""
    return 1 - layer.out_axis if layer.weight.ndim == 2 else 1


def _in_layout(layer: Layer, q: QuantizedWeight, values: np.ndarray) -> np.ndarray:
    """Per-row (or per-block: rows x blocks) ``values`` laid out as DequantizeLinear reads q's scales: as they
    are per row, else like the weight with its input axis cut to one entry per block."""
    if not q.block:
        return values
    shape = list(layer.weight.shape)
    shape[_input_axis(layer)] = values.shape[1]
    return from_rows(values, tuple(shape), layer.out_axis)


def _scale_input(graph: gs.Graph, names: NameSource, constants: dict[tuple, gs.Constant], ql_layer: Layer,
                 q: QuantizedWeight, stored: LogScales | None, step: int) -> gs.Tensor:
    """The scales ``step`` x s of q (already as the file keeps them, ``with_stored_scale``) as the file stores
    them: a float32 constant (``stored`` None: one scale, or ``portable`` and ``int8``), or the uint8 codes of
    ``stored`` and the nodes that compute S 2^(t (e - 128)) from them, times a 0/1 mask of e != 0 where zero
    scales are coded."""
    layer = ql_layer.name
    if stored is None:
        return _scale_constant(names, layer, _in_layout(ql_layer, q, (q.scale * step).astype(np.float32)))
    codes = gs.Constant(names.fresh(f"{layer}.weight_scale_code"), _in_layout(ql_layer, q, stored.codes))
    zero_point = _shared(names, constants, "weight_scale_code_zero", np.array(LOG_SCALE_ZERO, np.uint8))
    octaves = _node(graph, names, layer, "DequantizeLinear", "weight_scale_octaves",
                    [codes, gs.Constant(names.fresh(f"{layer}.weight_scale_step"), np.array(stored.step, np.float32)),
                     zero_point])
    ratio = _node(graph, names, layer, "Pow", "weight_scale_ratio",
                  [_shared(names, constants, "weight_scale_two", np.array(2.0, np.float32)), octaves])
    base = gs.Constant(names.fresh(f"{layer}.weight_scale_base"), np.array(stored.base * np.float32(step), np.float32))
    scale = _node(graph, names, layer, "Mul", "weight_scale", [ratio, base])
    if not stored.zeros:
        return scale
    nonzero = _node(graph, names, layer, "Cast", "weight_scale_nonzero", [codes], {"to": onnx.TensorProto.BOOL},
                    np.bool_)
    mask = _node(graph, names, layer, "Cast", "weight_scale_mask", [nonzero], {"to": onnx.TensorProto.FLOAT})
    return _node(graph, names, layer, "Mul", "weight_scale_masked", [scale, mask])


def _node(graph: gs.Graph, names: NameSource, layer: str, op: str, what: str, inputs: list[gs.Tensor],
          attrs: dict | None = None, dtype: type = np.float32) -> gs.Variable:
    """A node ``op`` of ``inputs`` appended to ``graph``; its one output, named for ``layer`` and ``what``."""
    out = gs.Variable(names.fresh(f"{layer}.{what}"), dtype=dtype)
    graph.nodes.append(gs.Node(op, name=names.fresh(f"{layer}.{what}_{op.lower()}"), inputs=inputs, outputs=[out],
                               attrs=attrs or {}))
    return out


def _scale_constant(names: NameSource, layer: str, values: np.ndarray) -> gs.Constant:
    single = values.ndim == 1 and np.all(values == values[0])  # blocks keep their layout
    return gs.Constant(names.fresh(f"{layer}.weight_scale"), values[:1].reshape(()) if single else values)


def _shared(names: NameSource, constants: dict[tuple, gs.Constant], base: str, value: np.ndarray) -> gs.Constant:
    """One constant per distinct value, shared by every layer that needs it."""
    key = (value.dtype.str, value.shape, value.tobytes())
    if key not in constants:
        constants[key] = gs.Constant(names.fresh(base), value)
    return constants[key]


def _scaled(graph: gs.Graph, names: NameSource, constants: dict[tuple, gs.Constant], layer: str, tensor: gs.Tensor,
            factor: float) -> gs.Variable:
    """A Mul node: ``tensor`` x ``factor`` (a power of two here, so exact in float32)."""
    factor_constant = _shared(names, constants, f"weight_factor_{factor:g}", np.array(factor, np.float32))
    return _node(graph, names, layer, "Mul", f"weight_scale_x{factor:g}", [tensor, factor_constant])


def _reshaped(graph: gs.Graph, names: NameSource, constants: dict[tuple, gs.Constant], layer: str, tensor: gs.Tensor,
              shape: list[int]) -> gs.Variable:
    shape_constant = _shared(names, constants, "weight_scale_shape", np.array(shape, np.int64))
    return _node(graph, names, layer, "Reshape", "weight_scale_reshaped", [tensor, shape_constant])


def _set_bias(graph: gs.Graph, names: NameSource, layer: Layer, bias: np.ndarray | None) -> None:
    """The layer's bias input set to ``bias``: a MatMul's bias Add takes it as its constant, and a MatMul
    without one gets an Add after it."""
    if bias is None or bias is layer.bias:
        return
    constant = gs.Constant(names.fresh(f"{layer.name}.bias_q"), np.asarray(bias, dtype=np.float32))
    if layer.bias_node is not None:
        layer.bias_node.inputs[bias_operand(layer.bias_node, layer.node)] = constant
    elif layer.op == "MatMul":
        output = layer.node.outputs[0]
        product = gs.Variable(names.fresh(f"{output.name}.product"), dtype=output.dtype, shape=output.shape)
        replace_list(layer.node.outputs, [product])
        graph.nodes.append(gs.Node("Add", name=names.fresh(f"{layer.name}.bias_add"), inputs=[product, constant],
                                   outputs=[output]))
    elif len(layer.node.inputs) > 2:
        layer.node.inputs[2] = constant
    else:
        layer.node.inputs.append(constant)

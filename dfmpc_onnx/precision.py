"""Float16 models (weights and activations in float16, common in deployment): quantized as float32 ones,
then given back their float type.

``to_float32`` turns the data-less model and its weights to float32 after loading (initializers, Constant
nodes, Cast targets, the types of inputs and outputs); ``to_float16`` turns the quantized model's float
initializers, scales and constants, those Casts and its inputs and outputs back to float16 before saving.
Integer codes are untouched, so the stored bits are the same.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
ALWAYS_FLOAT32 = {"Resize": (1, 2), "Upsample": (1,)}
"""Inputs that stay float32 in a float16 model (regions and scales), by op and input index."""


def _always_float32(graph: onnx.GraphProto) -> set[str]:
    return {node.input[i] for node in graph.node for i in ALWAYS_FLOAT32.get(node.op_type, ())
            if i < len(node.input) and node.input[i]}


def is_float16(model: onnx.ModelProto) -> bool:
    """Whether the model is a float16 one throughout: float16 inputs, outputs and weights, and no float32
    tensor among them (a model mixing the two keeps its float16 layers in float, as reported)."""
    kept = _always_float32(model.graph)
    floats = {t.data_type for t in model.graph.initializer if t.data_type in (FLOAT, HALF) and t.name not in kept}
    floats |= {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
               if v.type.tensor_type.elem_type in (FLOAT, HALF)}
    return floats == {HALF}


def as_float32(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict, bool]:
    """(model, weights) in float32, and whether they were float16."""
    if not is_float16(model):
        return model, weights, False
    return *to_float32(model, weights), True


def to_float32(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A float32 copy of a float16 model (the data-less model and its weights)."""
    model = _retyped(model, HALF, FLOAT)
    return model, {name: values.astype(np.float32) if values.dtype == np.float16 else values
                   for name, values in weights.items()}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized model back in float16."""
    return _retyped(model, FLOAT, HALF)


def _retyped(model: onnx.ModelProto, source: int, target: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = _always_float32(graph)
    for tensor in graph.initializer:
        if tensor.data_type == source and tensor.name not in kept:
            tensor.CopyFrom(_converted(tensor, target))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == source:
            value.type.tensor_type.elem_type = target
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == source and node.op_type == "Cast":
                attr.i = target
            elif attr.HasField("t") and attr.t.data_type == source and node.output[0] not in kept:
                attr.t.CopyFrom(_converted(attr.t, target))
    return copy


def _converted(tensor: onnx.TensorProto, target: int) -> onnx.TensorProto:
    if not tensor.HasField("raw_data") and not tensor.float_data and not tensor.int32_data:
        converted = onnx.TensorProto()
        converted.CopyFrom(tensor)
        converted.data_type = target  # a data-less placeholder (``load.load_model``): its data comes later
        return converted
    dtype = np.float16 if target == HALF else np.float32
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype), tensor.name)

"""The model's inputs: which are real, their declared shapes, ``--input-shape``, the shape of the
synthetic inputs, and the facts the resolution of ``auto`` options needs."""

from __future__ import annotations

import numpy as np
import onnx

from .errors import InputError
from .fidelity import one_class_axis
from .load import constant_tensors
from .options import ModelFacts
from .runtime import model_session


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (old exporters list both)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def declared_shape(value: onnx.ValueInfoProto) -> list:
    """An input's dims: ints where static, the dim's name or None where dynamic."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in dims]


def resolve_input_shapes(model: onnx.ModelProto, given: tuple[tuple[str | None, tuple[int, ...]], ...]
                         ) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values checked against the model's inputs, keyed by input name.

    A None name means the model's only input. Each shape must have the input's rank (or one less: the
    dims after the batch dim, which is then the input's own if static, else 1), positive dims, and agree
    with every static dim of the input.
    """
    inputs = {value.name: value for value in model_inputs(model)}
    shapes = {}
    for name, dims in given:
        if name is None:
            if len(inputs) != 1:
                raise InputError(f"--input-shape: the model has {len(inputs)} inputs "
                                 f"({', '.join(inputs)}); write NAME:DIMS")
            name = next(iter(inputs))
        if name not in inputs:
            raise InputError(f"--input-shape: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        declared = declared_shape(inputs[name])
        dims = tuple(int(d) for d in dims)
        if len(dims) == len(declared) - 1:
            dims = (declared[0] if isinstance(declared[0], int) else 1,) + dims
        if len(dims) != len(declared) or min(dims, default=1) <= 0 or any(
                isinstance(d, int) and d != g for d, g in zip(declared, dims)):
            shown = ",".join(str(d) if d else "?" for d in declared)
            raise InputError(f"--input-shape: {','.join(map(str, dims))} does not fit input '{name}' of shape "
                             f"{shown}")
        shapes[name] = dims
    return shapes


def synthesis_shape(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list | str:
    """The shape of the synthetic inputs (the model's one float input, with ``--input-shape`` dims where
    the model's are dynamic), or why the model cannot take synthetic inputs."""
    inputs = model_inputs(model)
    if len(inputs) != 1:
        return f"it needs a model with one input, this one has {len(inputs)}"
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        elem_type = inputs[0].type.tensor_type.elem_type
        kind = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "not a tensor"
        return f"it needs a float32 input, input '{inputs[0].name}' is {kind}"
    shape = list(shapes.get(inputs[0].name, declared_shape(inputs[0])))
    if len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        shown = ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
        return f"input shape {shown} is dynamic after the batch dim (give one with --input-shape)"
    return shape


def model_facts(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> ModelFacts:
    """What the resolution of ``auto`` options needs to know of ``model``."""
    shape = synthesis_shape(model, shapes)
    outputs = [declared_shape(o) for o in model.graph.output]
    classifier = len(outputs) == 1 and one_class_axis(outputs[0])
    return ModelFacts(has_batchnorm=any(node.op_type == "BatchNormalization" for node in model.graph.node),
                      obstacle=shape if isinstance(shape, str) else None, classifier=classifier,
                      macs=multiply_accumulates(model), tokens=has_token_layers(model),
                      images=not isinstance(shape, str) and len(shape) == 4)


def has_token_layers(model: onnx.ModelProto) -> bool:
    """Whether some MatMul multiplies by a constant 2-D weight an input whose inferred output has rank 3 or more
    (batch x tokens x features): a linear layer applied at every token, as transformers have."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.value_info, *model.graph.output]
             if v.type.tensor_type.HasField("shape")}
    weights = {name: len(t.dims) for name, t in constant_tensors(model).items()}
    return any(node.op_type == "MatMul" and len(node.input) == 2 and weights.get(node.input[1]) == 2
               and ranks.get(node.output[0], 0) >= 3 for node in model.graph.node)


def multiply_accumulates(model: onnx.ModelProto) -> float | None:
    """Multiply-accumulates per input of the model's Conv, Gemm and MatMul nodes, from the inferred
    shapes of their outputs and weights; None if a shape is unknown."""
    shapes = {v.name: declared_shape(v) for v in [*model.graph.value_info, *model.graph.output]}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        out, weight = shapes.get(node.output[0]), weights.get(node.input[1])
        if out is None or weight is None or not all(isinstance(d, int) for d in out[1:]):
            return None
        fan_in = int(np.prod(weight[1:])) if node.op_type == "Conv" else int(np.prod(weight)) // int(out[-1])
        total += float(np.prod(out[1:])) * fan_in
    return total



COMMON_SIZES = ((224, 224), (32, 32), (48, 320), (64, 64), (96, 96), (128, 128), (256, 256), (299, 299),
                (320, 320), (384, 384), (512, 512))
"""Spatial sizes tried, in this order, for an image input whose height or width is dynamic."""


def find_static_shape(model: onnx.ModelProto, weights: dict[str, np.ndarray],
                      shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """``shapes`` with, for the model's one input when its dims after the batch are dynamic and no
    ``--input-shape`` gave them, the first of ``COMMON_SIZES`` the model runs with in onnxruntime; and a
    note saying which (None when nothing was searched). InputError when none runs."""
    inputs = model_inputs(model)
    if len(inputs) != 1 or inputs[0].name in shapes:
        return shapes, None
    declared = declared_shape(inputs[0])
    if len(declared) < 2 or all(isinstance(d, int) for d in declared[1:]):
        return shapes, None
    shown = ",".join(str(d) if isinstance(d, int) else "?" for d in declared)
    if len(declared) != 4 or not all(isinstance(d, int) for d in declared[1:2]):
        raise InputError(f"input '{inputs[0].name}' has the dynamic shape {shown}: give one with --input-shape")
    session = model_session(model, ["CPUExecutionProvider"], weights)
    dtype = np.float16 if inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    for size in COMMON_SIZES:
        candidate = (1, declared[1]) + tuple(d if isinstance(d, int) else s for d, s in zip(declared[2:], size))
        try:
            session.run(None, {inputs[0].name: np.zeros(candidate, dtype)})
        except Exception:  # onnxruntime's many error types: this size does not fit the model
            continue
        return {**shapes, inputs[0].name: candidate}, (
            f"input shape {shown} is dynamic: used {','.join(map(str, candidate))}, the first common size the model "
            "runs with (give the size it was trained on with --input-shape)")
    raise InputError(f"input '{inputs[0].name}' has the dynamic shape {shown} and runs with none of the common sizes: "
                     "give one with --input-shape")

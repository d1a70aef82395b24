"""Stage 1: read an ONNX model and refuse, with one clear sentence, anything unusable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from .errors import InputError, first_line

MIN_OPSET = 7


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load and validate a model: external data, opset, checker, finite weights, shapes.

    External data is resolved only inside the model's own folder. The returned
    model carries inferred shapes in ``graph.value_info``.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base_dir = None
        label = "model"
    else:
        path = Path(source)
        label = str(path)
        model = _read_proto(path)
        base_dir = path.resolve().parent
    if not model.HasField("graph"):
        raise InputError(f"{label}: the file holds no graph")
    _load_external_data(model, base_dir, label)
    _check_opset(model, label)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise InputError(f"{label}: not a valid ONNX model: {first_line(err)}") from None
    _check_finite_weights(model, label)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # shape inference raises several unrelated types
        raise InputError(f"{label}: shape inference failed: {first_line(err)}") from None
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None
    if not data:
        raise InputError(f"{path}: the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as err:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed: {first_line(err)})") from None
    if not model.HasField("graph") and not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph, no opset)")
    return model


def _load_external_data(model: onnx.ModelProto, base_dir: Path | None, label: str) -> None:
    tensors = [t for t in _graph_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    if not tensors:
        return
    if base_dir is None:
        raise InputError(f"{label}: the model refers to external data; pass its path instead of a ModelProto")
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if location.is_absolute() or ".." in location.parts:
            raise InputError(f"{label}: external data location '{info.location}' of '{tensor.name}' is outside the model's folder")
        target = (base_dir / location).resolve()
        if base_dir not in target.parents:
            raise InputError(f"{label}: external data location '{info.location}' of '{tensor.name}' resolves outside the model's folder")
        if not target.is_file():
            raise InputError(f"{label}: external data file '{info.location}' of '{tensor.name}' is missing")
        needed = info.offset + info.length if info.length else info.offset
        if needed > target.stat().st_size:
            raise InputError(f"{label}: external data file '{info.location}' is shorter than '{tensor.name}' needs")
    try:
        external_data_helper.load_external_data_for_model(model, str(base_dir))
    except (OSError, ValueError) as err:
        raise InputError(f"{label}: cannot read external data: {first_line(err)}") from None


def _graph_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _check_opset(model: onnx.ModelProto, label: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise InputError(f"{label}: the model imports no version of the default ONNX opset")
    if not MIN_OPSET <= default[0] <= newest:
        raise InputError(f"{label}: opset {default[0]} is not supported (this tool reads opsets {MIN_OPSET} to {newest})")


def _check_finite_weights(model: onnx.ModelProto, label: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        values = numpy_helper.to_array(tensor)
        if not np.all(np.isfinite(values)):
            raise InputError(f"{label}: initializer '{tensor.name}' holds NaN or Inf values")


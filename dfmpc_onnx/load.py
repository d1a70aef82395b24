"""The load stage: read an ONNX model and refuse, with one clear sentence, anything unusable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from .errors import InputError, first_line

MIN_OPSET = 7


def load_whole_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """``load_model``, with the weights put back: the whole validated model, shapes inferred."""
    return with_weights(*load_model(source))


def with_weights(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``skeleton`` whose data-less initializers get their data from ``weights``."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.raw_data = numpy_helper.from_array(weights[tensor.name]).raw_data
    return model


def load_model(source: str | os.PathLike | onnx.ModelProto,
               min_bytes: int = 1 << 16) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Load and validate a model: external data, opset, checker, finite weights, shapes.

    Returns the skeleton, the model without the data of its large float initializers (at
    least ``min_bytes``; their entries stay, dims and type only), and that
    data as arrays, so that the weights are held once, as arrays, and the
    checker and shape inference work on kilobytes. External data is
    resolved only inside the model's own folder. The model carries inferred
    shapes in ``graph.value_info``.
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
    _check_opset(model, label)
    external = _check_external_data(model, base_dir, label)
    if external:
        _read_external_data(model, base_dir, label)
    weights = _take_weights(model, min_bytes, label)
    _check_names_are_text(model, label)  # after the weights are taken: it then walks kilobytes
    model = _checked_and_inferred(model, set(weights), label)
    _check_finite_weights(model, weights, label)
    _check_batchnorm_variance(model, label)
    return model, weights


def _take_weights(model: onnx.ModelProto, min_bytes: int, label: str) -> dict[str, np.ndarray]:
    """The large float initializers' data as arrays, cleared from ``model`` (one copy, no more)."""
    weights: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type not in FLOAT_TYPES or not tensor.HasField("raw_data") or _nbytes(tensor) < min_bytes:
            continue
        try:
            weights[tensor.name] = numpy_helper.to_array(tensor)
        except ValueError:  # raw_data of the wrong length for the dims
            raise InputError(f"{label}: not a valid ONNX model: initializer '{tensor.name}' holds "
                             f"{len(tensor.raw_data)} bytes of data, not the {_nbytes(tensor)} its shape needs") from None
        tensor.ClearField("raw_data")
    return weights


def _checked_and_inferred(model: onnx.ModelProto, held: set[str], label: str) -> onnx.ModelProto:
    """``onnx.checker`` and shape inference on ``model``, whose initializers named in ``held`` have no data.

    Both see those initializers as graph inputs of the same type and shape
    (as old exporters list them), so neither copies weights; the result has
    them back as data-less initializers, in their places.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    order = [t.name for t in probe.graph.initializer]
    emptied = {t.name: t for t in model.graph.initializer if t.name in held}
    declared = {i.name for i in probe.graph.input}
    kept = [t for t in probe.graph.initializer if t.name not in held]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    real_inputs = len(probe.graph.input)
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in emptied.values() if t.name not in declared)
    error = _checker_error(probe)
    if error:
        raise InputError(f"{label}: not a valid ONNX model: {error}")
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as err:  # shape inference raises several unrelated types
        raise InputError(f"{label}: shape inference failed: {first_line(err)}") from None
    del inferred.graph.input[real_inputs:]
    present = {t.name: t for t in inferred.graph.initializer}
    present.update(emptied)
    restored = [present[name] for name in order if name in present]
    del inferred.graph.initializer[:]
    inferred.graph.initializer.extend(restored)
    return inferred


def _check_names_are_text(model: onnx.ModelProto, label: str) -> None:
    """Every string field of the model must be UTF-8: protobuf hands invalid ones over as bytes, which
    the checker lets through and nothing downstream can use (found by tools/fuzz.py)."""
    if not _strings_are_text(model):
        raise InputError(f"{label}: not a valid ONNX model: a name or string is not valid UTF-8 text")


def _strings_are_text(message) -> bool:
    for field, value in message.ListFields():
        repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; older ones only have ``label``
        repeated = field.label == field.LABEL_REPEATED if repeated is None else repeated
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING and any(not isinstance(v, str) for v in values):
            return False
        if field.type == field.TYPE_MESSAGE and not all(_strings_are_text(v) for v in values):
            return False
    return True


def _checker_error(model: onnx.ModelProto) -> str | None:
    """``onnx.checker``'s first complaint about a model, or None."""
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # ValidationError, or ValueError for in-memory models over 2 GiB
        return first_line(err)
    return None


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return count


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


def _check_external_data(model: onnx.ModelProto, base_dir: Path | None, label: str) -> bool:
    """Refuse external data outside the model's folder, missing or short; True if there is any."""
    tensors = [t for t in _graph_tensors(model.graph) if external_data_helper.uses_external_data(t)]
    if not tensors:
        return False
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
    return True


def external_data_files(model: onnx.ModelProto, base_dir: Path) -> set[Path]:
    """The resolved paths of the files that ``model``'s tensors keep external data in."""
    return {(base_dir / external_data_helper.ExternalDataInfo(t).location).resolve()
            for t in _graph_tensors(model.graph) if external_data_helper.uses_external_data(t)}


def _read_external_data(model: onnx.ModelProto, base_dir: Path, label: str) -> None:
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


def _check_batchnorm_variance(model: onnx.ModelProto, label: str) -> None:
    """Refuse a BatchNormalization whose var + epsilon is not positive: the float model divides by zero."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) < 5 or node.input[4] not in initializers:
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        var = numpy_helper.to_array(initializers[node.input[4]]).astype(np.float64)
        if np.any(var + epsilon <= 0):
            kind = "zero variance and zero epsilon" if np.all(var >= 0) else "negative variance"
            raise InputError(f"{label}: BatchNormalization '{node.name}' has {kind}: the model divides by zero "
                             "or takes the root of a negative number")


def _check_finite_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray], label: str) -> None:
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and tensor.name not in weights:
            weights_or_small = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(weights_or_small)):
                raise InputError(f"{label}: initializer '{tensor.name}' holds NaN or Inf values")
    for name, values in weights.items():
        if not np.isfinite(values).all():
            raise InputError(f"{label}: initializer '{name}' holds NaN or Inf values")


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constants by the name nodes read them under: its initializers and the value of each
    Constant node (exporters write weights either way)."""
    found = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    return found


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain that ``model`` imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

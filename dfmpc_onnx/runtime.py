"""Every onnxruntime session the tool makes: providers, IR version and opsets, options, and what an error means.

Two kinds of model go to onnxruntime. The user's models (the input, for the reference run, and the
quantized output, for the check) are loaded by ``model_session``; an error there is about the model, and
the caller says so (exit 2 for the input, 3 for the output). Graphs the tool builds from the model for
itself (statistics cuts, sensitivity probes, constant folding) are loaded by ``graph_session`` and run
inside ``own_graph``: the input model ran, so an error there is a bug in this tool (exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import external_data_helper
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .errors import InputError, InternalError, first_line

ORT_ERRORS = tuple(getattr(_ort_state, name) for name in dir(_ort_state)
                   if isinstance(getattr(_ort_state, name), type) and issubclass(getattr(_ort_state, name), Exception))
"""The exception types onnxruntime raises for models it cannot load or run."""

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROTOBUF_LIMIT = 2**31 - 1


def resolve_providers(names: list[str] | tuple[str, ...]) -> list[str]:
    """Map 'cpu'/'cuda' (or full provider names) to available onnxruntime providers, CPU last."""
    available = ort.get_available_providers()
    chosen = []
    for name in names:
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full not in available:
            raise InputError(f"execution provider '{name}' is not available here (available: {', '.join(available)})")
        chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(lean: bool = False) -> ort.SessionOptions:
    """Options that log nothing (errors come back as exceptions; ours is the one line the user sees).

    ``lean``: for one small batch through a large model, no fused or pre-packed copies of the weights
    and no memory arena."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    return options


def loadable_ir_version(model: onnx.ModelProto, preferred: int) -> int:
    """``preferred`` lowered to what the installed onnxruntime reads, raised to what the opsets need."""
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(needed, min(preferred, onnxruntime_max_ir_version()))


@functools.lru_cache(maxsize=1)
def onnxruntime_max_ir_version() -> int:
    """The newest IR version the installed onnxruntime loads, found by loading an empty Identity model."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir_version in range(onnx.IR_VERSION, 3, -1):
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=ir_version)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir_version
        except Exception:  # onnxruntime reports an unsupported IR version as a generic failure
            continue
    return 7


def with_header_of(model: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` given ``like``'s opsets and the IR version onnxruntime loads for them, in place."""
    opsets, ir_version = list(like.opset_import), loadable_ir_version(like, like.ir_version)
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    model.ir_version = ir_version
    return model


def model_session(model: onnx.ModelProto, providers: list[str], weights: dict[str, np.ndarray] | None = None
                  ) -> ort.InferenceSession:
    """A lean session on a user's model (the input or the quantized output), raising onnxruntime's error.

    ``weights`` are the values of initializers that ``model`` holds without data (``load.load_model``):
    onnxruntime reads them in place, so the weights are not copied. Models over protobuf's 2 GiB limit
    go through a temporary folder."""
    options = session_options(lean=True)
    model = _loadable_copy(model, weights or {})
    if weights:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[name])) for name in weights]
        options.add_external_initializers(list(weights), values)
    with tempfile.TemporaryDirectory(prefix="dfmpc-session-") as folder:
        return ort.InferenceSession(session_source(model, folder), options, providers=providers)


def _loadable_copy(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` at an IR version onnxruntime loads, whose data-less initializers in ``weights``
    point at data held in memory."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = loadable_ir_version(copy, copy.ir_version)
    for tensor in copy.graph.initializer:
        if tensor.name in weights:  # a placeholder that add_external_initializers overrides
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="held-in-memory")
    return copy


def session_source(model: onnx.ModelProto, folder: str) -> str | bytes:
    """What InferenceSession takes: a model as bytes or, over 2 GiB, saved with external data into ``folder``."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        return model.SerializeToString()
    name = f"model{len(os.listdir(folder))}.onnx"
    path = os.path.join(folder, name)
    onnx.save_model(model, path, save_as_external_data=True, location=f"{name}.data")
    external_data_helper.load_external_data_for_model(model, folder)  # saving moved the data out of ``model``
    return path


def graph_session(graph: gs.Graph | onnx.ModelProto, like: onnx.ModelProto, purpose: str,
                  providers: list[str] | None = None) -> ort.InferenceSession:
    """A session (CPU unless ``providers`` says otherwise) on a graph the tool built from ``like`` (a gs
    graph is cleaned up and exported first), at ``like``'s opsets. An error is a bug in this tool
    (``own_graph``)."""
    if isinstance(graph, gs.Graph):
        graph = gs.export_onnx(graph.cleanup(), do_type_check=False)
    model = with_header_of(graph, like)
    with own_graph(purpose):
        return ort.InferenceSession(model.SerializeToString(), session_options(),
                                    providers=providers or ["CPUExecutionProvider"])


@contextlib.contextmanager
def own_graph(purpose: str) -> Iterator[None]:
    """Turn an onnxruntime error in a graph the tool built (for ``purpose``) into an InternalError."""
    try:
        yield
    except ORT_ERRORS as err:
        raise InternalError(f"onnxruntime cannot run the graph built for {purpose} ({first_line(err)}); "
                            "this is a bug in dfmpc-onnx, please report it") from None


def run_in_chunks(session: ort.InferenceSession, output_names: list[str], input_name: str, inputs: np.ndarray,
                  chunk: int, feed: dict[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
    """``session`` on ``inputs`` ``chunk`` samples at a time, with ``feed`` besides: the outputs per chunk."""
    return [session.run(output_names, {input_name: inputs[start:start + chunk], **(feed or {})})
            for start in range(0, len(inputs), chunk)]

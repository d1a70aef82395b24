"""Stage 7: run the float and the quantized model in onnxruntime on the same random batch."""

from __future__ import annotations

from dataclasses import dataclass

import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .errors import CheckError, InputError, first_line

ORT_ERRORS = tuple(getattr(_ort_state, name) for name in dir(_ort_state)
                   if isinstance(getattr(_ort_state, name), type) and issubclass(getattr(_ort_state, name), Exception))
"""The exception types onnxruntime raises for models it cannot load or run."""

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    cosine: float
    sqnr_db: float


@dataclass(frozen=True)
class CheckResult:
    providers: tuple[str, ...]
    batch: int
    outputs: tuple[OutputAgreement, ...]


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


def random_feed(session: ort.InferenceSession, batch: int, seed: int,
                shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Standard normal float inputs (zeros for integer inputs) of the shapes in ``shapes``, else the model's,
    with dynamic dims set to ``batch`` for the first and 1 for the others."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in session.get_inputs():
        shape = list((shapes or {}).get(spec.name, ())) or [
            d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1) for i, d in enumerate(spec.shape)]
        dtype = _NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise CheckError(f"input '{spec.name}' has type {spec.type}, which the check cannot feed")
        if np.issubdtype(dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=dtype)
    return feed


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Cosine similarity and SQNR (dB) of ``candidate`` against ``reference``."""
    r = reference.astype(np.float64).ravel()
    c = candidate.astype(np.float64).ravel()
    norm = np.linalg.norm(r) * np.linalg.norm(c)
    cosine = float(r @ c / norm) if norm > 0 else float(np.array_equal(r, c))
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r**2))
    sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    return cosine, sqnr


@dataclass(frozen=True)
class ReferenceRun:
    """The input model's outputs on one seeded random batch, computed before the model is quantized."""

    feed: dict[str, np.ndarray]
    outputs: tuple[tuple[str, np.ndarray], ...]
    providers: tuple[str, ...]
    batch: int


def run_reference(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
                  providers: list[str] | tuple[str, ...] = ("cpu",), batch: int = 1, seed: int = 0,
                  shapes: dict[str, tuple[int, ...]] | None = None) -> ReferenceRun:
    """Run the input model in onnxruntime on one seeded random batch (``random_feed``).

    ``weights`` are the values of initializers that ``model`` holds without
    data (``load.load_split``); onnxruntime reads them in place, so the
    float weights are not copied. Raises InputError if onnxruntime cannot
    run the input model.
    """
    chosen = resolve_providers(providers)
    weights = weights or {}
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.ir_version = loadable_ir_version(reference, reference.ir_version)
    for tensor in reference.graph.initializer:
        if tensor.name in weights:  # a placeholder that add_external_initializers overrides
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="held-in-memory")
    options = _session_options()
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[name])) for name in weights]
    if weights:
        options.add_external_initializers(list(weights), values)
    with tempfile.TemporaryDirectory(prefix="dfmpc-check-") as folder:
        try:
            session = ort.InferenceSession(_session_source(reference, folder), options, providers=chosen)
        except Exception as err:
            raise InputError(f"onnxruntime cannot run the input model: {first_line(err)}") from None
    feed = random_feed(session, batch, seed, shapes)
    try:
        outputs = session.run(None, feed)
    except Exception as err:
        shown = "; ".join(f"{name} {list(value.shape)}" for name, value in feed.items())
        hint = " (set dynamic dims with --input-shape)" if any(
            not isinstance(d, int) or d <= 0 for spec in session.get_inputs() for d in spec.shape[1:]) else ""
        raise InputError(f"onnxruntime cannot run the input model on a random batch ({shown}): "
                         f"{first_line(err)}{hint}") from None
    names = [spec.name for spec in session.get_outputs()]
    first = next(iter(feed.values()), None)
    batch = first.shape[0] if first is not None and first.ndim else batch
    return ReferenceRun(feed, tuple(zip(names, map(np.asarray, outputs))), tuple(chosen), batch)


def check_with_onnxruntime(reference: ReferenceRun, candidate: onnx.ModelProto) -> CheckResult:
    """Check ``candidate`` with the ONNX checker, run it on the reference's batch and compare every output.

    Raises CheckError if the candidate fails the checker, does not load, does
    not run, or produces non-finite values where the reference does not.
    Models over protobuf's 2 GiB limit go through a temporary folder.
    """
    with tempfile.TemporaryDirectory(prefix="dfmpc-check-") as folder:
        source = _session_source(candidate, folder)
        try:
            onnx.checker.check_model(source if isinstance(source, str) else candidate)
        except onnx.checker.ValidationError as err:
            raise CheckError(f"the quantized model fails the ONNX checker: {first_line(err)}") from None
        try:
            session = ort.InferenceSession(source, _session_options(), providers=list(reference.providers))
        except Exception as err:
            raise CheckError(f"onnxruntime cannot load the quantized model: {first_line(err)}") from None
    try:
        outputs = session.run(None, reference.feed)
    except Exception as err:
        raise CheckError(f"onnxruntime cannot run the quantized model: {first_line(err)}") from None
    agreements = []
    for (name, r), c in zip(reference.outputs, outputs):
        c = np.asarray(c)
        if r.shape != c.shape:
            raise CheckError(f"output '{name}' has shape {c.shape}, the input model gives {r.shape}")
        if np.issubdtype(c.dtype, np.floating) and not np.all(np.isfinite(c)) and np.all(np.isfinite(r)):
            raise CheckError(f"the quantized model's output '{name}' holds NaN or Inf")
        cosine, sqnr = compare_outputs(r, c)
        agreements.append(OutputAgreement(name, cosine, sqnr))
    return CheckResult(providers=tuple(session.get_providers()), batch=reference.batch, outputs=tuple(agreements))


PROTOBUF_LIMIT = 2**31 - 1


def quiet_session_options() -> ort.SessionOptions:
    """Session options that log nothing: errors come back as exceptions; ours is the one line the user sees."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return options


def _session_options() -> ort.SessionOptions:
    options = quiet_session_options()
    # One small batch: no fused or pre-packed copies of the weights, no memory arena.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    return options


def _session_source(model: str | onnx.ModelProto, folder: str) -> str | bytes:
    """What InferenceSession takes: a path as it is, a model as bytes, or, over 2 GiB, saved with external data."""
    if isinstance(model, str):
        return model
    if model.ByteSize() < PROTOBUF_LIMIT:
        return model.SerializeToString()
    name = f"model{len(os.listdir(folder))}.onnx"
    path = os.path.join(folder, name)
    onnx.save_model(model, path, save_as_external_data=True, location=f"{name}.data")
    external_data_helper.load_external_data_for_model(model, folder)  # saving moved the data out of ``model``
    return path


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

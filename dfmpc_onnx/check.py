"""Stage 7: run the float and the quantized model in onnxruntime on the same random batch."""

from __future__ import annotations

from dataclasses import dataclass

import functools

import numpy as np
import onnx
import onnxruntime as ort

from .errors import CheckError, InputError, first_line

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


def random_feed(session: ort.InferenceSession, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Standard normal float inputs (zeros for integer inputs); dynamic dims: batch for the first, 1 otherwise."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1) for i, d in enumerate(spec.shape)]
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


def check_with_onnxruntime(reference: bytes, candidate: bytes, providers: list[str] | tuple[str, ...] = ("cpu",),
                           batch: int = 1, seed: int = 0) -> CheckResult:
    """Load both serialized models, run them on one seeded random batch and compare every output.

    Raises CheckError if the candidate does not load, does not run, or
    produces non-finite values where the reference does not.
    """
    chosen = resolve_providers(providers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ref_session = ort.InferenceSession(reference, options, providers=chosen)
    except Exception as err:
        raise InputError(f"onnxruntime cannot run the input model: {first_line(err)}") from None
    try:
        cand_session = ort.InferenceSession(candidate, options, providers=chosen)
    except Exception as err:
        raise CheckError(f"onnxruntime cannot load the quantized model: {first_line(err)}") from None
    feed = random_feed(ref_session, batch, seed)
    try:
        ref_out = ref_session.run(None, feed)
    except Exception as err:
        raise InputError(f"onnxruntime cannot run the input model on a random batch: {first_line(err)}") from None
    try:
        cand_out = cand_session.run(None, feed)
    except Exception as err:
        raise CheckError(f"onnxruntime cannot run the quantized model: {first_line(err)}") from None
    agreements = []
    for spec, r, c in zip(ref_session.get_outputs(), ref_out, cand_out):
        r, c = np.asarray(r), np.asarray(c)
        if r.shape != c.shape:
            raise CheckError(f"output '{spec.name}' has shape {c.shape}, the input model gives {r.shape}")
        if np.issubdtype(c.dtype, np.floating) and not np.all(np.isfinite(c)) and np.all(np.isfinite(r)):
            raise CheckError(f"the quantized model's output '{spec.name}' holds NaN or Inf")
        cosine, sqnr = compare_outputs(r, c)
        agreements.append(OutputAgreement(spec.name, cosine, sqnr))
    return CheckResult(providers=tuple(cand_session.get_providers()), batch=batch, outputs=tuple(agreements))


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

"""The check stage: the float and the quantized model in onnxruntime on the same seeded random batch."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .errors import CheckError, InputError, first_line
from .maths.quantizers import decibels
from .fidelity import Fidelity, measure_fidelity, run_batches
from .runtime import model_session, resolve_providers, session_options, session_source

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
    fidelity: Fidelity | None = None
    """The two models on the tool's synthetic inputs (None when the model cannot take them)."""


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
    return cosine, decibels(signal, noise)


@dataclass(frozen=True)
class ReferenceRun:
    """The input model's outputs on one seeded random batch, computed before the model is quantized."""

    feed: dict[str, np.ndarray]
    outputs: tuple[tuple[str, np.ndarray], ...]
    providers: tuple[str, ...]
    batch: int
    synthetic: tuple[np.ndarray, str, list[np.ndarray]] | None = None
    """(synthetic inputs, what they are, the float model's outputs on them)."""


def run_reference(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
                  providers: list[str] | tuple[str, ...] = ("cpu",), batch: int = 1,
                  shapes: dict[str, tuple[int, ...]] | None = None,
                  synthetic: tuple[np.ndarray, str] | None = None, seed: int = 0) -> ReferenceRun:
    """Run the input model in onnxruntime on one seeded random batch (``random_feed``), and on the
    ``synthetic`` inputs (array, what they are) if any.

    ``weights`` are the values of initializers that ``model`` holds without data (``load.load_model``);
    onnxruntime reads them in place. Raises InputError if onnxruntime cannot run the input model.
    """
    chosen = resolve_providers(providers)
    try:
        session = model_session(model, chosen, weights)
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
    if synthetic is not None:
        try:
            synthetic = (*synthetic, run_batches(session, synthetic[0]))
        except Exception as err:
            raise InputError(f"onnxruntime cannot run the input model on the {synthetic[1]}: {first_line(err)}") from None
    return ReferenceRun(feed, tuple(zip(names, map(np.asarray, outputs))), tuple(chosen), batch, synthetic)


def check_model(reference: ReferenceRun, candidate: onnx.ModelProto, min_agreement: float | None = None
                ) -> CheckResult:
    """Check ``candidate`` with the ONNX checker, run it on the reference's batch and compare every output,
    then measure its fidelity on the synthetic inputs.

    Raises CheckError (holding the candidate, for ``--keep-failed``) if the candidate fails the checker,
    does not load, does not run, produces non-finite values where the reference does not, or agrees with
    the float model's top-1 on less than ``min_agreement`` percent of the synthetic inputs.
    """
    try:
        result = _compare(reference, candidate)
        agreement = result.fidelity.top1_agreement if result.fidelity else None
        if min_agreement is not None and agreement is not None and agreement < min_agreement:
            raise CheckError(f"the quantized model agrees with the float model's top-1 on {agreement:.1f} % of the "
                             f"{result.fidelity.inputs}, below --min-agreement {min_agreement:g}")
        return result
    except CheckError as err:
        err.model = candidate
        raise


def _compare(reference: ReferenceRun, candidate: onnx.ModelProto) -> CheckResult:
    with tempfile.TemporaryDirectory(prefix="dfmpc-check-") as folder:
        source = session_source(candidate, folder)
        try:
            onnx.checker.check_model(source if isinstance(source, str) else candidate)
        except onnx.checker.ValidationError as err:
            raise CheckError(f"the quantized model fails the ONNX checker: {first_line(err)}") from None
        try:
            session = ort.InferenceSession(source, session_options(lean=True), providers=list(reference.providers))
        except Exception as err:
            raise CheckError(f"onnxruntime cannot load the quantized model: {first_line(err)}") from None
    types = {spec.name: _NUMPY_TYPES.get(spec.type) for spec in session.get_inputs()}
    feed = {name: value.astype(types.get(name) or value.dtype) for name, value in reference.feed.items()}
    try:
        outputs = session.run(None, feed)
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
    fidelity = None
    if reference.synthetic is not None:
        inputs, label, float_outputs = reference.synthetic
        try:
            quantized_outputs = run_batches(session, inputs)
        except Exception as err:
            raise CheckError(f"onnxruntime cannot run the quantized model on the {label}: {first_line(err)}") from None
        fidelity = measure_fidelity(float_outputs, quantized_outputs, [name for name, _ in reference.outputs], label)
    return CheckResult(tuple(session.get_providers()), reference.batch, tuple(agreements), fidelity)

"""The public entry points: ``quantize`` (model in, model and report out) and ``quantize_file``.

The pipeline runs each stage once, in order:
load -> fold BatchNorm -> find pairs -> quantize -> solve compensation -> emit -> check.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from .check import (ORT_ERRORS, PROTOBUF_LIMIT, check_with_onnxruntime, loadable_ir_version, resolve_providers,
                    run_reference)
from .allocate import WIDTHS, greedy_allocation, make_units, unit_bits
from .compensation import solve_compensation
from .distill import distill_inputs
from .emit import effective_weights, emit_float, emit_qdq, storage_opset
from .errors import CheckError, InputError, first_line
from .fold import fold_batchnorm
from .graph import Layer, find_layers, from_rows, import_graph, to_rows
from .load import external_data_files, load_split, with_weights
from .pairs import Pair, find_pairs
from .plan import QuantizedLayer, Scheme, assign_roles
from .quantizers import KBIT_RANGES, TERNARY_THRESHOLDS, QuantizedWeight, quantize_rows
from .refine import activation_statistics, correct_bias, expected_input, match_statistics
from .relu6 import batchnorm_statistics, relu6_clips, replace_rare_clips
from .report import LayerReport, Report, initializer_bytes, stored_bits_per_weight
from .sensitivity import output_probe
from .synthetic import synthetic_batch

FORMATS = ("qdq", "float")
REFINEMENTS = ("auto", "none", "bias", "stats", "refit")
RELU6 = ("refuse", "pair", "relu")
SYNTHETIC = ("auto", "noise", "pink", "distill")
GRANULARITIES = ("auto", "tensor", "channel")
COLLECT_ABOVE_BYTES = 256 << 20
"""Weights from which each stage ends with a garbage collection: below it, the replaced weights that
wait for the cycle collector cost less memory than the collections cost time."""


def required_opset(scheme: Scheme) -> int:
    """The opset whose DequantizeLinear accepts the storage types of ``scheme`` (INT2 and UINT2: 25, INT4: 21)."""
    return max(storage_opset(scheme.low), storage_opset(scheme.high))


def quantize(
    model: str | os.PathLike | onnx.ModelProto,
    scheme: str | Scheme = "2/6",
    *,
    format: str = "qdq",
    granularity: str = "auto",
    ternary_threshold: str = "auto",
    kbit_range: str = "max",
    lambda1: float = 0.5,
    lambda2: float = 0.0,
    compensate: bool = True,
    placement: str = "producer",
    refine: str = "auto",
    synthetic: str = "auto",
    samples: int = 64,
    seed: int = 0,
    synthetic_inputs: np.ndarray | None = None,
    relu6: str = "refuse",
    target_bits: float | None = None,
    keep_first: bool = True,
    keep_last: bool = True,
    exclude: tuple[str, ...] | list[str] = (),
    check: bool = True,
    providers: tuple[str, ...] | list[str] = ("cpu",),
    check_batch: int = 1,
    input_shapes: dict[str | None, Sequence[int]] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Quantize a float ONNX CNN with DF-MPC and return (quantized model, report).

    ``scheme`` is LOW/HIGH bits ("2/6": ternary producers, 6-bit consumers).
    ``ternary_threshold`` "twn" is Delta = 0.7 mean|W| (Eq. 4), "optimal" the
    exact minimiser of the ternary error, "auto" (default) "optimal" when
    the refinement is "refit" and "twn" otherwise (what the benchmark showed). ``format`` "qdq" stores integers
    with DequantizeLinear (compensation on the producer); "float" stores
    dequantized floats, with the compensation on the producer or, with
    ``placement="consumer"``, on the consumer (Eq. 7).
    ``compensate=False`` gives uncompensated rounding ("Original" in the paper).
    ``granularity`` "tensor" (the paper), "channel" or "auto" (default: per
    tensor for ternary, per channel for k-bit layers; ``per_channel_scales``);
    ``kbit_range`` "max" (Eq. 6) or "mse" (least-squares clipped range).
    ``refine="stats"`` then matches every quantized conv's per-channel output
    mean and variance to the float model's on ``samples`` synthetic inputs
    (``synthetic`` "pink", "noise" or "distill", seeded by ``seed``);
    ``refine="refit"`` first re-solves each pair consumer by ridge least
    squares on those inputs (worth it on distilled inputs only);
    ``refine="bias"`` is BatchNorm-statistics bias correction;
    ``refine="none"`` is the paper's method alone. The defaults, "auto", are
    the best this installation can do: "refit" on "distill"ed inputs when
    PyTorch is installed and the model keeps BatchNormalization statistics,
    else "stats" on "pink" noise; the report says which ran.
    ``relu6`` says what a Clip(0, hi) (ReLU6) between producer and consumer
    does: "refuse" ends the chain; "pair" passes it (exact, as c sits on the
    producer); "relu" first replaces each Clip whose input statistics (from
    BatchNorm, or the synthetic inputs) say it is rarely reached by a Relu.
    ``target_bits`` replaces the scheme's two widths by a choice per pair and
    per unpaired layer (``allocate.py``) that averages at most that many
    stored integer bits per quantized weight, by an inference-only greedy
    search on the synthetic inputs; the report's notes give the allocation.
    ``synthetic_inputs`` (samples x input shape) replaces the generated
    inputs, e.g. to distill once and reuse. ``input_shapes`` maps input
    names (or None, for a model's only input) to the shape that the check and
    the synthetic inputs use where the model's dims are dynamic; the output
    keeps the model's own dims. ``log`` receives progress lines.
    Raises InputError for unusable input, CheckError if onnxruntime rejects the result.
    """
    say = log or (lambda message: None)
    scheme = scheme if isinstance(scheme, Scheme) else _parse_scheme(scheme)
    _validate_options(format, granularity, lambda1, lambda2, placement, check_batch)
    _validate_refinement(refine, synthetic, samples)
    if kbit_range not in KBIT_RANGES:
        raise InputError(f"--kbit-range must be one of {', '.join(KBIT_RANGES)}, not '{kbit_range}'")
    if ternary_threshold not in TERNARY_THRESHOLDS + ("auto",):
        raise InputError(f"--ternary-threshold must be one of auto, {', '.join(TERNARY_THRESHOLDS)}")
    if placement != "producer" and (format == "qdq" or refine != "none" or relu6 == "pair"):
        raise InputError("--placement consumer needs --format float and --refine none, and refuses --relu6 pair "
                         "(c on the consumer would move the clip point)")
    if relu6 not in RELU6:
        raise InputError(f"--relu6 must be one of {', '.join(RELU6)}, not '{relu6}'")
    if target_bits is not None and not (np.isfinite(target_bits) and min(WIDTHS) <= target_bits <= max(WIDTHS)):
        raise InputError(f"--target-bits must be between {min(WIDTHS)} and {max(WIDTHS)}")
    if target_bits is not None and format != "qdq":
        raise InputError("--target-bits needs --format qdq (the budget is stored bits)")
    if check:
        resolve_providers(providers)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    collect = True

    def lap(stage: str) -> None:
        nonlocal clock
        if collect:
            # graphsurgeon's nodes and tensors refer to each other: replaced weights wait for the cycle collector
            gc.collect()
        now = time.perf_counter()
        timings[stage] = round(now - clock, 4)
        clock = now

    working, weights = load_split(model)
    shapes = resolve_input_shapes(working, input_shapes or {})
    auto_synthetic = synthetic == "auto"
    synthetic = resolve_synthetic(synthetic, working)
    refine = resolve_refine(refine, synthetic)
    ternary_threshold = resolve_ternary_threshold(ternary_threshold, refine)
    label = str(model) if not isinstance(model, onnx.ModelProto) else (working.graph.name or "model")
    opset_in = _default_opset(working)
    weight_bytes_before = initializer_bytes(working)
    collect = weight_bytes_before >= COLLECT_ABOVE_BYTES
    notes: list[str] = []
    inputs = None
    if refine in ("stats", "refit") or target_bits is not None:
        # Made before anything changes the model: distillation needs its BatchNormalization nodes.
        asked = refine
        inputs, refine, synthetic = _synthetic_inputs(working, weights, shapes, refine, synthetic, auto_synthetic,
                                                      samples, seed, synthetic_inputs, notes, say)
        refine = "none" if asked == "none" else refine
        if inputs is None and target_bits is not None:
            raise InputError(f"--target-bits needs synthetic inputs: {notes.pop()}")
    reference_run = run_reference(working, weights, providers, check_batch, shapes=shapes) if check else None
    needed = required_opset(scheme) if target_bits is None else max(storage_opset(b) for b in WIDTHS)
    if format == "qdq" and opset_in < needed:
        target = needed
        working = _upgrade_opset(working, target)
        widths = str(scheme) if target_bits is None else "--target-bits"
        notes.append(f"opset upgraded from {opset_in} to {target} for the integer storage types of {widths} qdq")
    lap("load")

    graph = import_graph(working, weights)
    del weights
    folding = fold_batchnorm(graph)
    replaced_clips = _relax_relu6(graph, folding.preactivation, working, inputs, notes) if relu6 == "relu" else []
    lap("fold")

    layers, left_float = find_layers(graph)
    if not layers and not left_float:
        raise InputError(f"{label}: the model has no Conv, Gemm or MatMul layer: nothing to quantize")
    unknown = [name for name in exclude if name not in layers and name not in left_float]
    if unknown:
        raise InputError(f"--exclude: no Conv, Gemm or MatMul named {', '.join(repr(n) for n in unknown)}")
    for name in exclude:
        if name in layers:
            left_float[name] = "excluded (--exclude)"
            del layers[name]
    fixed = _fixed_layers(list(layers), keep_first, keep_last)
    search = find_pairs(graph, layers, fixed, relu6)
    roles = assign_roles(list(layers), search.pairs)
    lap("pairs")

    rows = {name: to_rows(layer.weight, layer.out_axis) for name, layer in layers.items()}
    quantizer = lambda name, b: quantize_rows(rows[name], b, per_channel_scales(granularity, b), ternary_threshold,
                                              kbit_range)
    compensator = lambda name, q: solve_compensation(rows[name], q.dequantize(), layers[name].bias, lambda1, lambda2)
    if target_bits is None:
        bits = {name: scheme.low if roles[name][0] == "low" else scheme.high for name in layers}
    else:
        bits = _allocate(graph, working, layers, search.pairs, inputs, target_bits, quantizer,
                         compensator if compensate else None, notes, say)
    per_channel = {name: per_channel_scales(granularity, bits[name]) for name in layers}
    quantized = {name: quantizer(name, bits[name]) for name in layers}
    lap("quantize")

    compensation = {}
    if compensate:
        for pair in search.pairs:
            compensation[pair.producer] = compensator(pair.producer, quantized[pair.producer])
    qlayers = {name: QuantizedLayer(layer, roles[name][0], roles[name][1], quantized[name], compensation.get(name))
               for name, layer in layers.items()}
    lap("solve")

    if refine != "none" and qlayers:
        qlayers = _refine(graph, qlayers, folding.preactivation, working, bits, per_channel, kbit_range, refine,
                          inputs, say)
        lap("refine")

    if format == "qdq":
        emit_qdq(graph, qlayers)
    else:
        emit_float(graph, qlayers, search.pairs, placement)
    result = _export(graph, working)
    lap("emit")

    layer_reports = _layer_reports(graph, qlayers, left_float)
    del graph, qlayers, layers, rows, quantized  # the float weights are no longer needed
    check_result = None
    if check:
        try:
            check_result = check_with_onnxruntime(reference_run, result)
        except CheckError as err:
            err.model = result
            raise
        lap("check")

    report = Report(
        input=label, scheme=str(scheme) if target_bits is None else f"target {target_bits:g} bits", format=format, granularity=granularity,
        ternary_threshold=ternary_threshold, lambda1=lambda1, lambda2=lambda2,
        compensation=compensate, placement=placement, refine=refine,
        synthetic=synthetic if refine in ("stats", "refit") else None,
        samples=samples if refine in ("stats", "refit") else None,
        seed=seed, opset_in=opset_in, opset_out=_default_opset(result),
        layers=layer_reports,
        pairs=list(search.pairs), refusals=list(search.refusals),
        folded_batchnorm=list(folding.folded), kept_batchnorm=list(folding.kept),
        weight_bytes_before=weight_bytes_before, weight_bytes_after=initializer_bytes(result),
        relu6=relu6, kbit_range=kbit_range, stored_bits=stored_bits_per_weight(result), replaced_clips=replaced_clips, notes=notes, check=check_result, timings=timings)
    if not search.pairs:
        report.notes.append("no quantizable pair: every layer was quantized at the HIGH bit width")
    return result, report


def quantize_file(source: str | os.PathLike, destination: str | os.PathLike, *,
                  external_data: bool | None = None, keep_failed: bool = False, **options) -> Report:
    """``quantize`` a file and write the result atomically; the input is never touched.

    The output path is validated before any work, and on any failure no
    output file is left behind, except that ``keep_failed`` writes a model
    that failed the onnxruntime check before the CheckError propagates.
    ``external_data`` stores the weights in DESTINATION.data beside it;
    None (default) does so only when the model exceeds protobuf's 2 GiB.
    """
    source, destination = Path(source), Path(destination)
    check_output_path(source, destination)
    try:
        model, report = quantize(source, **options)
    except CheckError as err:
        if keep_failed and err.model is not None:
            save_model_atomic(err.model, destination, external_data)
        raise
    if save_model_atomic(model, destination, external_data):
        report.notes.append(f"weights written as external data to {external_data_path(destination).name}")
    return report


def external_data_path(destination: Path) -> Path:
    """Where ``save_model_atomic`` puts the weights of a model saved with external data."""
    return destination.with_name(destination.name + ".data")


def check_output_path(source: Path, destination: Path) -> None:
    """Refuse an output that is the input, a folder, or in a folder that is missing or not writable."""
    if destination.exists() and source.exists() and os.path.samefile(source, destination):
        raise InputError(f"{destination}: output path is the input file; choose another name")
    if destination.is_dir():
        raise InputError(f"{destination}: output path is a folder")
    data = external_data_path(destination)
    if data.exists() and source.exists() and (os.path.samefile(source, data) or _uses_file(source, data)):
        raise InputError(f"{destination}: its external data file {data.name} belongs to the input; choose another name")
    folder = destination.resolve().parent
    if not folder.is_dir():
        raise InputError(f"{destination}: output folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(f"{destination}: output folder {folder} is not writable ({err.strerror})") from None


def _uses_file(model_path: Path, data: Path) -> bool:
    """Whether the model at ``model_path`` keeps external data in the file ``data``."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # an unreadable input is refused, with its reason, when it is loaded
        return False
    return data.resolve() in external_data_files(model, model_path.resolve().parent)


def save_model_atomic(model: onnx.ModelProto, destination: str | os.PathLike,
                      external_data: bool | None = None) -> bool:
    """Write to temporary files in the destination folder, then rename them into place.

    With external data (``external_data`` True, or None and the model over
    protobuf's 2 GiB limit) the weights go to DESTINATION.data, renamed into
    place before the model. Returns whether external data was written.
    """
    destination = Path(destination)
    folder = destination.resolve().parent
    # the weights' bytes, not ByteSize(): that walks the whole message, as long as serializing it
    external = external_data if external_data is not None else initializer_bytes(model) >= PROTOBUF_LIMIT - (64 << 20)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=folder))
    except OSError as err:
        raise InputError(f"{destination}: cannot write: {err.strerror}") from None
    try:
        staged = workdir / destination.name
        if external:
            data = external_data_path(destination)
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            external = (workdir / data.name).exists()  # False when no tensor reached the 1 KiB threshold
            if external:
                os.replace(workdir / data.name, data)
        else:
            with open(staged, "wb") as stream:
                stream.write(model.SerializeToString())
        os.replace(staged, destination)
    except OSError as err:
        raise InputError(f"{destination}: cannot write: {err.strerror}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return external


def _parse_scheme(text: str) -> Scheme:
    try:
        return Scheme.parse(text)
    except ValueError as err:
        raise InputError(f"--scheme: {err}") from None


def per_channel_scales(granularity: str, bits: int) -> bool:
    """Whether a layer quantized to ``bits`` gets one quantizer scale per output channel.

    "tensor" (the paper) and "channel" apply to every layer; "auto" (default)
    is per tensor for ternary layers and per channel for k-bit ones (k >= 3).
    Measured (README): per channel costs ternary layers accuracy on the
    CIFAR ResNets, while k-bit layers gain from it, and a lot in models whose
    folded BatchNorm leaves channel ranges orders of magnitude apart
    (EfficientNet-Lite0 at 8/8: 73 % per tensor, 88 % per channel).
    """
    if granularity == "auto":
        return bits >= 3
    return granularity == "channel"


def _validate_options(format: str, granularity: str, lambda1: float, lambda2: float, placement: str,
                      check_batch: int) -> None:
    if format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not '{format}'")
    if granularity not in GRANULARITIES:
        raise InputError(f"--granularity must be one of {', '.join(GRANULARITIES)}, not '{granularity}'")
    if not (np.isfinite(lambda1) and np.isfinite(lambda2) and lambda1 >= 0 and lambda2 >= 0):
        raise InputError("--lambda1 and --lambda2 must be finite and non-negative")
    if placement not in ("producer", "consumer"):
        raise InputError(f"--placement must be producer or consumer, not '{placement}'")
    if check_batch < 1:
        raise InputError("--check-batch must be at least 1")


def _validate_refinement(refine: str, synthetic: str, samples: int) -> None:
    if refine not in REFINEMENTS:
        raise InputError(f"--refine must be one of {', '.join(REFINEMENTS)}, not '{refine}'")
    if synthetic not in SYNTHETIC:
        raise InputError(f"--synthetic must be one of {', '.join(SYNTHETIC)}, not '{synthetic}'")
    if samples < 2:
        raise InputError("--samples must be at least 2")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers (old exporters list both)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _declared_shape(value: onnx.ValueInfoProto) -> list:
    """An input's dims: ints where static, the dim's name or None where dynamic."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in dims]


def resolve_input_shapes(model: onnx.ModelProto, given: dict[str | None, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """``given`` (``--input-shape``) checked against the model's inputs, keyed by input name.

    A None key names the model's only input. Each shape must have the input's
    rank, positive dims, and agree with every static dim of the input.
    """
    inputs = {value.name: value for value in _graph_inputs(model)}
    shapes = {}
    for name, dims in given.items():
        if name is None:
            if len(inputs) != 1:
                raise InputError(f"--input-shape: the model has {len(inputs)} inputs "
                                 f"({', '.join(inputs)}); write NAME:DIMS")
            name = next(iter(inputs))
        if name not in inputs:
            raise InputError(f"--input-shape: the model has no input '{name}' (inputs: {', '.join(inputs)})")
        declared = _declared_shape(inputs[name])
        dims = tuple(int(d) for d in dims)
        if len(dims) != len(declared) or min(dims, default=1) <= 0 or any(
                isinstance(d, int) and d != g for d, g in zip(declared, dims)):
            shown = ",".join(str(d) if d else "?" for d in declared)
            raise InputError(f"--input-shape: {','.join(map(str, dims))} does not fit input '{name}' of shape "
                             f"{shown}")
        shapes[name] = dims
    return shapes


def _model_input_shape(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list:
    """The first input's shape, with ``--input-shape`` dims where the model's are dynamic."""
    value = _graph_inputs(model)[0]
    return list(shapes.get(value.name, _declared_shape(value)))


def _refinement_obstacle(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why statistics matching cannot run on this model, or None."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return f"it needs one float input, the model has {len(inputs)} inputs"
    shape = _model_input_shape(model, shapes)
    if len(shape) < 2 or any(not isinstance(d, int) for d in shape[1:]):
        shown = ",".join(str(d) if isinstance(d, int) else "?" for d in shape)
        return f"input shape {shown} is dynamic after the batch dim (give one with --input-shape)"
    return None


def make_synthetic_inputs(model: onnx.ModelProto, input_shape: list, synthetic: str, samples: int, seed: int,
                          log: Callable[[str], None] | None = None) -> np.ndarray:
    """``samples`` seeded synthetic inputs for ``model``'s one input (of ``input_shape``, static after the
    batch dim): "noise", "pink" or "distill" (needs PyTorch)."""
    if synthetic == "distill":
        return distill_inputs(model, samples, seed, input_shape=input_shape[1:], log=log)
    return synthetic_batch(input_shape, synthetic, samples, seed)


def _chunk(graph: gs.Graph) -> int:
    """How many synthetic inputs one onnxruntime run takes: the static batch dim, else 32."""
    first = graph.inputs[0].shape[0] if graph.inputs[0].shape else None
    return int(first) if isinstance(first, (int, np.integer)) and first > 0 else 32


def _opset_model(working: onnx.ModelProto) -> onnx.ModelProto:
    """An empty model carrying ``working``'s opsets and an IR version onnxruntime loads."""
    reference = onnx.ModelProto()
    reference.opset_import.extend(working.opset_import)
    reference.ir_version = loadable_ir_version(working, working.ir_version)
    return reference


def _allocate(graph: gs.Graph, working: onnx.ModelProto, layers: dict[str, Layer], pairs: tuple[Pair, ...],
              inputs: np.ndarray, target_bits: float, quantizer: Callable[[str, int], QuantizedWeight],
              compensator: Callable[[str, QuantizedWeight], np.ndarray] | None, notes: list[str],
              say: Callable[[str], None]) -> dict[str, int]:
    """``--target-bits``: bits per layer from ``allocate.greedy_allocation``, each unit's output noise
    measured alone (paper compensation, no refinement) on ``inputs``."""
    units = make_units(list(layers), pairs)
    sizes = {name: int(layer.weight.size) for name, layer in layers.items()}
    try:
        probe = output_probe(graph, layers, inputs, _opset_model(working), _chunk(graph))
    except ORT_ERRORS as err:
        raise InputError(f"onnxruntime cannot run the input model for --target-bits ({first_line(err)})") from None
    cache: dict[tuple[str, int, bool], tuple[np.ndarray, np.ndarray | None]] = {}

    def weights(name: str, b: int, compensated: bool) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """The layer at ``b`` bits as it would compute, with the producer's c when ``compensated``."""
        if (name, b, compensated) not in cache:
            q, layer = quantizer(name, b), layers[name]
            c = compensator(name, q) if compensated and compensator is not None else None
            q, bias = effective_weights(QuantizedLayer(layer, "low" if compensated else "high", None, q, c))
            cache[name, b, compensated] = (from_rows(q.dequantize(), layer.weight.shape, layer.out_axis), bias)
        return {name: cache[name, b, compensated]}

    noise = {}
    for i, unit in enumerate(units):
        for low, high in unit.options():
            changes = weights(unit.consumer, high, False)
            for producer in unit.producers:
                changes.update(weights(producer, low, True))
            noise[i, (low, high)] = probe.noise(changes)[1]
        if (i + 1) % 10 == 0 or i + 1 == len(units):
            say(f"target bits: {i + 1}/{len(units)} units measured at each width")
    choice = greedy_allocation(units, sizes, noise, target_bits)
    bits = {}
    for i, unit in enumerate(units):
        low, high = choice[i]
        bits.update({p: low for p in unit.producers})
        bits[unit.consumer] = high
    average = sum(unit_bits(u, choice[i], sizes) for i, u in enumerate(units)) / sum(sizes.values())
    counts: dict[str, int] = {}
    for i, unit in enumerate(units):
        key = f"{choice[i][0]}/{choice[i][1]} pair" if unit.producers else f"{choice[i][1]}-bit layer"
        counts[key] = counts.get(key, 0) + 1
    reached = "" if average <= target_bits + 1e-9 else " (the narrowest allocation; the budget is below it)"
    notes.append(f"--target-bits {target_bits:g}: {average:.2f} integer bits per quantized weight{reached}; "
                 + ", ".join(f"{count} x {key}" for key, count in sorted(counts.items())))
    return bits


def _relax_relu6(graph: gs.Graph, preactivation: dict, working: onnx.ModelProto, inputs: np.ndarray | None,
                 notes: list[str]) -> list[str]:
    """``--relu6 relu`` (relu6.py): Clip(0, hi) -> Relu where statistics say the clip is rarely reached."""
    clips = relu6_clips(graph)
    statistics = batchnorm_statistics(clips, preactivation)
    missing = [clip for clip in clips if clip.name not in statistics]
    if missing and inputs is not None:
        try:
            measured = activation_statistics(graph, _opset_model(working), inputs, [c.inputs[0].name for c in missing],
                                             chunk=_chunk(graph))
        except ORT_ERRORS as err:
            raise InputError(f"onnxruntime cannot run the input model for ReLU6 statistics ({first_line(err)})") from None
        statistics.update({clip.name: (mean, np.sqrt(var)) for clip, (mean, var) in zip(missing, measured)})
    replaced, kept = replace_rare_clips(clips, statistics)
    if clips:
        notes.append(f"--relu6 relu: {len(replaced)} of {len(clips)} Clip(0, max) replaced by Relu (a model change)"
                     + ("; kept: " + "; ".join(f"{name} ({reason})" for name, reason in kept) if kept else ""))
    return replaced


def _refine_statistics(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], working: onnx.ModelProto,
                       inputs: np.ndarray, say: Callable[[str], None],
                       refit: Callable[[str, np.ndarray], object] | None = None) -> dict[str, QuantizedLayer]:
    """Statistics matching on synthetic inputs (refine.py); the graph must still hold the float weights."""
    reference = _opset_model(working)
    state = {name: effective_weights(ql) for name, ql in qlayers.items()}
    try:
        state = match_statistics(graph, qlayers, state, inputs, reference, chunk=_chunk(graph), log=say, refit=refit)
    except ORT_ERRORS as err:
        raise InputError(f"onnxruntime cannot run the input model for statistics matching ({first_line(err)}); "
                         "use --refine none or --refine bias") from None
    return {name: dataclasses.replace(ql, refined=state[name]) for name, ql in qlayers.items()}


def resolve_synthetic(synthetic: str, model: onnx.ModelProto) -> str:
    """"auto": "distill" when PyTorch imports and the model has BatchNormalization nodes, else "pink"."""
    if synthetic != "auto":
        return synthetic
    has_statistics = any(node.op_type == "BatchNormalization" for node in model.graph.node)
    return "distill" if has_statistics and importlib.util.find_spec("torch") is not None else "pink"


def resolve_refine(refine: str, synthetic: str) -> str:
    """"auto": "refit" on distilled inputs, "stats" on noise (least squares on noise hurts)."""
    if refine != "auto":
        return refine
    return "refit" if synthetic == "distill" else "stats"


def resolve_ternary_threshold(ternary_threshold: str, refine: str) -> str:
    """"auto": "optimal" under "refit", "twn" (Eq. 4) otherwise.

    With refit each consumer is re-solved against the float outputs, so the
    smaller weight error of the least-squares threshold carries through; on
    the accuracy benchmark it scored higher there and lower under "stats".
    """
    if ternary_threshold != "auto":
        return ternary_threshold
    return "optimal" if refine == "refit" else "twn"


def _synthetic_inputs(model: onnx.ModelProto, weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                      refine: str, synthetic: str, auto_synthetic: bool, samples: int, seed: int,
                      given: np.ndarray | None, notes: list[str],
                      say: Callable[[str], None]) -> tuple[np.ndarray | None, str, str]:
    """The inputs of statistics matching and the refinement and inputs that will actually run.

    When ``synthetic`` was chosen automatically and distillation fails, pink
    noise and "stats" replace it, with a note.
    """
    obstacle = _refinement_obstacle(model, shapes)
    if obstacle:
        notes.append(f"refinement skipped: {obstacle}")
        return None, "none", synthetic
    shape = _model_input_shape(model, shapes)
    if given is not None:
        if list(np.shape(given)[1:]) != shape[1:]:
            raise InputError(f"synthetic_inputs of shape {np.shape(given)} do not fit input {shape}")
        return np.asarray(given, dtype=np.float32), refine, synthetic
    try:
        # distillation runs the whole float model in PyTorch: only it needs the weights back in the model
        whole = with_weights(model, weights) if synthetic == "distill" else model
        return make_synthetic_inputs(whole, shape, synthetic, samples, seed, say), refine, synthetic
    except InputError as err:
        if not auto_synthetic:
            raise
        notes.append(f"distillation not possible ({err}); used pink noise and statistics matching")
        return make_synthetic_inputs(model, shape, "pink", samples, seed, say), "stats", "pink"


def _refine(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], preactivation: dict, working: onnx.ModelProto,
            bits: dict[str, int], per_channel: dict[str, bool], kbit_range: str, refine: str, inputs: np.ndarray | None,
            say: Callable[[str], None]) -> dict[str, QuantizedLayer]:
    """The refinement stage: BatchNorm bias correction, or statistics matching (with refit) on ``inputs``."""
    if refine == "bias":
        return _correct_biases(qlayers, preactivation)
    refit = None
    if refine == "refit":
        refit = lambda name, weight_rows: quantize_rows(weight_rows, bits[name], per_channel[name],
                                                        weight_range=kbit_range)
    return _refine_statistics(graph, qlayers, working, inputs, say, refit)


def _correct_biases(qlayers: dict[str, QuantizedLayer],
                    preactivation: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, QuantizedLayer]:
    """BatchNorm-statistics bias correction of every layer whose input mean the statistics give."""
    corrected = {}
    for name, ql in qlayers.items():
        entry = effective_weights(ql)
        mean = expected_input(ql.layer.node, preactivation)
        in_channels = ql.layer.weight.shape[1] * int(ql.layer.node.attrs.get("group", 1)) if ql.layer.op == "Conv" else None
        if mean is not None and (in_channels is None or mean.size == in_channels):
            entry = correct_bias(ql, entry, mean)
        corrected[name] = dataclasses.replace(ql, refined=entry)
    return corrected


def _fixed_layers(names: list[str], keep_first: bool, keep_last: bool) -> dict[str, str]:
    fixed: dict[str, str] = {}
    if names and keep_first:
        fixed[names[0]] = "first layer kept out of pairs at HIGH bits (--keep-first)"
    if names and keep_last:
        fixed[names[-1]] = "last layer kept out of pairs at HIGH bits (--keep-last)"
    return fixed


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, target)
    except Exception as err:  # the converter raises several unrelated types
        raise InputError(f"cannot upgrade the model to opset {target} for integer storage ({first_line(err)}); "
                         f"use --format float") from None


def _export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export the rewritten graph keeping the original's metadata and an IR version onnxruntime reads."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.ir_version = loadable_ir_version(model, original.ir_version)
    model.producer_name = "dfmpc-onnx"
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return model


def _layer_reports(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], left_float: dict[str, str]) -> list[LayerReport]:
    reports: dict[str, LayerReport] = {}
    for name, ql in qlayers.items():
        effective, _ = effective_weights(ql)
        rows = to_rows(ql.layer.weight, ql.layer.out_axis)
        c = ql.compensation
        reports[name] = LayerReport(
            name=name, op=ql.layer.op, role=ql.role, bits=ql.quantized.bits, partner=ql.partner,
            sqnr_db=effective.sqnr_db(rows),
            c_min=None if c is None else float(c.min()),
            c_median=None if c is None else float(np.median(c)),
            c_max=None if c is None else float(c.max()))
    for name, reason in left_float.items():
        node = next(n for n in graph.nodes if n.name == name)
        reports[name] = LayerReport(name=name, op=node.op, role="float", bits=None, partner=None, sqnr_db=None,
                                    note=reason)
    order = {node.name: index for index, node in enumerate(graph.nodes)}
    return sorted(reports.values(), key=lambda r: order.get(r.name, len(order)))

"""The public entry points: ``quantize`` (model in, model and report out) and ``quantize_file``.

``quantize`` runs each stage once, in order; each line is a call into the stage's own module.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np
import onnx

from .activations import calibrate_activations, quantize_activations
from .allocate import choose_bits
from .check import ReferenceRun, check_model, run_reference
from .domain import InputDomain
from .emit import emit
from .errors import CheckError, InputError
from .feedback import fit_codes
from .fold import fold_batchnorm
from .graph import find_layers, import_graph
from .inputs import find_static_shape, model_facts, resolve_input_shapes
from .load import load_model
from .options import Options, OutputOptions, Plan, resolve
from .pairs import find_pairs, kept_out_of_pairs
from .plan import compensate_layers, quantize_layers
from .precision import as_float32
from .progress import Console
from .refine import MATCHING, refine
from .relu6 import relax_relu6
from .report import Report, initializer_bytes, layer_reports, make_report
from .runtime import resolve_providers
from .save import (assemble_model, check_output_path, check_report_path, external_data_path, staged_model,
                   write_text_atomic)
from .storage import upgrade_for_storage
from .synthetic import fidelity_inputs, make_synthetic_inputs, model_domain, validation_inputs

HALF_NOTE = "float16 model: quantized in float32, written back in float16"
COLLECT_ABOVE_BYTES = 256 << 20
"""Weights from which each stage ends with a garbage collection: below it, the replaced weights that
wait for the cycle collector cost less memory than the collections cost time."""


def quantize(model: str | os.PathLike | onnx.ModelProto, options: Options | str | None = None, *,
             synthetic_inputs: np.ndarray | None = None, console: Console | None = None,
             **values) -> tuple[onnx.ModelProto, Report]:
    """Quantize a float ONNX CNN with DF-MPC and return (quantized model, report).

    ``options`` (``options.Options``, or a scheme such as "2/6") and keyword arguments of the same names
    say how: ``scheme="2/6"`` (LOW/HIGH bits, "2" is ternary), ``target_bits=3.5``, ``format``,
    ``refine``, and the rest; each is documented on its field. ``auto`` values are resolved for this
    model (``options.resolve``) and the report says what they became. ``synthetic_inputs`` (samples x
    input shape) replaces the generated inputs (to distill once and reuse); ``console`` gets progress.
    Raises InputError for unusable input, CheckError if onnxruntime rejects the result.
    """
    options = _options(options, values)
    console = console or Console()
    skeleton, weights, half = as_float32(*load_model(model))
    stopwatch = Stopwatch(initializer_bytes(skeleton) >= COLLECT_ABOVE_BYTES)
    shapes, shape_note = find_static_shape(skeleton, weights, resolve_input_shapes(skeleton, options.input_shapes))
    plan = resolve(options, model_facts(skeleton, shapes))
    domain = model_domain(skeleton, weights, shapes, options) if plan.needs_inputs or options.check else None
    inputs, plan = make_synthetic_inputs(skeleton, weights, shapes, plan, domain, synthetic_inputs, console)
    reference = _reference(skeleton, weights, shapes, inputs, plan, domain)
    working, upgrade_note = upgrade_for_storage(skeleton, plan, half)
    stopwatch.lap("load")

    graph = import_graph(working, weights)
    del weights
    folding = fold_batchnorm(graph)
    replaced_clips, relu6_note = relax_relu6(graph, folding.preactivation, working, inputs, options.relu6)
    stopwatch.lap("fold")

    layers, left_float = find_layers(graph, options.exclude)
    if not layers and not left_float:
        raise InputError(f"{_label(model, skeleton)}: the model has no Conv, Gemm or MatMul layer: nothing to quantize")
    search = find_pairs(graph, layers, kept_out_of_pairs(list(layers), options.keep_first, options.keep_last),
                        options.relu6)
    stopwatch.lap("pairs")
    bits, protection, allocation_note = choose_bits(graph, working, layers, search, inputs, plan, console)
    qlayers, fit_note = fit_codes(graph, quantize_layers(layers, search, bits, plan), inputs, plan, working, console)
    stopwatch.lap("quantize")
    qlayers = compensate_layers(qlayers, options)
    stopwatch.lap("solve")
    # statistics matching quantizes the activations on the float model's ranges; else the output's are taken
    ranges = calibrate_activations(graph, qlayers, inputs, plan, working) if plan.refine in MATCHING else {}
    qlayers, refine_note = refine(graph, qlayers, folding.preactivation, inputs, plan, working, console, ranges,
                                  validation_inputs(inputs, domain, plan))
    stopwatch.lap("refine")

    emit(graph, qlayers, search.pairs, options.format, options.placement, plan.storage)
    ranges = ranges or calibrate_activations(graph, qlayers, inputs, plan, working)
    quantize_activations(graph, ranges, plan)
    result = assemble_model(graph, working, half)
    table = layer_reports(graph, qlayers, left_float)
    del graph, qlayers, layers  # the float weights are no longer needed
    stopwatch.lap("emit")
    check = check_model(reference, result, options.min_agreement) if options.check else None
    stopwatch.lap("check")
    notes = [n for n in (half and HALF_NOTE, shape_note, upgrade_note, relu6_note, allocation_note, fit_note, refine_note)
             if n]
    return result, make_report(_label(model, skeleton), plan, skeleton, result, search, folding, table, replaced_clips,
                               notes, check, stopwatch.timings, domain, protection, ranges, shape_note is not None)


def quantize_file(source: str | os.PathLike, destination: str | os.PathLike, options: Options | None = None,
                  output: OutputOptions | None = None, *, console: Console | None = None, **values) -> Report:
    """``quantize`` a file and write the result atomically; the input is never touched.

    ``output`` (``options.OutputOptions``; its fields may also be given as keywords) says where the
    weights and the JSON report go and whether a model that failed the onnxruntime check is written
    anyway (``keep_failed``). The output paths are validated before any work, and on any failure no
    output file is left behind (except the failed model with ``keep_failed``).
    """
    output_fields = set(OutputOptions.__dataclass_fields__)
    output = OutputOptions(**{**vars_of(output), **{k: v for k, v in values.items() if k in output_fields}})
    values = {k: v for k, v in values.items() if k not in output_fields}
    source, destination = Path(source), Path(destination)
    check_output_path(source, destination)
    if output.report is not None:
        check_report_path(Path(output.report), source, destination)
    try:
        model, report = quantize(source, options, console=console, **values)
    except CheckError as err:
        if output.keep_failed and err.model is not None:
            with staged_model(err.model, destination, output.external_data):
                pass
        raise
    with staged_model(model, destination, output.external_data) as staged:
        if staged.external:
            report.notes.append(f"weights written as external data to {external_data_path(destination).name}")
        if output.report is not None:
            write_text_atomic(Path(output.report), report.to_json() + "\n")
    return report


def _reference(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
               inputs: np.ndarray | None, plan: Plan, domain: InputDomain | None) -> ReferenceRun | None:
    """The float model's run that the check compares with (a random batch, and the fidelity inputs), or
    None when there is no check and nothing runs on synthetic inputs."""
    options = plan.options
    if not (options.check or plan.needs_inputs):
        return None
    fidelity = fidelity_inputs(skeleton, shapes, inputs, plan, domain) if options.check else None
    return run_reference(skeleton, weights, options.providers, options.check_batch, shapes, fidelity)


def _options(given: Options | str | None, values: dict) -> Options:
    """``given`` updated with ``values`` (a string or ``Scheme`` in place of ``Options`` is the scheme),
    its providers checked against this installation before any work."""
    if given is not None and not isinstance(given, Options):
        given, values = None, {"scheme": given, **values}
    options = Options(**{**vars_of(given), **values})
    resolve_providers(options.providers)
    return options


def vars_of(options: Options | OutputOptions | None) -> dict:
    """The fields of ``options`` as keywords (none for None)."""
    return {} if options is None else {name: getattr(options, name) for name in options.__dataclass_fields__}


def _label(model: str | os.PathLike | onnx.ModelProto, skeleton: onnx.ModelProto) -> str:
    return str(model) if not isinstance(model, onnx.ModelProto) else (skeleton.graph.name or "model")


class Stopwatch:
    """Wall time per stage; with ``collect``, a garbage collection ends each stage (graphsurgeon's nodes and
    tensors refer to each other, so replaced weights wait for the cycle collector)."""

    def __init__(self, collect: bool):
        self.collect = collect
        self.timings: dict[str, float] = {}
        self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.collect:
            gc.collect()
        now = time.perf_counter()
        self.timings[stage] = round(now - self.clock, 4)
        self.clock = now

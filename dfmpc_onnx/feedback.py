"""Codes fitted to each layer's input covariance H, measured on the synthetic inputs in the float model:
the k-bit grid and ranges chosen by output error (``--kbit-grid auto``, ``--kbit-range output``), then
GPTQ's error feedback (``--error-feedback``, ``maths/feedback.py``). Runs between the quantize and the
solve stage: c (Eqs. 7-10) and the refinement work on the new codes as on any others."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer, batch_chunk, to_rows, with_outputs
from .maths.feedback import (DAMPING, NOISE_DAMPING, RANGE_FRACTIONS, code_levels, feature_covariance,
                             feedback_codes, group_rows, output_errors, output_fitted, patch_covariance)
from .maths.quantizers import QuantizedWeight
from .options import Plan
from .plan import QuantizedLayer, quantize_weight_rows
from .progress import Console
from .runtime import graph_session, own_graph

CHUNK = 4
"""Synthetic inputs per onnxruntime run while H is accumulated (conv patches are kernel-size times the
activation)."""


def input_covariance(x: np.ndarray, layer: Layer) -> list[np.ndarray] | None:
    """H of ``layer`` from its input ``x``, one per group; None for a layer this stage does not handle
    (a conv that is not 2-D or pads by ``auto_pad``, a Gemm that transposes its input)."""
    attrs = layer.node.attrs
    if layer.op == "Conv":
        if layer.weight.ndim != 4 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None
        return patch_covariance(x, tuple(layer.weight.shape[2:]), tuple(attrs.get("pads", (0, 0, 0, 0))),
                                tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("dilations", (1, 1))),
                                layer.group)
    if layer.op == "Gemm" and attrs.get("transA", 0):
        return None
    return feature_covariance(x)


def measure_covariances(graph: gs.Graph, layers: dict[str, Layer], inputs: np.ndarray,
                        like: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    """H per group of every layer that ``input_covariance`` handles, over ``inputs`` in the float graph."""
    sources = {name: layer.node.inputs[0].name for name, layer in layers.items()}
    graph_input = graph.inputs[0].name
    names = sorted(set(sources.values()) - {graph_input})
    # layers that all read the graph input need no run (and a graph with no outputs is no model)
    session = graph_session(with_outputs(graph, names), like, "the error feedback") if names else None
    input_name = session.get_inputs()[0].name if session is not None else graph_input
    found: dict[str, list[np.ndarray] | None] = {}
    chunk = batch_chunk(graph, CHUNK)
    for start in range(0, len(inputs), chunk):
        batch = inputs[start:start + chunk]
        values = {}
        if session is not None:
            with own_graph("the error feedback"):
                values = dict(zip(names, session.run(names, {input_name: batch})))
        values[graph_input] = batch
        for name, layer in layers.items():
            h = input_covariance(values[sources[name]], layer)
            if name in found and found[name] is not None:
                h = [a + b for a, b in zip(found[name], h)]
            found[name] = h
    return {name: h for name, h in found.items() if h is not None}


def fit_codes(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], inputs: np.ndarray | None, plan: Plan,
              like: onnx.ModelProto, console: Console) -> tuple[dict[str, QuantizedLayer], str | None]:
    """The quantized layers with their k-bit grid and ranges chosen by output error (``plan.fits_output``)
    and their codes re-rounded by error feedback (``plan.feedback``), else as they are; and ``grid_note``.
    A group's rows are the output channels of that group (ONNX's grouped conv layout)."""
    if not (plan.feedback or plan.fits_output) or inputs is None:
        return qlayers, None
    covariances = measure_covariances(graph, {name: ql.layer for name, ql in qlayers.items()}, inputs, like)
    progress = console.progress("fit codes", len(covariances), "layers fitted to their inputs")
    damping = DAMPING if plan.synthetic == "distill" else NOISE_DAMPING
    result = dict(qlayers)
    for name, groups in covariances.items():
        ql = qlayers[name]
        rows = to_rows(ql.layer.weight, ql.layer.out_axis)
        q = _output_fitted(rows, ql.quantized, groups, ql.layer.taps, plan)
        if plan.feedback:
            scales = q.entry_scales()
            codes = np.concatenate([feedback_codes(rows[rows_of], h, scales[rows_of], code_levels(q), damping)
                                    for rows_of, h in zip(group_rows(rows.shape[0], len(groups)), groups)])
            q = dataclasses.replace(q, codes=codes.astype(q.codes.dtype))
        result[name] = dataclasses.replace(ql, quantized=q, weight=q)
        progress.advance()
    return result, grid_note(result, plan)


def _output_fitted(rows: np.ndarray, q: QuantizedWeight, groups: list[np.ndarray], taps: int,
                   plan: Plan) -> QuantizedWeight:
    """``q``, or for a k-bit layer under ``plan.fits_output`` the grid (``--kbit-grid auto``) and ranges
    (``--kbit-range output``) with the least output error on the layer's inputs (H per group). Layers with
    block-wise scales keep theirs (``plan.scale_block``)."""
    if not plan.fits_output or q.bits == 2 or q.block:
        return q
    options = plan.options
    if options.kbit_range == "output":
        return output_fitted(rows, q.bits, plan.grids(q.bits), RANGE_FRACTIONS, options.per_channel(q.bits),
                             groups, taps if options.kbit_rounding == "kernel-sum" else 1)
    # q is already on the first grid (``Plan.grid``): only the others are quantized
    candidates = [q] + [quantize_weight_rows(rows, q.bits, plan, taps, grid) for grid in plan.grids(q.bits)[1:]]
    return min(candidates, key=lambda c: float(output_errors(rows, c.dequantize().astype(np.float64), groups).sum()))


def grid_note(qlayers: dict[str, QuantizedLayer], plan: Plan) -> str | None:
    """Under ``--kbit-grid auto`` (fitted), how many k-bit layers each grid won."""
    if not plan.fits_output or plan.options.kbit_grid != "auto":
        return None
    counts: dict[str, int] = {}
    for ql in qlayers.values():
        if ql.quantized.bits > 2:
            counts[ql.quantized.grid] = counts.get(ql.quantized.grid, 0) + 1
    return "--kbit-grid auto (least output error): " + ", ".join(f"{n} k-bit layer{'s' * (n != 1)} on the {grid} grid"
                                                                   for grid, n in sorted(counts.items()))

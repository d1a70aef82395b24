"""``--error-feedback``: each layer's codes re-rounded with GPTQ's error feedback (``maths/feedback.py``),
its input covariance H measured on the synthetic inputs in the float model. Runs between the quantize
and the solve stage: the grid (each row's scale) is the quantizer's, so c (Eqs. 7-10) and the refinement
work on the new codes as on any others."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer, batch_chunk, to_rows, with_outputs
from .maths.feedback import code_levels, feature_covariance, feedback_codes, patch_covariance
from .options import Plan
from .plan import QuantizedLayer
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


def round_with_feedback(graph: gs.Graph, qlayers: dict[str, QuantizedLayer], inputs: np.ndarray | None,
                        plan: Plan, like: onnx.ModelProto, console: Console) -> dict[str, QuantizedLayer]:
    """The quantized layers with their codes re-rounded by error feedback (``plan.feedback``), else as
    they are. A group's rows are the output channels of that group (ONNX's grouped conv layout)."""
    if not plan.feedback or inputs is None:
        return qlayers
    covariances = measure_covariances(graph, {name: ql.layer for name, ql in qlayers.items()}, inputs, like)
    progress = console.progress("error feedback", len(covariances), "layers rounded")
    result = dict(qlayers)
    for name, groups in covariances.items():
        ql = qlayers[name]
        q = ql.quantized
        rows = to_rows(ql.layer.weight, ql.layer.out_axis)
        size = rows.shape[0] // len(groups)
        codes = np.concatenate([feedback_codes(rows[g * size:(g + 1) * size], h, q.scale[g * size:(g + 1) * size],
                                               code_levels(q)) for g, h in enumerate(groups)])
        rounded = dataclasses.replace(q, codes=codes.astype(q.codes.dtype))
        result[name] = dataclasses.replace(ql, quantized=rounded, weight=rounded)
        progress.advance()
    return result

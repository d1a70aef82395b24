"""Inference-only sensitivity: how much of the float model's output a quantization choice keeps.

Data-free: the float model and its quantized variants see the same synthetic
inputs in onnxruntime, with every quantizable layer's weight and bias fed as
a graph input, so that one session evaluates any assignment of weights. The
measure is the output SQNR, 10 log10(sum y^2 / sum (y - yhat)^2) over every
graph output and input (in the spirit of the retraining-free mixed-precision
search, seed 002: a quantized network is judged by how closely it follows
the float one, never by labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Layer
from .refine import session, weight_feed, with_weight_inputs

Weights = dict[str, tuple[np.ndarray, np.ndarray | None]]
"""Layer name -> (weight in the graph's layout, bias or None)."""


@dataclass
class OutputProbe:
    """The float graph with its layers' weights as inputs, its float outputs on ``inputs``, and the float
    weights; ``noise(changes)`` scores the model with ``changes`` (layer -> weights) applied."""

    session: object
    input_name: str
    output_names: list[str]
    weight_inputs: dict[str, tuple[str, str | None]]
    inputs: np.ndarray
    chunk: int
    layers: dict[str, Layer]
    reference: list[list[np.ndarray]]

    def outputs(self, changes: Weights) -> list[list[np.ndarray]]:
        float_weights = {name: (layer.weight, layer.bias) for name, layer in self.layers.items()}
        feed = weight_feed(self.weight_inputs, self.layers, {**float_weights, **changes})
        return [self.session.run(self.output_names, {self.input_name: self.inputs[start:start + self.chunk], **feed})
                for start in range(0, len(self.inputs), self.chunk)]

    def noise(self, changes: Weights) -> tuple[float, float]:
        """(sum y^2, sum (y - yhat)^2) over every output and input, y float, yhat with ``changes``."""
        signal = noise = 0.0
        for reference, outputs in zip(self.reference, self.outputs(changes)):
            for ref, out in zip(reference, outputs):
                ref64 = ref.astype(np.float64)
                signal += float(np.sum(ref64 ** 2))
                noise += float(np.sum((out.astype(np.float64) - ref64) ** 2))
        return signal, noise


def output_probe(graph: gs.Graph, layers: dict[str, Layer], inputs: np.ndarray,
                 opset_model: onnx.ModelProto, chunk: int) -> OutputProbe:
    """An ``OutputProbe`` over ``graph`` (float, BatchNorm folded) whose ``layers`` can be changed."""
    output_names = [t.name for t in graph.outputs]
    probe_graph, weight_inputs = with_weight_inputs(graph, layers, output_names)
    runner = session(probe_graph, opset_model)
    probe = OutputProbe(runner, runner.get_inputs()[0].name, output_names, weight_inputs, inputs, chunk,
                        layers, [])
    probe.reference = probe.outputs({})
    return probe

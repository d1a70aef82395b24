"""Inference-only measurements of the float graph on synthetic inputs: per-channel statistics of named
tensors, and how much of the float model's output a quantization choice keeps (``OutputProbe``).

Data-free: the float model and its quantized variants see the same synthetic inputs in onnxruntime, with
every quantizable layer's weight and bias fed as a graph input, so that one session evaluates any
assignment of weights. The measure is the output SQNR, 10 log10(sum y^2 / sum (y - yhat)^2) over every
graph output and input (in the spirit of the retraining-free mixed-precision search, seed 002: a
quantized network is judged by how closely it follows the float one, never by labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .fidelity import class_scores, one_class_axis
from .graph import Layer, batch_chunk, weight_feed, with_outputs, with_weight_inputs
from .maths.statistics import channel_statistics
from .runtime import graph_session, own_graph, run_in_chunks

Weights = dict[str, tuple[np.ndarray, np.ndarray | None]]
"""Layer name -> (weight in the graph's layout, bias or None)."""


def activation_statistics(graph: gs.Graph, like: onnx.ModelProto, inputs: np.ndarray, names: list[str],
                          axes: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and variance of the named tensors of ``graph`` (float) over ``inputs``, the channels
    on ``axes`` (one per name; 1 for all by default)."""
    session = graph_session(with_outputs(graph, names), like, "activation statistics")
    with own_graph("activation statistics"):
        chunks = run_in_chunks(session, names, session.get_inputs()[0].name, inputs, batch_chunk(graph))
    axes = axes or [1] * len(names)
    return [channel_statistics([outputs[i] for outputs in chunks], axes[i]) for i in range(len(names))]


def input_means(graph: gs.Graph, like: onnx.ModelProto, layers: dict[str, Layer],
                inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Layer name -> the mean of each channel of its input over ``inputs`` (float graph): a Conv's channels
    on axis 1, a Gemm's or MatMul's features on the last."""
    axis = {name: 1 if layer.op == "Conv" else -1 for name, layer in layers.items()}
    tensors = {name: layer.node.inputs[0].name for name, layer in layers.items()}
    model_input = graph.inputs[0].name
    inner = sorted({(tensor, axis[name]) for name, tensor in tensors.items() if tensor != model_input})
    measured = activation_statistics(graph, like, inputs, [t for t, _ in inner], [a for _, a in inner]) if inner else []
    means = {key: mean for key, (mean, _) in zip(inner, measured)}
    for name, tensor in tensors.items():
        if tensor == model_input:
            means[tensor, axis[name]] = channel_statistics([inputs], axis[name])[0]
    return {name: means[tensors[name], axis[name]] for name in layers}


@dataclass
class OutputProbe:
    """The float graph with its layers' weights as inputs, its float outputs on ``inputs``, and the float
    weights; ``noise(changes)`` scores the model with ``changes`` (layer -> weights) applied."""

    session: ort.InferenceSession
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
        with own_graph("the sensitivity probe"):
            return run_in_chunks(self.session, self.output_names, self.input_name, self.inputs, self.chunk, feed)

    def noise(self, changes: Weights) -> tuple[float, float]:
        """(sum y^2, sum (y - yhat)^2) over every output and input, y float, yhat with ``changes``."""
        signal = noise = 0.0
        for reference, outputs in zip(self.reference, self.outputs(changes)):
            for ref, out in zip(reference, outputs):
                ref64 = ref.astype(np.float64)
                signal += float(np.sum(ref64 ** 2))
                noise += float(np.sum((out.astype(np.float64) - ref64) ** 2))
        return signal, noise

    def classifier(self) -> bool:
        """Whether the model has one output of class scores (batch x classes, at least two)."""
        return len(self.reference[0]) == 1 and one_class_axis(self.reference[0][0].shape)

    def damage(self, changes: Weights) -> float:
        """How far the model with ``changes`` moves from the float one: for a classifier the mean KL divergence
        of its softmax from the float model's (its allocations of EfficientNet-Lite0 kept more than those of
        the output noise: ``tools/bench_sensitivity.py``, README), else the output noise power (``noise``)."""
        if not self.classifier():
            return self.noise(changes)[1]
        divergence = 0.0
        for reference, outputs in zip(self.reference, self.outputs(changes)):
            divergence += float(np.sum(kl_divergence(class_scores(reference[0]), class_scores(outputs[0]))))
        return divergence / len(self.inputs)

    def closeness(self, changes: Weights) -> float:
        """How close the model with ``changes`` stays to the float one, by the fidelity check's measures: for a
        classifier the fraction of inputs whose top-1 agrees, else minus the output noise power."""
        if not self.classifier():
            return -self.noise(changes)[1]
        agreeing = 0
        for reference, outputs in zip(self.reference, self.outputs(changes)):
            agreeing += int(np.sum(class_scores(reference[0]).argmax(axis=1) == class_scores(outputs[0]).argmax(axis=1)))
        return agreeing / len(self.inputs)


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(logits)) per row (batch x classes)."""
    p_log, q_log = (log_softmax(z.astype(np.float64)) for z in (reference, logits))
    return np.sum(np.exp(p_log) * (p_log - q_log), axis=1)


def log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def output_probe(graph: gs.Graph, layers: dict[str, Layer], inputs: np.ndarray, like: onnx.ModelProto) -> OutputProbe:
    """An ``OutputProbe`` over ``graph`` (float, BatchNorm folded) whose ``layers`` can be changed. An
    output made by Softmax is probed before it: saturated probabilities hide how far the logits moved."""
    output_names = [t.inputs[0].inputs[0].name if len(t.inputs) == 1 and t.inputs[0].op in ("Softmax", "LogSoftmax")
                    else t.name for t in graph.outputs]
    probe_graph, weight_inputs = with_weight_inputs(graph, layers, output_names)
    session = graph_session(probe_graph, like, "the sensitivity probe")
    probe = OutputProbe(session, session.get_inputs()[0].name, output_names, weight_inputs, inputs,
                        batch_chunk(graph), layers, [])
    probe.reference = probe.outputs({})
    return probe

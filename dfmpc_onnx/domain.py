"""The input domain: the values the model expects at its input, so that its synthetic inputs are made
there. A model fed 0-255 images sees unit-scale noise as a black frame, and statistics matching on such
inputs corrects nothing.

``input_domain`` takes, in order: the user's ``--input-mean``/``--input-std`` or ``--input-range``; a
normalisation in the graph at the input (Sub, Add, Mul or Div by constants, or a BatchNormalization,
after an optional layout Transpose), inverted; the first BatchNormalization after the first conv, its
running statistics read back through the conv; else unit scale, with a note.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .errors import InputError
from .fidelity import class_scores
from .graph import constant_value
from .maths.noise import noise_batch
from .maths.statistics import im2col
from .options import Options

NCHW_FROM_NHWC = [0, 3, 1, 2]


@dataclass(frozen=True)
class InputDomain:
    """Inputs x = mean + std z per channel, z standardised noise; clipped to ``bounds`` when given."""

    mean: np.ndarray
    std: np.ndarray
    source: str
    channel_axis: int = 1
    bounds: tuple[float, float] | None = None
    guessed: bool = False
    """Neither given nor found in the model: unit scale, or the range in which the model's top-1 varies most."""

    def apply(self, z: np.ndarray) -> np.ndarray:
        """Standardised ``z`` as inputs in this domain."""
        return self.clip(z * self._along(self.std, z) + self._along(self.mean, z))

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """z = (x - mean) / std."""
        return (x - self._along(self.mean, x)) / self._along(self.std, x)

    def input_gradient(self, gradient: np.ndarray) -> np.ndarray:
        """dL/dx from dL/dz (z = ``standardise(x)``)."""
        return gradient / self._along(self.std, gradient)

    def clip(self, x: np.ndarray) -> np.ndarray:
        return (np.clip(x, *self.bounds) if self.bounds else x).astype(np.float32)

    def _along(self, values: np.ndarray, like: np.ndarray) -> np.ndarray:
        shape = [1] * like.ndim
        shape[self.channel_axis] = -1
        return values.reshape(shape)

    def describe(self) -> str:
        show = lambda v: "(" + ", ".join(f"{float(a):.4g}" for a in v) + ")" if np.ptp(v) else f"{float(v[0]):.4g}"
        return f"mean {show(self.mean)}, std {show(self.std)}, from {self.source}"


def unit_domain(channels: int, source: str, channel_axis: int = 1) -> InputDomain:
    return InputDomain(np.zeros(channels), np.ones(channels), source, channel_axis)


def input_domain(graph: gs.Graph, shape: list, options: Options,
                 predict: Callable[[np.ndarray], np.ndarray] | None = None) -> InputDomain:
    """The domain of ``graph``'s one input (of static ``shape`` after the batch dim); see the module.
    ``predict`` runs the float model (inputs -> first output), for ``_responsive_range``."""
    axis = _channel_axis(graph)
    channels = int(shape[axis]) if len(shape) > axis else 1
    if options.input_range is not None:
        low, high = options.input_range
        return InputDomain(np.full(channels, (low + high) / 2), np.full(channels, (high - low) / 4),
                           "--input-range", axis, (low, high))
    if options.input_mean or options.input_std:
        mean = _per_channel(options.input_mean or (0.0,), channels, "--input-mean")
        std = _per_channel(options.input_std or (1.0,), channels, "--input-std")
        return InputDomain(mean, std, "--input-mean/--input-std", axis)
    for derive in (_in_graph_normalisation, _first_batchnorm):
        found = derive(graph, channels, axis, shape)
        if found is not None:
            return found
    unit = dataclasses.replace(unit_domain(channels, "no normalisation found in the model: unit scale assumed (give "
                                                     "--input-range or --input-mean/--input-std)", axis), guessed=True)
    return _responsive_range(unit, shape, predict) if predict is not None else unit


CANDIDATE_RANGES = ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0), (-128.0, 128.0))
"""Input ranges tried, beside unit scale, for a model that says nothing of its input: [0, 1] and [-1, 1]
images, raw pixels, raw pixels less their mean (Caffe)."""


def _responsive_range(unit: InputDomain, shape: list, predict: Callable[[np.ndarray], np.ndarray]) -> InputDomain:
    """Of unit scale and ``CANDIDATE_RANGES``, the domain in which a classifier's top-1 varies most over
    seeded pink noise (entropy of the predicted classes): a model fed inputs far from its own range sees
    them all alike and answers one class. Unit scale unless another clearly wins (or the output is not a
    classifier's)."""
    z = noise_batch([1] + list(shape[1:]), "pink", 32, 0) if unit.channel_axis == 1 else \
        noise_batch([1, shape[3], shape[1], shape[2]], "pink", 32, 0).transpose(0, 2, 3, 1)
    channels = len(unit.mean)
    candidates = [unit] + [InputDomain(np.full(channels, (lo + hi) / 2), np.full(channels, (hi - lo) / 4),
                                       f"the range [{lo:g}, {hi:g}], in which the model's top-1 varies most over pink "
                                       "noise (no normalisation found in the model; --input-range sets it)",
                                       unit.channel_axis, (lo, hi), guessed=True) for lo, hi in CANDIDATE_RANGES]
    scores = []
    for domain in candidates:
        scores_out = class_scores(predict(domain.apply(z)))
        if scores_out is None or scores_out.ndim != 2:
            return unit
        counts = np.bincount(scores_out.argmax(axis=1), minlength=scores_out.shape[1])
        p = counts[counts > 0] / len(z)
        scores.append(float(-np.sum(p * np.log(p))))
    best = int(np.argmax(scores))
    return candidates[best] if scores[best] > scores[0] + 0.5 else unit


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise InputError(f"{flag} gives {len(values)} values; the input has {channels} channels")
    return np.broadcast_to(np.asarray(values, np.float64), (channels,)).copy()


def _channel_axis(graph: gs.Graph) -> int:
    """3 for an NHWC input that the graph transposes to NCHW first, else 1."""
    users = graph.inputs[0].outputs
    if len(users) == 1 and users[0].op == "Transpose" and list(users[0].attrs.get("perm", [])) == NCHW_FROM_NHWC:
        return 3
    return 1


def _in_graph_normalisation(graph: gs.Graph, channels: int, axis: int, shape: list) -> InputDomain | None:
    """y = a x + b per channel, made of Sub/Add/Mul/Div by constants at the input (a standardised y is
    what the network was trained on), or a BatchNormalization there (its running statistics are the input's)."""
    tensor, scale, shift, seen = graph.inputs[0], np.ones(channels), np.zeros(channels), False
    while len(tensor.outputs) == 1:
        node = tensor.outputs[0]
        if node.op == "Transpose" and not seen:
            tensor = node.outputs[0]
            continue
        if node.op == "BatchNormalization" and not seen:
            mean, var = (constant_value(t) for t in node.inputs[3:5])
            if mean is None or var is None or mean.size != channels:
                return None
            std = np.sqrt(var.astype(np.float64) + float(node.attrs.get("epsilon", 1e-5)))
            return InputDomain(mean.astype(np.float64), std, "the BatchNormalization at the input", axis)
        other = [t for t in node.inputs if t is not tensor]
        value = constant_value(other[0]) if node.op in ("Sub", "Add", "Mul", "Div") and len(other) == 1 else None
        if value is None or value.size not in (1, channels) or (node.op in ("Sub", "Div") and node.inputs[0] is not tensor):
            break
        v = np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,))
        if node.op in ("Mul", "Div") and np.any(v == 0):
            break
        scale, shift = {"Sub": (scale, shift - v), "Add": (scale, shift + v), "Mul": (scale * v, shift * v),
                        "Div": (scale / v, shift / v)}[node.op]
        tensor, seen = node.outputs[0], True
    if not seen:
        return None
    return InputDomain(-shift / scale, 1.0 / np.abs(scale), "the normalisation at the input (Sub/Add/Mul/Div), "
                                                               "inverted", axis)


def _first_batchnorm(graph: gs.Graph, channels: int, axis: int, shape: list) -> InputDomain | None:
    """The running mean and variance of the BatchNormalization after the first conv, read back through
    it: E[y_j] = b_j + sum_c (sum over the kernel of W_jc) m_c gives the input means m by least squares;
    the variance of y on unit pink noise against the running variance gives one input std."""
    conv = graph.inputs[0].outputs[0] if len(graph.inputs[0].outputs) == 1 else None
    if conv is None or conv.op != "Conv" or axis != 1 or int(conv.attrs.get("group", 1)) != 1:
        return None
    after = conv.outputs[0].outputs
    weight = constant_value(conv.inputs[1])
    if len(after) != 1 or after[0].op != "BatchNormalization" or weight is None or weight.ndim != 4:
        return None
    stats = [constant_value(t) for t in after[0].inputs[3:5]]
    bias = constant_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
    if any(s is None for s in stats) or bias is None or len(shape) != 4 or conv.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    if int(after[0].attrs.get("spatial", 1)) != 1 or any(s.size != weight.shape[0] for s in stats):
        return None
    running_mean, running_var = (s.astype(np.float64).reshape(-1) for s in stats)
    sums = weight.astype(np.float64).sum(axis=(2, 3))
    mean = np.linalg.lstsq(sums, running_mean - bias, rcond=None)[0]
    z = noise_batch([1, channels, min(int(shape[2]), 64), min(int(shape[3]), 64)], "pink", 8, 0).astype(np.float64)
    rows = im2col(z, tuple(weight.shape[2:]), tuple(conv.attrs.get("strides", [1, 1])),
                  list(conv.attrs.get("pads", [0, 0, 0, 0])))
    unit_var = (rows @ weight.reshape(weight.shape[0], -1).T).var(axis=0)
    std = np.sqrt(np.sum(running_var) / max(np.sum(unit_var), 1e-12))
    return InputDomain(mean, np.full(channels, std), "the first BatchNormalization, read back through the first conv",
                       axis)

"""BatchNorm-statistics distillation of synthetic inputs (ZeroQ-style), run by onnxruntime.

Starting from pink noise, the inputs are optimised with Adam so that every
BatchNormalization of the float model sees, over the batch, the running
mean and variance it stores:

    loss = sum over BN layers l of  ||mu_l(x) - mu_l||^2 + ||sigma_l(x) - sigma_l||^2

with mu_l(x), sigma_l(x) the per-channel mean and standard deviation of the
BN's input on the synthetic batch x. This uses nothing but the model. The loss
and its gradient with respect to x come from one ONNX graph
(``gradients.gradient_model``); the Adam step is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from .errors import InputError
from .fidelity import one_class_axis
from .gradient_rules import RULES
from .gradients import Builder, gradient_model, prepare_forward, static_shape
from .inputs import model_inputs
from .domain import InputDomain, unit_domain
from .maths.optimise import Adam, cosine_rate
from .maths.priors import low_pass, squared_norm, total_variation
from .progress import Console
from .runtime import graph_session, own_graph

STEPS = 120
LEARNING_RATE = 0.1
SCHEDULE = "constant"
"""Measured by ``tools/bench_distill.py`` on ResNet-56 (README, "Distillation"): 120 steps at a constant
0.1 score as 150 or 300 steps and as cosine schedules, within the seed-to-seed spread, at the cost the
speed target allows."""


@dataclass(frozen=True)
class Priors:
    """Image priors beside the model's loss, on the inputs standardised by their domain: ``tv`` and ``l2``
    weigh the total variation and the squared norm (DeepInversion), ``cutoff`` low-pass filters the
    inputs after every step (SynQ); 0 is off."""

    tv: float = 0.0
    l2: float = 0.0
    cutoff: float = 0.0

    def add(self, x: np.ndarray, loss: float, gradient: np.ndarray, domain: InputDomain) -> tuple[float, np.ndarray]:
        z = domain.standardise(x)
        for weight, prior in ((self.tv, total_variation), (self.l2, squared_norm)):
            if weight:
                value, g = prior(z)
                loss, gradient = loss + weight * value, gradient + weight * domain.input_gradient(g)
        return loss, gradient

    def project(self, x: np.ndarray, domain: InputDomain) -> np.ndarray:
        if self.cutoff:
            x = domain.apply(low_pass(domain.standardise(x), self.cutoff))
        return domain.clip(x)


LOGITS_PRIORS = Priors(tv=1e-2, l2=1e-3)
"""Measured by ``tools/bench_distill.py --folded`` on a BN-folded ResNet-56 (README, "Distillation"):
the cross-entropy alone scores below pink noise; these weights scored best of the priors tried."""


def distill_inputs(model: onnx.ModelProto, start: np.ndarray, seed: int, steps: int = STEPS,
                   learning_rate: float = LEARNING_RATE, console: Console | None = None,
                   providers: list[str] | None = None, schedule: str = SCHEDULE, objective: str = "auto",
                   priors: Priors | None = None, domain: InputDomain | None = None) -> np.ndarray:
    """Inputs distilled from ``model`` (float, BatchNorm not folded), starting from ``start`` (noise in
    the model's input ``domain``; its shape fixes the batch and any dynamic dims).

    ``objective`` "batchnorm" matches every BatchNormalization's running statistics (``batchnorm_loss``);
    "logits" drives each sample to a target class (cross-entropy on the model's one output,
    ``logits_loss``), with the image ``priors`` (default ``LOGITS_PRIORS``); "auto" is "batchnorm" when
    the model has BatchNormalization nodes, else "logits". ``schedule`` "constant" keeps the learning
    rate, "cosine" decays it to 0 (``maths.cosine_rate``).
    """
    forward = prepare_forward(with_input_shape(model, len(start), start.shape[1:]))
    domain = domain or unit_domain(start.shape[1], "unit scale")
    loss, extra, feed, objective = _objective(forward, objective, len(start), seed)
    priors = priors if priors is not None else LOGITS_PRIORS if objective == "logits" else Priors()
    session = graph_session(gradient_model(forward, loss, extra, RULES), forward, "distillation", providers)
    name, x = forward.graph.input[0].name, np.asarray(start, np.float32)
    adam = Adam(learning_rate)
    progress = (console or Console()).progress("distill", steps, "steps")
    for step in range(steps):
        with own_graph("distillation"):
            value, gradient = session.run(["loss", "gradient"], {name: x, **feed})
        value, gradient = priors.add(x, float(value), gradient, domain)
        x = adam.step(x, gradient, cosine_rate(learning_rate, step, steps) if schedule == "cosine" else None)
        x = priors.project(x, domain)
        progress.advance(f"loss {value:.4f}")
    return x


def _objective(forward: onnx.ModelProto, objective: str, samples: int, seed: int) -> tuple:
    """(loss builder, extra graph inputs, their feed, the objective) for ``objective`` ("auto" resolved)."""
    has_batchnorm = any(node.op_type == "BatchNormalization" for node in forward.graph.node)
    objective = ("batchnorm" if has_batchnorm else "logits") if objective == "auto" else objective
    if objective == "batchnorm":
        if not has_batchnorm:
            raise InputError("--synthetic distill needs BatchNormalization nodes with running statistics; "
                             "this model has none (use --synthetic pink)")
        return batchnorm_loss, [], {}, objective
    dims = (samples,) + logits_shape(forward)[1:]
    targets = np.eye(dims[1], dtype=np.float32)[class_targets(samples, dims[1], seed)].reshape(dims)
    extra = [onnx.helper.make_tensor_value_info("targets", onnx.TensorProto.FLOAT, list(dims))]
    return logits_loss, extra, {"targets": targets}, objective


def class_targets(samples: int, classes: int, seed: int) -> np.ndarray:
    """The target class of each sample: every class in turn, as evenly as the count allows, shuffled."""
    return np.random.default_rng([seed, classes]).permutation(np.arange(samples) % classes)


def logits_shape(forward: onnx.ModelProto) -> tuple[int, ...]:
    """(batch, classes), or (batch, classes, 1, 1) for a conv head, of a classifier's one output; InputError
    for any other model."""
    outputs = forward.graph.output
    dims = tuple(d.dim_value for d in outputs[0].type.tensor_type.shape.dim) if len(outputs) == 1 else ()
    if not one_class_axis(dims):
        raise InputError("distillation without BatchNorm statistics needs a classifier: one output of shape "
                         "(batch, classes) or (batch, classes, 1, 1)")
    return dims


def logits_loss(b: Builder, graph: onnx.GraphProto) -> tuple[str, dict[str, str]]:
    """Cross-entropy of the logits z against the one-hot ``targets`` t, averaged over the batch of N:
    L = -sum t log softmax(z) / N, dL/dz = (softmax(z) - t) / N."""
    logits = graph.output[0].name
    producer = next((node for node in graph.node if logits in node.output), None)
    if producer is not None and producer.op_type == "Softmax":
        logits = producer.input[0]  # a classifier that outputs probabilities: its logits are before the Softmax
    n = static_shape(b, logits)[0]
    loss = b.op("Mul", [b.op("ReduceSum", [b.op("Mul", ["targets", b.op("LogSoftmax", [logits], axis=1)])],
                             keepdims=0), b.const(-1.0 / n)])
    gradient = b.op("Mul", [b.op("Sub", [b.op("Softmax", [logits], axis=1), "targets"]), b.const(1.0 / n)])
    return loss, {logits: gradient}


def batchnorm_loss(b: Builder, graph: onnx.GraphProto) -> tuple[str, dict[str, str]]:
    """The BatchNorm-statistics loss and its gradient at each BatchNormalization's input X (N, C, ...),
    with n = N x spatial size, mu = sum X / n, d = X - mu, sigma = sqrt(sum d^2 / n + eps):

        dL/dX = 2 (mu - m) / n + 2 (sigma - s) d / (n sigma),  s = sqrt(running var + eps)."""
    terms, seeds = [], {}
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        x = node.input[0]
        shape = static_shape(b, x)
        axes = [0] + list(range(2, len(shape)))
        n = float(np.prod(shape)) / shape[1]
        keep = [1, -1] + [1] * (len(shape) - 2)
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        running_mean, running_var = (b.constants[name].astype(np.float64) for name in node.input[3:5])
        mu = b.op("Mul", [b.reduce_sum(x, axes), b.const(1.0 / n)])
        d = b.op("Sub", [x, mu])
        var = b.op("Mul", [b.reduce_sum(b.op("Mul", [d, d]), axes), b.const(1.0 / n)])
        sigma = b.op("Sqrt", [b.op("Add", [var, b.const(epsilon)])])
        dm = b.op("Sub", [mu, b.const(running_mean.reshape(keep))])
        ds = b.op("Sub", [sigma, b.const(np.sqrt(running_var + epsilon).reshape(keep))])
        terms.append(b.op("ReduceSum", [b.op("Add", [b.op("Mul", [dm, dm]), b.op("Mul", [ds, ds])])], keepdims=0))
        spread = b.op("Mul", [b.op("Div", [ds, sigma]), d])
        gradient = b.op("Mul", [b.op("Add", [dm, spread]), b.const(2.0 / n)])
        seeds[x] = gradient if x not in seeds else b.op("Add", [seeds[x], gradient])
    return b.op("Sum", terms), seeds


def with_input_shape(model: onnx.ModelProto, batch: int, dims: Sequence[int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose first input has batch dim ``batch`` (and ``dims`` after it, if given),
    with shapes inferred again. The model's real input is put first: old exporters list every weight among
    the graph inputs, Caffe2's before the image (IR 3 needs them listed, so they stay, after it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    real = model_inputs(copy)
    listed = [i for i in copy.graph.input if i not in real]
    del copy.graph.input[:]
    copy.graph.input.extend(real + listed)
    shape = copy.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(shape, [batch, *(dims or [d.dim_value for d in shape[1:]])]):
        if value > 0:
            dim.Clear()
            dim.dim_value = int(value)
    if any(not d.HasField("dim_value") for d in shape[1:]):
        raise InputError("--synthetic distill needs the input's dims after the batch dim (give --input-shape)")
    return onnx.shape_inference.infer_shapes(copy, data_prop=True)

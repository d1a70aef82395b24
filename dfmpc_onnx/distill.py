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
from .gradient_rules import RULES
from .gradients import Builder, gradient_model, prepare_forward
from .maths.noise import pink_noise
from .maths.optimise import Adam, cosine_rate
from .maths.priors import low_pass, squared_norm, total_variation
from .progress import Console
from .runtime import graph_session, own_graph

STEPS = 120
LEARNING_RATE = 0.1
SCHEDULE = "constant"


@dataclass(frozen=True)
class Priors:
    """Image priors beside the model's loss: ``tv`` and ``l2`` weigh the total variation and the squared
    norm (DeepInversion), ``cutoff`` low-pass filters the inputs after every step (SynQ); 0 is off."""

    tv: float = 0.0
    l2: float = 0.0
    cutoff: float = 0.0

    def add(self, x: np.ndarray, loss: float, gradient: np.ndarray) -> tuple[float, np.ndarray]:
        for weight, prior in ((self.tv, total_variation), (self.l2, squared_norm)):
            if weight:
                value, g = prior(x)
                loss, gradient = loss + weight * value, gradient + weight * g
        return loss, gradient

    def project(self, x: np.ndarray) -> np.ndarray:
        return low_pass(x, self.cutoff) if self.cutoff else x


def distill_inputs(model: onnx.ModelProto, samples: int, seed: int, steps: int = STEPS,
                   learning_rate: float = LEARNING_RATE, input_shape: Sequence[int] | None = None,
                   console: Console | None = None, providers: list[str] | None = None,
                   schedule: str = SCHEDULE, objective: str = "batchnorm", priors: Priors = Priors()) -> np.ndarray:
    """``samples`` inputs distilled from ``model`` (float, BatchNorm not folded), from pink noise.

    ``objective`` "batchnorm" matches every BatchNormalization's running statistics (``batchnorm_loss``);
    "logits" drives each sample to a random target class (cross-entropy on the model's one output,
    ``logits_loss``), with the image ``priors``. ``input_shape`` (the dims after the batch dim) replaces
    the input's own where they are dynamic; ``schedule`` "constant" keeps the learning rate, "cosine"
    decays it to 0 (``maths.cosine_rate``).
    """
    forward = prepare_forward(with_input_shape(model, samples, input_shape))
    x = pink_noise(tuple(d.dim_value for d in forward.graph.input[0].type.tensor_type.shape.dim),
                   np.random.default_rng(seed))
    feed = {}
    if objective == "batchnorm":
        if not [n for n in forward.graph.node if n.op_type == "BatchNormalization"]:
            raise InputError("--synthetic distill needs BatchNormalization nodes with running statistics; "
                             "this model has none (use --synthetic pink)")
        loss, extra = batchnorm_loss, []
    else:
        classes = logits_shape(forward)[1]
        feed["targets"] = np.eye(classes, dtype=np.float32)[class_targets(samples, classes, seed)]
        loss, extra = logits_loss, [onnx.helper.make_tensor_value_info("targets", onnx.TensorProto.FLOAT,
                                                                       [samples, classes])]
    session = graph_session(gradient_model(forward, loss, extra, RULES), forward, "distillation", providers)
    name = forward.graph.input[0].name
    adam = Adam(learning_rate)
    progress = (console or Console()).progress("distill", steps, "steps")
    for step in range(steps):
        with own_graph("distillation"):
            value, gradient = session.run(["loss", "gradient"], {name: x, **feed})
        value, gradient = priors.add(x, float(value), gradient)
        x = adam.step(x, gradient, cosine_rate(learning_rate, step, steps) if schedule == "cosine" else None)
        x = priors.project(x)
        progress.advance(f"loss {value:.4f}")
    return x


def class_targets(samples: int, classes: int, seed: int) -> np.ndarray:
    """The target class of each sample: every class in turn, as evenly as the count allows, shuffled."""
    return np.random.default_rng([seed, classes]).permutation(np.arange(samples) % classes)


def logits_shape(forward: onnx.ModelProto) -> tuple[int, int]:
    """(batch, classes) of a classifier's one output; InputError for any other model."""
    outputs = forward.graph.output
    dims = [d.dim_value for d in outputs[0].type.tensor_type.shape.dim] if len(outputs) == 1 else []
    if len(dims) != 2 or dims[1] < 2:
        raise InputError("distillation without BatchNorm statistics needs a classifier: one output of shape "
                         "(batch, classes)")
    return dims[0], dims[1]


def logits_loss(b: Builder, graph: onnx.GraphProto) -> tuple[str, dict[str, str]]:
    """Cross-entropy of the logits z against the one-hot ``targets`` t, averaged over the batch of N:
    L = -sum t log softmax(z) / N, dL/dz = (softmax(z) - t) / N."""
    logits = graph.output[0].name
    n = b.shapes[logits][0]
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
        shape = b.shapes[x]
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
    with shapes inferred again."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    shape = copy.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(shape, [batch, *(dims or [d.dim_value for d in shape[1:]])]):
        if value > 0:
            dim.Clear()
            dim.dim_value = int(value)
    if any(not d.HasField("dim_value") for d in shape[1:]):
        raise InputError("--synthetic distill needs the input's dims after the batch dim (give --input-shape)")
    return onnx.shape_inference.infer_shapes(copy, data_prop=True)

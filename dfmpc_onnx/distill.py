"""BatchNorm-statistics distillation of synthetic inputs (ZeroQ-style; needs PyTorch).

Starting from pink noise, the inputs are optimised with Adam so that every
BatchNormalization of the float model sees, over the batch, the running
mean and variance it stores:

    loss = sum over BN layers l of  ||mu_l(x) - mu_l||^2 + ||sigma_l(x) - sigma_l||^2

with mu_l(x), sigma_l(x) the per-channel mean and standard deviation of the
BN's input on the synthetic batch x. This uses nothing but the model; the graph
runs in PyTorch through ``torch_graph.TorchGraph``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError
from .maths.noise import pink_noise
from .progress import Console
from .torch_graph import TorchGraph, fold_constant_subgraphs


def distill_inputs(model: onnx.ModelProto, samples: int, seed: int, steps: int = 300, learning_rate: float = 0.1,
                   input_shape: Sequence[int] | None = None, console: Console | None = None) -> np.ndarray:
    """``samples`` inputs distilled from ``model``'s BatchNormalization statistics (float, unfolded model).

    ``input_shape`` (the dims after the batch dim) replaces the input's own where they are dynamic.
    """
    try:
        import torch
    except ImportError:
        raise InputError("--synthetic distill needs PyTorch: pip install 'dfmpc-onnx[distill]'") from None
    shaped = with_input_shape(model, samples, input_shape)
    if any(not d.HasField("dim_value") for d in shaped.graph.input[0].type.tensor_type.shape.dim[1:]):
        raise InputError("--synthetic distill needs the input's dims after the batch dim (give --input-shape)")
    graph = fold_constant_subgraphs(gs.import_onnx(shaped))
    if not [n for n in graph.nodes if n.op == "BatchNormalization"]:
        raise InputError("--synthetic distill needs BatchNormalization nodes with running statistics; "
                         "this model has none (use --synthetic pink)")
    if len(graph.inputs) != 1:
        raise InputError("--synthetic distill needs a model with one input")
    shape = [samples] + [int(d) for d in graph.inputs[0].shape[1:]]
    start = pink_noise(tuple(shape), np.random.default_rng(seed))
    x = torch.tensor(start, requires_grad=True)
    optimiser = torch.optim.Adam([x], lr=learning_rate)
    interpreter = TorchGraph(graph, torch)
    progress = (console or Console()).progress("distill", steps, "steps")
    for _ in range(steps):
        optimiser.zero_grad()
        loss = interpreter.batchnorm_loss(x)
        loss.backward()
        optimiser.step()
        progress.advance(f"BatchNorm statistics loss {loss.item():.4f}")
    return x.detach().numpy().astype(np.float32)


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
    return onnx.shape_inference.infer_shapes(copy, data_prop=True)

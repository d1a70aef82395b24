"""The onnxruntime distillation against the PyTorch interpreter it replaces: the same loss, gradient and
distilled inputs to float tolerance, and the time of each (needs PyTorch; kept only until the PyTorch
path is removed).

    python tools/compare_distill_torch.py models/cifar10_resnet20.onnx --steps 300
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx_graphsurgeon as gs
import torch

from dfmpc_onnx.distill import distill_inputs, with_input_shape
from dfmpc_onnx.gradients import fold_constant_subgraphs
from dfmpc_onnx.load import load_whole_model
from dfmpc_onnx.maths.noise import pink_noise
from dfmpc_onnx.torch_graph import TorchGraph


def torch_distill(model, samples: int, seed: int, steps: int, learning_rate: float = 0.1) -> np.ndarray:
    graph = fold_constant_subgraphs(gs.import_onnx(with_input_shape(model, samples)))
    shape = [samples] + [int(d) for d in graph.inputs[0].shape[1:]]
    x = torch.tensor(pink_noise(tuple(shape), np.random.default_rng(seed)), requires_grad=True)
    optimiser = torch.optim.Adam([x], lr=learning_rate)
    interpreter = TorchGraph(graph, torch)
    for _ in range(steps):
        optimiser.zero_grad()
        interpreter.batchnorm_loss(x).backward()
        optimiser.step()
    return x.detach().numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    model = load_whole_model(args.model)
    start = time.perf_counter()
    ours = distill_inputs(model, args.samples, 0, steps=args.steps)
    middle = time.perf_counter()
    theirs = torch_distill(model, args.samples, 0, args.steps)
    end = time.perf_counter()
    difference = np.abs(ours - theirs)
    print(f"{args.model}: {args.steps} steps, {args.samples} samples; onnxruntime {middle - start:.1f} s, "
          f"PyTorch {end - middle:.1f} s; max |difference| {difference.max():.2e}, relative RMS "
          f"{np.sqrt(np.mean(difference**2) / np.mean(theirs**2)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Graph-size scaling: the tool's stage times on plain Conv-BN-Relu chains of growing node count.

    python tools/bench_chain.py [--sizes 1000 3000 10000]

Tiny 4-channel 1x1 convs on a 4x4 input, so the times are the tool's graph
work (load, BatchNorm folding, pair finding, rewriting) and not arithmetic;
``--refine none --protect off --no-check``. Linear scaling shows as a constant time per
node down the last column.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import dfmpc_onnx

CHANNELS = 4


def conv_bn_relu_chain(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """About ``nodes`` nodes: Conv-BatchNormalization-Relu repeated, random weights."""
    rng = np.random.default_rng(seed)
    graph_nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    x = "input"
    for i in range(max(1, nodes // 3)):
        w = const(f"c{i}.w", rng.normal(0, 0.5, (CHANNELS, CHANNELS, 1, 1)))
        graph_nodes.append(helper.make_node("Conv", [x, w], [f"c{i}"], name=f"c{i}"))
        bn = [const(f"c{i}.{p}", v) for p, v in (("g", rng.uniform(0.5, 1.5, CHANNELS)),
                                                  ("b", rng.normal(0, 0.1, CHANNELS)),
                                                  ("m", rng.normal(0, 0.1, CHANNELS)),
                                                  ("v", rng.uniform(0.5, 1.5, CHANNELS)))]
        graph_nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *bn], [f"c{i}.bn"], name=f"c{i}.bn"))
        graph_nodes.append(helper.make_node("Relu", [f"c{i}.bn"], [f"c{i}.relu"], name=f"c{i}.relu"))
        x = f"c{i}.relu"
    graph = helper.make_graph(graph_nodes, "chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, CHANNELS, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 3000, 10000])
    args = parser.parse_args()
    dfmpc_onnx.quantize(conv_bn_relu_chain(30), refine="none", protect="off", check=False)  # compile the Numba kernels first
    print("| nodes | load | fold | pairs | quantize | solve | emit | total (s) | ms per node |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        model = conv_bn_relu_chain(size)
        start = time.perf_counter()
        _, report = dfmpc_onnx.quantize(model, refine="none", protect="off", check=False)
        total = time.perf_counter() - start
        t = report.timings
        stages = " | ".join(f"{t.get(s, 0.0):.2f}" for s in ("load", "fold", "pairs", "quantize", "solve", "emit"))
        print(f"| {len(model.graph.node):,} | {stages} | {total:.2f} | {1000 * total / len(model.graph.node):.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

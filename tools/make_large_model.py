"""Write a synthetic plain-chain CNN with about ``--gib`` GiB of float32 weights (BN kept), for memory benchmarks.

    python tools/make_large_model.py OUT.onnx --gib 1.0 [--external-data]

Random weights, 1024-channel 3x3 convolutions on an 8x8 input; above 2 GiB
the weights must go to external data (protobuf's limit), which the flag forces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 1024
KERNEL = 3


def large_chain(gib: float, seed: int = 0) -> onnx.ModelProto:
    """Stem, N x (Conv-BN-Relu) with N chosen to reach ``gib`` GiB of weights, GlobalAveragePool, Gemm."""
    rng = np.random.default_rng(seed)
    per_conv = CHANNELS * CHANNELS * KERNEL * KERNEL * 4
    count = max(2, int(round(gib * 2**30 / per_conv)))
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    x = "input"
    cin = 3
    for i in range(count + 1):
        name = f"conv{i}"
        fan_in = cin * KERNEL * KERNEL
        w = const(f"{name}.weight", rng.standard_normal((CHANNELS, cin, KERNEL, KERNEL), dtype=np.float32)
                  * np.float32(np.sqrt(2.0 / fan_in)))
        nodes.append(helper.make_node("Conv", [x, w], [f"{name}.out"], name=name, pads=[1] * 4))
        bn = [const(f"{name}.bn.{p}", v) for p, v in (
            ("gamma", rng.uniform(0.5, 1.5, CHANNELS)), ("beta", rng.normal(0, 0.1, CHANNELS)),
            ("mean", rng.normal(0, 0.1, CHANNELS)), ("var", rng.uniform(0.5, 1.5, CHANNELS)))]
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.out", *bn], [f"{name}.bn"], name=f"{name}.bn"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}.relu"))
        x, cin = f"{name}.relu", CHANNELS
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    fc_w = const("fc.weight", rng.standard_normal((10, CHANNELS)) * 0.03)
    fc_b = const("fc.bias", np.zeros(10))
    nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "large_chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--gib", type=float, default=1.0, help="weight size in GiB (default 1.0)")
    parser.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    args = parser.parse_args()
    model = large_chain(args.gib)
    external = args.external_data or model.ByteSize() >= 2**31 - 2**20
    onnx.save_model(model, args.output, save_as_external_data=external,
                    location=f"{args.output.name}.data" if external else None)
    weights = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    print(f"wrote {args.output}: {len(model.graph.node)} nodes, {weights / 2**30:.3f} GiB of weights"
          + (" (external data)" if external else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference latency of the tool's outputs against the float model, in onnxruntime and OpenVINO (CPU).

    python tools/bench_latency.py --readme
    python tools/bench_latency.py --models cifar10_resnet56 --batches 1 --repeat 50

For each model (the synthetic ResNet-50 of ``tools/make_imagenet_models.py``,
made when missing and PyTorch is there, and the shared models), the float
model and each output below, in the same run: the median wall time of
--repeat runs of one batch of random inputs, after two warm-up runs, at each
batch size, in onnxruntime's CPU provider and OpenVINO's CPU plugin with
their default settings (what a user gets), and the ratio to the float model
in the same runtime. An output a runtime refuses is marked so. The outputs
are made with ``--refine none --no-check`` (the refinement changes weight
values, not the graph):

- weight-only 4/8 and 2/6 (``--storage exact``, the default), and 2/6
  ``--storage portable`` (INT4/INT8, which OpenVINO loads);
- W8A8 (``--scheme 8 --activations 8``) and W4A8 (``--scheme 4/8
  --activations 8``): activations quantized around every layer, residual
  Add and pool, weights in INT8 (``--storage auto``), which both runtimes
  run on integer kernels;
- beside them, onnxruntime's own ``quantize_static`` W8A8 (QDQ, per-channel
  int8 weights, uint8 activations calibrated on 8 noise inputs), what an
  onnxruntime user would otherwise run.

A model whose batch dim is fixed (the synthetic ResNet-50 is exported at
batch 1) is measured through a copy with the batch dim made symbolic, as
exporters write it with dynamic axes; the outputs are made from that copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import dfmpc_onnx
from bench_accuracy import ROOT, publish
from bench_speed import model_paths, ort_quantize_static, random_batches

QUICK = dict(refine="none", check=False, protect="off", synthetic="pink", samples=16)
"""Latency depends on the graph, not on the weight values: no refinement or probes, few calibration inputs."""
OUTPUTS = {
    "float": None,
    "4/8 weight-only, exact": dict(scheme="4/8"),
    "2/6 weight-only, exact": dict(scheme="2/6"),
    "2/6 weight-only, portable": dict(scheme="2/6", storage="portable"),
    "8 W8A8, int8": dict(scheme="8", activations="8"),
    "4/8 W4A8, int8": dict(scheme="4/8", activations="8"),
    "onnxruntime quantize_static W8A8 (peer)": "onnxruntime",
}
MODELS = ("resnet50", "cifar10_resnet56", "imagenet_efficientnet_lite0")


def dynamic_batch(source: Path, workdir: Path) -> Path:
    """``source``, or a copy of it whose inputs' and outputs' first dim is the symbol N where it was fixed."""
    model = onnx.load(str(source))
    dims = [value.type.tensor_type.shape.dim[0] for value in list(model.graph.input) + list(model.graph.output)]
    if not any(dim.HasField("dim_value") for dim in dims):
        return source
    for dim in dims:
        dim.dim_param = "N"
    del model.graph.value_info[:]  # shape inference fills them again, with N
    path = workdir / f"{source.stem}-dynamic-batch.onnx"
    onnx.save(model, str(path))
    return path


def random_input(path: Path, batch: int) -> tuple[str, np.ndarray]:
    """A random batch for the model's first input."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]]
    return spec.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def median_ms(run, repeat: int) -> float:
    run(), run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def onnxruntime_ms(path: Path, name: str, x: np.ndarray, repeat: int) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return median_ms(lambda: session.run(None, {name: x}), repeat)


def openvino_ms(path: Path, name: str, x: np.ndarray, repeat: int) -> float | str:
    try:
        import openvino as ov
    except ImportError:
        return "not installed"
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
        compiled = core.compile_model(model, "CPU")
    except Exception:  # OpenVINO refuses types it does not know (INT2/UINT2)
        return "refuses"
    request = compiled.create_infer_request()
    return median_ms(lambda: request.infer({0: x}), repeat)


def run(models: list[str], batches: list[int], repeat: int, workdir: Path) -> list[dict]:
    results = []
    for model, original in model_paths(models, ROOT / "bench_out" / "speed_models").items():
        source = dynamic_batch(original, workdir)
        for label, options in OUTPUTS.items():
            path = source
            if options is not None:
                path = workdir / f"{model}-{len(results)}.onnx"
                if options == "onnxruntime":
                    ort_quantize_static(source, path, "int8", random_batches(source, 8))
                else:
                    dfmpc_onnx.quantize_file(source, path, **{**QUICK, **options})
            for runtime, measure in (("onnxruntime", onnxruntime_ms), ("OpenVINO", openvino_ms)):
                row = dict(model=model, output=label, runtime=runtime, ms={})
                for batch in batches:
                    row["ms"][batch] = measure(path, *random_input(source, batch), repeat)
                print(row, flush=True)
                results.append(row)
    return results


def markdown(results: list[dict], batches: list[int]) -> str:
    floats = {(r["model"], r["runtime"]): r["ms"] for r in results if r["output"] == "float"}
    head = " | ".join(f"batch {b} (ms, x float)" for b in batches)
    lines = [f"| model | output | runtime | {head} |", "|---|---|---|" + "---|" * len(batches)]
    for r in results:
        cells = []
        for b in batches:
            value, base = r["ms"][b], floats[(r["model"], r["runtime"])][b]
            cells.append(value if isinstance(value, str) else
                         f"{value:.1f}" + (f" ({value / base:.2f}x)" if not isinstance(base, str) else ""))
        lines.append(f"| {r['model']} | {r['output']} | {r['runtime']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per cell; the median is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table and JSON")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.batches, args.repeat, Path(workdir))
    publish(markdown(results, args.batches), results, args.out, "latency", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

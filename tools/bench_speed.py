"""Speed benchmark: the tool's wall time against the I/O floor and against what users would otherwise run.

    python tools/bench_speed.py --readme                      # every model, the README's table
    python tools/bench_speed.py --models resnet50 --refinements stats

Models: ImageNet-shaped ResNet-18/50/101, MobileNetV2 and DenseNet-121 with
random weights and BatchNormalization kept (made once by
tools/make_imagenet_models.py into --models-dir; PyTorch needed for that
step only), plus ../shared's CIFAR-10 ResNets when present. For each model,
in one process and one run, each timing the median of --repeat runs:

- floor: ``onnx.load`` + ``onnx.save`` of the same file, the least any tool
  that reads and writes the model must spend;
- dfmpc: ``quantize_file(..., refine="none", protect="off", check=False)`` (the CLI's
  ``--no-check --refine none --protect off``), split by stage (load, fold, pairs,
  quantize, solve, emit, save), and its ratio to the floor;
- check: the onnxruntime check that the default adds (stage time);
- each refinement in --refinements (``--refine stats`` on pink noise by
  default; ``refit`` also distils, and needs PyTorch), with --samples inputs;
- peers: onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ,
  per-channel int8 and int4 weights, uint8 activations, MinMax on
  --calibration random batches), and onnxsim's
  ``quantize_weight_only_int4`` where onnxsim is installed.

Numba's first-call compile time is measured apart, in a fresh process with
an empty cache (``NUMBA_CACHE_DIR``), and again with the cache it left.
Prints a Markdown table, writes OUT/speed.json and OUT/speed.md, and with
--readme puts the table into README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

import dfmpc_onnx
from bench_accuracy import ROOT, SHARED, publish

SYNTHETIC = ("resnet18", "resnet50", "resnet101", "mobilenetv2", "densenet121")
CIFAR = ("cifar10_resnet20", "cifar10_resnet56")
STAGES = ("load", "fold", "pairs", "quantize", "solve", "emit", "save")


def model_paths(names: list[str], models_dir: Path) -> dict[str, Path]:
    """The model files, making the synthetic ones that are missing (needs PyTorch)."""
    missing = [n for n in names if n in SYNTHETIC and not (models_dir / f"{n}.onnx").exists()]
    if missing:
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_imagenet_models.py"), str(models_dir),
                        "--models", *missing], check=True)
    paths = {}
    for name in names:
        path = models_dir / f"{name}.onnx" if name in SYNTHETIC else SHARED / "models" / f"{name}.onnx"
        if path.exists():
            paths[name] = path
        else:
            print(f"skipped {name}: {path} not found", file=sys.stderr)
    return paths


def median_time(action: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median wall time of ``repeat`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def io_floor(path: Path, out: Path) -> None:
    onnx.save(onnx.load(str(path)), str(out))


def dfmpc_stages(path: Path, out: Path, repeat: int, **options) -> tuple[float, dict[str, float]]:
    """Median total and the stage times of the median run; "save" is what ``quantize_file`` spends after
    ``quantize`` returns (writing the file)."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        report = dfmpc_onnx.quantize_file(path, out, **options)
        total = time.perf_counter() - start
        stages = dict(report.timings)
        stages["save"] = max(0.0, total - sum(report.timings.values()))
        runs.append((total, stages))
    runs.sort(key=lambda run: run[0])
    return runs[len(runs) // 2]


class Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input arrays."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.batches = iter([{name: batch} for batch in batches])

    def get_next(self):
        return next(self.batches, None)


def random_batches(path: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` seeded Gaussian batches shaped as the model's input (dynamic dims as 1)."""
    model = onnx.load(str(path), load_external_data=False)
    value = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def ort_quantize_static(path: Path, out: Path, weight_type: str, batches: list[np.ndarray]) -> None:
    """What an onnxruntime user runs: shape pre-processing, then static QDQ quantization, per channel,
    uint8 activations calibrated (MinMax) on ``batches``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(path), str(prepared))
    model = onnx.load(str(prepared), load_external_data=False)
    name = next(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    quantize_static(str(prepared), str(out), Batches(name, batches),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QInt4)
    prepared.unlink()


def onnxsim_int4(path: Path, out: Path) -> None:
    import onnxsim

    onnx.save(onnxsim.quantize_weight_only_int4(onnx.load(str(path))), str(out))


def compile_times(model: Path) -> dict[str, float]:
    """Seconds for a fresh process to quantize ``model`` with an empty Numba cache, then with the cache warm."""
    script = ("import sys, time; t = time.perf_counter(); import dfmpc_onnx; "
              "dfmpc_onnx.quantize(sys.argv[1], refine='none', check=False); print(time.perf_counter() - t)")
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for key in ("cold cache", "warm cache"):
            output = subprocess.run([sys.executable, "-c", script, str(model)], env=env, check=True,
                                    capture_output=True, text=True).stdout
            result[key] = round(float(output.split()[-1]), 2)
    result["compile"] = round(result["cold cache"] - result["warm cache"], 2)
    return result


def bench_model(name: str, path: Path, workdir: Path, args: argparse.Namespace) -> dict:
    out = workdir / f"{name}.out.onnx"
    row: dict = {"model": name, "mib": round(path.stat().st_size / 2**20, 1),
                 "nodes": len(onnx.load(str(path), load_external_data=False).graph.node)}
    row["floor"], _ = median_time(lambda: io_floor(path, out), args.repeat)
    row["dfmpc"], row["stages"] = dfmpc_stages(path, out, args.repeat, refine="none", protect="off", check=False)
    _, checked = dfmpc_stages(path, out, 1, refine="none", protect="off", check=True)
    row["check"] = checked.get("check")
    row["refine"] = {}
    for refinement in args.refinements:
        total, stages = dfmpc_stages(path, out, 1, refine=refinement, samples=args.samples, check=False,
                                     synthetic="distill" if refinement == "refit" else "pink")
        row["refine"][refinement] = {"total": total, "refine": stages.get("refine"), "samples": args.samples}
    row["peers"] = {}
    for weight_type in ("int8", "int4"):
        row["peers"][f"ort {weight_type}"], _ = median_time(
            lambda: ort_quantize_static(path, workdir / f"{name}.ort.onnx", weight_type,
                                        random_batches(path, args.calibration)), 1)
    if importlib.util.find_spec("onnxsim") is not None:
        row["peers"]["onnxsim int4"], _ = median_time(lambda: onnxsim_int4(path, workdir / f"{name}.sim.onnx"), 1)
    print(f"{name}: floor {row['floor']:.2f} s, dfmpc {row['dfmpc']:.2f} s ({row['dfmpc'] / row['floor']:.2f}x)",
          file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict], compile_time: dict[str, float], refinements: list[str]) -> str:
    peers = sorted({peer for row in rows for peer in row["peers"]})
    head = (["model", "MiB", "nodes", "I/O floor (s)", "dfmpc (s)", "x floor"] + [f"{s}" for s in STAGES]
            + ["check (s)"] + [f"--refine {r} (s)" for r in refinements] + [f"{p} (s, x dfmpc)" for p in peers])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], f"{row['mib']:.1f}", f"{row['nodes']:,}", f"{row['floor']:.3f}",
                 f"{row['dfmpc']:.3f}", f"**{row['dfmpc'] / row['floor']:.2f}**"]
        cells += [f"{row['stages'].get(s, 0.0):.2f}" for s in STAGES]
        cells.append("" if row["check"] is None else f"{row['check']:.2f}")
        cells += [f"{row['refine'][r]['total']:.1f}" if r in row["refine"] else "" for r in refinements]
        cells += [f"{row['peers'][p]:.2f} ({row['peers'][p] / row['dfmpc']:.1f}x)" if p in row["peers"] else ""
                  for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Numba's first call: {compile_time['compile']:.1f} s of compilation (a fresh process "
                 f"quantizing models/bottleneck_resnet.onnx took {compile_time['cold cache']:.1f} s with an empty cache, "
                 f"{compile_time['warm cache']:.1f} s with the cache it left on disk); every time above is with "
                 f"the cache warm. {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                 f"Python {platform.python_version()}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SYNTHETIC + CIFAR), choices=list(SYNTHETIC + CIFAR))
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench_out" / "speed_models",
                        help="where the synthetic models are kept (made when missing)")
    parser.add_argument("--refinements", nargs="*", default=["stats"], choices=["stats", "refit"],
                        help="refinements to time (default: stats)")
    parser.add_argument("--samples", type=int, default=64, help="synthetic inputs for the refinements (default 64, the tool's)")
    parser.add_argument("--calibration", type=int, default=4, help="random calibration batches for onnxruntime")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the median is kept (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table and JSON")
    parser.add_argument("--readme", action="store_true", help="also put the table into README.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    paths = model_paths(args.models, args.models_dir)
    compile_model = ROOT / "models" / "bottleneck_resnet.onnx"
    compile_time = compile_times(compile_model)
    dfmpc_onnx.quantize(str(compile_model), refine="none", protect="off", check=False)  # load this process's kernels
    with tempfile.TemporaryDirectory() as workdir:
        rows = [bench_model(name, path, Path(workdir), args) for name, path in paths.items()]
    publish(markdown(rows, compile_time, args.refinements), {"rows": rows, "numba": compile_time}, args.out,
            "speed", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

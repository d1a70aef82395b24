"""Accuracy per stored bit: top-1 against stored bits per weight, for the tool and for what users would
otherwise run, on the shared CIFAR-10 ResNets.

    python tools/bench_budget.py --readme          # the README's table and plot

Rows per model, each scored on the shared test images (which are used for
scoring only) with its stored bits per weight measured from the written file
(``dfmpc_onnx.report.stored_bits_per_weight``: integers, scales, zero points
and offsets of every Conv/Gemm weight, floats at 32) and its file size:

- per-channel rounding at 8, 6, 4 and 3 bits as users know it: symmetric
  integers, max-scaled per output channel (``--scheme B/B
  --no-compensation --refine none --granularity channel --kbit-grid
  integer --kbit-rounding nearest``; Eq. 6's grid has no zero and scored below it);
- onnxruntime ``quantize_static``, QDQ per channel, int8 and int4 weights,
  uint8 activations calibrated on 32 Gaussian-noise inputs, and int8 and int4
  calibrated on 32 real images (the first 32 of jpeg10k: labelled real data);
- the paper's DF-MPC at 2/6 and 3/6 (``--refine none``);
- the tool's defaults at 2/6, 2/4, 3/6 and uniform 4 and 3;
- the defaults at 4/8 and 8 with ``--activations 8 --storage portable``
  (weights and activations quantized, data-free: W4A8 and W8A8 beside
  onnxruntime's, which calibrates on noise or on real images);
- ``--target-bits`` 4, 3.5, 3 and 2.5 with the default refinement.

The tool's rows use the default synthetic inputs (distilled once per model
when PyTorch is installed, else pink noise). Writes OUT/budget.md,
OUT/budget.json and OUT/budget.png (matplotlib), and with --readme puts the
table into README.md and the plot beside it in docs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx

import dfmpc_onnx
from bench_accuracy import (DATASETS, PAPER, ROOT, SHARED, default_synthetic, distilled_inputs, load_cifar, publish,
                            top1)
from bench_speed import ort_quantize_static, random_batches
from dfmpc_onnx.report import stored_bits_per_weight

ROUNDING = (8, 6, 4, 3)
ROUNDING_OPTIONS = dict(compensate=False, refine="none", granularity="channel", kbit_grid="integer",
                        kbit_rounding="nearest", protect="off")
"""Plain per-channel rounding as users know it: symmetric integers, max-scaled, each weight to the nearest."""
TOOL = [
    ("DF-MPC (paper) 2/6", dict(scheme="2/6", **PAPER)),
    ("DF-MPC (paper) 3/6", dict(scheme="3/6", **PAPER)),
    ("dfmpc default 2/6", dict(scheme="2/6")),
    ("dfmpc default 2/4", dict(scheme="2/4")),
    ("dfmpc default 3/6", dict(scheme="3/6")),
    ("dfmpc default, uniform 4", dict(scheme="4")),
    ("dfmpc default, uniform 3", dict(scheme="3")),
] + [(f"dfmpc --target-bits {b:g}", dict(target_bits=b)) for b in (4.0, 3.5, 3.0, 2.5)] + [
    (f"dfmpc default {scheme}, --activations 8 (W{scheme.split('/')[0]}A8), portable",
     dict(scheme=scheme, activations="8", storage="portable")) for scheme in ("4/8", "8")]


def score(path: Path, data: dict) -> dict[str, float]:
    return {name: top1(path, *arrays) for name, arrays in data.items()}


def row(model: str, family: str, method: str, path: Path, data: dict, seconds: float | None) -> dict:
    result = dict(model=model, family=family, method=method, bits=stored_bits_per_weight(onnx.load(str(path))),
                  bytes=path.stat().st_size, seconds=None if seconds is None else round(seconds, 2),
                  top1=score(path, data))
    scores = "  ".join(f"{k} {v:6.2f} %" for k, v in result["top1"].items())
    print(f"{model:18s} {method:40s} {result['bits']:5.2f} bits  {scores}", flush=True)
    return result


def rounding_rows(model: str, source: Path, widths: tuple[int, ...], data: dict, workdir: Path) -> list[dict]:
    """Plain per-channel rounding (``ROUNDING_OPTIONS``) of ``source`` at each of ``widths``, scored."""
    rows = []
    for bits in widths:
        out = workdir / f"{model}-round{bits}.onnx"
        start = time.perf_counter()
        dfmpc_onnx.quantize_file(source, out, scheme=f"{bits}", check=False, **ROUNDING_OPTIONS)
        rows.append(row(model, "rounding", f"per-channel rounding {bits}-bit (symmetric integers)", out, data,
                        time.perf_counter() - start))
    return rows


def onnxruntime_rows(model: str, source: Path, real: list[np.ndarray], real_label: str, data: dict,
                     workdir: Path) -> list[dict]:
    """onnxruntime's ``quantize_static`` of ``source``, int8 and int4 weights, calibrated on 32 noise batches
    and on ``real`` (labelled as real data), scored."""
    noise = random_batches(source, 32)
    rows = []
    for weight_type in ("int8", "int4"):
        for calibration, batches in (("noise calibration", noise), (f"{real_label} (real data)", real)):
            out = workdir / f"{model}-{weight_type}-{len(rows)}.onnx"
            start = time.perf_counter()
            ort_quantize_static(source, out, weight_type, batches)
            rows.append(row(model, "onnxruntime", f"onnxruntime {weight_type}, {calibration}", out, data,
                            time.perf_counter() - start))
    return rows


def run(models: list[str], datasets: list[str], workdir: Path) -> list[dict]:
    data = {name: load_cifar(name) for name in datasets}
    calibration_images = load_cifar("jpeg10k")[0][:32]
    results = []
    for model in models:
        source = SHARED / "models" / f"{model}.onnx"
        results.append(row(model, "float", "Float", source, data, None))
        results += rounding_rows(model, source, ROUNDING, data, workdir)
        results += onnxruntime_rows(model, source, [x[None] for x in calibration_images], "32 real images", data,
                                    workdir)
        synthetic, distill_seconds = {}, 0.0
        if default_synthetic(source) == "distill":
            inputs, distill_seconds = distilled_inputs(source)
            synthetic = {"synthetic_inputs": inputs, "synthetic": "distill"}
        for method, options in TOOL:
            out = workdir / f"{model}-{len(results)}.onnx"
            start = time.perf_counter()
            dfmpc_onnx.quantize_file(source, out, check=False, **options,
                                     **({} if options.get("refine") == "none" else synthetic))
            seconds = time.perf_counter() - start + (0.0 if options.get("refine") == "none" else distill_seconds)
            family = "paper" if options.get("refine") == "none" else (
                "target" if "target_bits" in options else "dfmpc")
            results.append(row(model, family, method, out, data, seconds))
    return results


def markdown(results: list[dict], datasets: list[str]) -> str:
    head = " | ".join(f"top-1 {name} (%)" for name in datasets)
    lines = [f"| model | method | stored bits / weight | {head} | file (bytes) | time (s) |",
             "|---|---|---|" + "---|" * len(datasets) + "---|---|"]
    for r in results:
        scores = " | ".join(f"{r['top1'][name]:.2f}" for name in datasets)
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['bits']:.2f} | {scores} | {r['bytes']:,} | {seconds} |")
    return "\n".join(lines)


def plot(results: list[dict], dataset: str, path: Path) -> None:
    """Top-1 on ``dataset`` against stored bits per weight, one panel per model (float as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    styles = {"rounding": ("o", "tab:gray"), "onnxruntime": ("s", "tab:orange"), "paper": ("v", "tab:purple"),
              "dfmpc": ("D", "tab:blue"), "target": ("*", "tab:green")}
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        for r in rows:
            if r["family"] == "float":
                axis.axhline(r["top1"][dataset], color="black", linestyle="--", linewidth=1, label="float")
        for family, (marker, color) in styles.items():
            points = sorted((r["bits"], r["top1"][dataset]) for r in rows if r["family"] == family)
            if points:
                axis.plot(*zip(*points), marker=marker, color=color, linestyle="-" if family in (
                    "rounding", "target") else "none", label=family)
        float_top1 = next(r["top1"][dataset] for r in rows if r["family"] == "float")
        shown = [r["top1"][dataset] for r in rows if r["top1"][dataset] >= float_top1 - 25]
        below = [r for r in rows if r["top1"][dataset] < float_top1 - 25]
        axis.set_xlim(1.5, 9)
        axis.set_ylim(min(shown) - 2, max(shown) + 2)
        if below:
            axis.text(0.02, 0.02, textwrap.fill("below the axis: " + "; ".join(
                f"{r['method']} {r['top1'][dataset]:.1f} %" for r in below), 70), transform=axis.transAxes, fontsize=7)
        axis.set_xlabel("stored bits per weight (measured from the file)")
        axis.set_ylabel(f"top-1 on {dataset} (%)")
        axis.set_title(model)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet56"])
    parser.add_argument("--data", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table, JSON and plot")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md and the plot into docs/budget.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots from OUT/budget.json")
    parser.add_argument("--key", default="budget",
                        help="the README markers the table goes between (the plot is drawn only for 'budget')")
    args = parser.parse_args()
    if args.replot:
        results = json.loads((args.out / "budget.json").read_text())
        plot(results, args.data[0], args.out / "budget.png")
        plot(results, args.data[0], ROOT / "docs" / "budget.png")
        return 0
    missing = [name for name in set(args.data) | {"jpeg10k"} if not (SHARED / "data" / DATASETS[name]).exists()]
    if missing:
        print(f"skipped: {SHARED}/data lacks {', '.join(DATASETS[name] for name in missing)}", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.data, Path(workdir))
    plot(results, args.data[0], args.out / "budget.png")
    if args.readme and args.key == "budget":
        (ROOT / "docs").mkdir(exist_ok=True)
        plot(results, args.data[0], ROOT / "docs" / "budget.png")
    publish(markdown(results, args.data), results, args.out, args.key, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ImageNet benchmark: EfficientNet-Lite0 float vs quantized top-1 on the shared one-image-per-class sample.

    python tools/bench_imagenet.py --readme
    python tools/bench_imagenet.py --schemes 4/8 --relu6 refuse pair
    python tools/bench_imagenet.py --budget --readme     # top-1 against stored bits, and its plot

For each scheme: uncompensated rounding, the paper's method, and the tool's
defaults under each ReLU6 choice (``--relu6 refuse|pair|relu``), with file
sizes and the tool's wall time, as a Markdown table and JSON. Reads
../shared/models/imagenet_efficientnet_lite0.onnx and
../shared/data/imagenet_sample224_jpeg.npz (decoded with Pillow) and exits
with a message when they are absent. The images are used for scoring only,
except by the onnxruntime rows labelled as calibrated on real images.

``--budget`` scores instead top-1 against stored bits per weight (measured
from each file): plain per-channel rounding at 4, 6 and 8 bits, onnxruntime's
``quantize_static`` (int8 and int4 weights, uint8 activations) calibrated on
noise and on 32 of the scored images, and the tool's defaults at 4/8, 2/6
and ``--target-bits`` 3, 3.5, 4, 5 and 6; ``--model`` scores another
EfficientNet-class file taking the same input.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dfmpc_onnx
from bench_accuracy import PAPER, ROOT, SHARED, publish, top1
from bench_budget import ROUNDING_OPTIONS, markdown as budget_markdown, onnxruntime_rows, plot, rounding_rows, row

MODEL = SHARED / "models" / "imagenet_efficientnet_lite0.onnx"
DATA = SHARED / "data" / "imagenet_sample224_jpeg.npz"
RELU6 = ("refuse", "pair", "relu")
VARIANTS = {  # further rows, on request (--variants)
    "mse-none": ("--kbit-range mse, --refine none", dict(kbit_range="mse", refine="none")),
    "mse": ("--kbit-range mse, default refinement", dict(kbit_range="mse")),
    "refit-pink": ("--refine refit --synthetic pink", dict(refine="refit", synthetic="pink")),
    "distill": ("--synthetic distill (logits objective)", dict(synthetic="distill")),
    "distill-stats": ("--synthetic distill --refine stats", dict(synthetic="distill", refine="stats")),
    "integer": ("--kbit-grid integer, default refinement", dict(kbit_grid="integer")),
    "a8": ("--activations 8 (W8A8 or W4A8, int8 storage)", dict(activations="8")),
    "integer-none": ("--kbit-grid integer, --refine none", dict(kbit_grid="integer", refine="none")),
    "rounding-integer": ("plain rounding, symmetric integers per channel", ROUNDING_OPTIONS),
    "nearest": ("--kbit-rounding nearest, default refinement", dict(kbit_rounding="nearest")),
    "feedback": ("--error-feedback on, default refinement", dict(error_feedback="on")),
    "pink": ("--synthetic pink", dict(synthetic="pink")),
    "leaves": ("--synthetic leaves", dict(synthetic="leaves")),
    "leaves-feedback": ("--synthetic leaves --error-feedback on", dict(synthetic="leaves", error_feedback="on")),
}


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """N x 3 x 224 x 224 float32 scaled as (x - 127) / 128 (the shared README), and labels."""
    from PIL import Image

    data = np.load(DATA)
    blob, offsets = data["jpeg"], data["offsets"]
    images = [np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
              for i in range(len(offsets) - 1)]
    x = (np.stack(images).astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), data["y"].astype(np.int64)


def methods(relu6_choices: list[str], variants: list[str]) -> list[tuple[str, dict]]:
    rows = [("Original (rounding, paper's per-tensor scales)", dict(compensate=False, **PAPER)),
            ("DF-MPC (paper), --relu6 refuse", PAPER),
            ("DF-MPC closed form, per-channel k-bit scales", dict(refine="none"))]
    rows += [(f"default, --relu6 {choice}", dict(relu6=choice)) for choice in relu6_choices]
    return rows + [VARIANTS[key] for key in variants]


def run(schemes: list[str], relu6_choices: list[str], workdir: Path, variants: list[str] = ()) -> list[dict]:
    images, labels = load_sample()
    results = [dict(scheme="float", method="Float", bytes=MODEL.stat().st_size, seconds=None,
                    top1=top1(MODEL, images, labels, batch=50))]
    print(_line(results[-1]), flush=True)
    for scheme in schemes:
        for label, options in methods(relu6_choices, list(variants)):
            out = workdir / f"lite0-{len(results)}.onnx"
            start = time.perf_counter()
            report = dfmpc_onnx.quantize_file(MODEL, out, scheme=scheme, check=False, **options)
            seconds = time.perf_counter() - start
            results.append(dict(scheme=scheme, method=label, bytes=out.stat().st_size, seconds=round(seconds, 2),
                                pairs=len(report.pairs), low_layers=report.count("low"),
                                replaced_clips=len(report.replaced_clips), refine=report.refine,
                                synthetic=report.synthetic, top1=top1(out, images, labels, batch=50)))
            print(_line(results[-1]), flush=True)
    return results


BUDGET_BITS = (3.0, 3.5, 4.0, 5.0, 6.0)


def run_budget(model: Path, workdir: Path, target_bits: tuple[float, ...] = BUDGET_BITS) -> list[dict]:
    """Top-1 against stored bits per weight for rounding, onnxruntime and the tool (``--budget``)."""
    images, labels = load_sample()
    data = {"imagenet": (images, labels)}
    name = model.stem.removeprefix("imagenet_")
    results = [row(name, "float", "Float", model, data, None)]

    def tool(family: str, method: str, **options) -> None:
        out = workdir / f"{name}-{len(results)}.onnx"
        start = time.perf_counter()
        dfmpc_onnx.quantize_file(model, out, check=False, **options)
        results.append(row(name, family, method, out, data, time.perf_counter() - start))

    results += rounding_rows(name, model, (8, 6, 4), data, workdir)
    real = [x[None] for x in images[::len(images) // 32][:32]]
    results += onnxruntime_rows(name, model, real, "32 scored images", data, workdir)
    for scheme in ("4/8", "2/6"):
        tool("dfmpc", f"dfmpc default {scheme}", scheme=scheme)
    for bits in target_bits:
        tool("target", f"dfmpc --target-bits {bits:g}", target_bits=bits)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | scheme | method | pairs | Clips replaced | top-1 ImageNet sample (%) | file size (bytes) "
             "| tool time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| efficientnet_lite0 | {r['scheme']} | {r['method']} | {r.get('pairs', '-')} "
                     f"| {r.get('replaced_clips', '-')} | {r['top1']:.1f} | {r['bytes']:,} | {seconds} |")
    return "\n".join(lines)


def _line(row: dict) -> str:
    return (f"lite0 {row['scheme']:5s} {row['method']:34s} pairs {row.get('pairs', '-')!s:>3}  "
            f"top-1 {row['top1']:5.1f} %  {row['bytes']:>11,} bytes  {row['seconds'] or 0:7.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["4/8", "3/6", "2/6"])
    parser.add_argument("--relu6", nargs="*", choices=RELU6, default=list(RELU6))
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=[],
                        help="further rows: " + "; ".join(f"{k}: {v[0]}" for k, v in VARIANTS.items()))
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table and JSON")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between its imagenet markers")
    parser.add_argument("--key", default="imagenet", help="the README markers to write between (default imagenet)")
    parser.add_argument("--budget", action="store_true", help="top-1 against stored bits per weight, and its plot")
    parser.add_argument("--model", type=Path, default=MODEL, help="with --budget: the model to score")
    parser.add_argument("--target-bits", type=float, nargs="+", default=list(BUDGET_BITS),
                        help="with --budget: the --target-bits rows")
    parser.add_argument("--replot", action="store_true",
                        help="with --budget: only redraw the plot (and docs/) from OUT/budget-MODEL.json")
    args = parser.parse_args()
    if not args.model.exists() or not DATA.exists():
        print(f"skipped: {args.model} or {DATA} is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget:
        key = args.key if args.key != "imagenet" else f"budget-{args.model.stem.removeprefix('imagenet_')}"
        if args.replot:
            results = json.loads((args.out / f"{key}.json").read_text())
            plot(results, "imagenet", args.out / f"{key}.png")
            plot(results, "imagenet", ROOT / "docs" / f"{key}.png")
            return 0
        with tempfile.TemporaryDirectory() as workdir:
            results = run_budget(args.model, Path(workdir), tuple(args.target_bits))
        plot(results, "imagenet", args.out / f"{key}.png")
        if args.readme:
            plot(results, "imagenet", ROOT / "docs" / f"{key}.png")
        publish(budget_markdown(results, ["imagenet"]), results, args.out, key, args.readme)
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.schemes, args.relu6, Path(workdir), args.variants)
    publish(markdown(results), results, args.out, args.key, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

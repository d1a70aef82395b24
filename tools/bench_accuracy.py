"""Accuracy benchmark: float vs quantized top-1 on the shared CIFAR-10 test images.

    python tools/bench_accuracy.py                      # ResNet-20 and ResNet-56, scheme 2/6
    python tools/bench_accuracy.py --data jpeg10k --schemes 2/6 3/6

For each model it scores the float model, uncompensated rounding ("Original"
in the paper) and DF-MPC (the paper's closed form), in the qdq and float
formats, and writes a Markdown table (for the README) and JSON. It reads the
models and data from ../shared and exits with a message when they are absent.
The test images are used for scoring only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import dfmpc_onnx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = {"exact846": "cifar10_test_exact846.npz", "jpeg10k": "cifar10_test_jpeg10k.npz"}
CIFAR_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
CIFAR_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_cifar(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as N x 3 x 32 x 32 float32, normalised as the shared README says, and labels."""
    data = np.load(SHARED / "data" / DATASETS[name])
    x = (data["x"].astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), data["y"].astype(np.int64)


def top1(model_path: Path, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch):
        logits = session.run(None, {name: images[start:start + batch]})[0]
        correct += int(np.sum(logits.argmax(axis=1) == labels[start:start + batch]))
    return 100.0 * correct / len(images)


def methods(scheme: str) -> list[tuple[str, dict]]:
    """(row label, quantize options) for one scheme."""
    rows = []
    for fmt in ("qdq", "float"):
        rows.append((f"Original {scheme} ({fmt})", dict(scheme=scheme, format=fmt, compensate=False)))
        rows.append((f"DF-MPC {scheme} ({fmt})", dict(scheme=scheme, format=fmt)))
    return rows


def run(models: list[str], schemes: list[str], data_name: str, workdir: Path) -> list[dict]:
    images, labels = load_cifar(data_name)
    results = []
    for model in models:
        source = SHARED / "models" / f"{model}.onnx"
        row = dict(model=model, method="Float", data=data_name, top1=top1(source, images, labels),
                   bytes=source.stat().st_size, seconds=None)
        print(_line(row), flush=True)
        results.append(row)
        for scheme in schemes:
            for label, options in methods(scheme):
                out = workdir / f"{model}-{len(results)}.onnx"
                start = time.perf_counter()
                report = dfmpc_onnx.quantize_file(source, out, check=False, **options)
                seconds = time.perf_counter() - start
                row = dict(model=model, method=label, data=data_name, top1=top1(out, images, labels),
                           bytes=out.stat().st_size, seconds=round(seconds, 2),
                           low_layers=report.count("low"), high_layers=report.count("high"))
                print(_line(row), flush=True)
                results.append(row)
    return results


def markdown(results: list[dict]) -> str:
    data = results[0]["data"] if results else ""
    lines = [f"| model | method | top-1 {data} (%) | file size (bytes) | tool time (s) |",
             "|---|---|---|---|---|"]
    for r in results:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['top1']:.2f} | {r['bytes']:,} | {seconds} |")
    return "\n".join(lines)


def _line(row: dict) -> str:
    return f"{row['model']:22s} {row['method']:28s} top-1 {row['top1']:6.2f} %  {row['bytes']:>10,} bytes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet56"])
    parser.add_argument("--schemes", nargs="+", default=["2/6"])
    parser.add_argument("--data", choices=sorted(DATASETS), default="exact846")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table and JSON")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between its results markers")
    args = parser.parse_args()
    if not (SHARED / "data" / DATASETS[args.data]).exists():
        print(f"skipped: {SHARED} with the CIFAR-10 data is not present", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.schemes, args.data, Path(workdir))
    table = markdown(results)
    (args.out / f"accuracy_{args.data}.md").write_text(table + "\n")
    (args.out / f"accuracy_{args.data}.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    if args.readme:
        command = "python tools/bench_accuracy.py " + " ".join(sys.argv[1:])
        replace_between_markers(ROOT / "README.md", f"accuracy-{args.data}",
                                f"Generated by `{command.strip()}`:\n\n{table}")
    return 0


def replace_between_markers(path: Path, key: str, text: str) -> None:
    """Replace what lies between <!-- KEY:start --> and <!-- KEY:end --> in ``path``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())

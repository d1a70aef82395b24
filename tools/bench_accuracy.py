"""Accuracy benchmark: float vs quantized top-1 on the shared CIFAR-10 test images.

    python tools/bench_accuracy.py --readme            # everything, and the README's table
    python tools/bench_accuracy.py --schemes 2/6 --methods paper stats-pink --data exact846

For each model and scheme it scores the float model, uncompensated rounding
("Original" in the paper), DF-MPC (the paper's closed form, qdq and float
formats) and DF-MPC with each refinement, and writes a Markdown table (for
the README) and JSON, with file sizes and the tool's wall time. It reads the
models and data from ../shared and exits with a message when they are absent.
The test images are used for scoring only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import dfmpc_onnx
from dfmpc_onnx.options import PROTECT_DB

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


PAPER = dict(refine="none", granularity="tensor", protect="off", kbit_rounding="nearest")
"""The paper's setting: its closed form alone, per-tensor quantizer scales, each weight rounded to the
nearest level, the scheme's widths as given."""
ALONE = dict(protect="off", error_feedback="off")
"""Each refinement on its own: the rows below measure one stage each, with no pair raised by --protect and
no error feedback."""

METHODS = {
    "original": ("Original (rounding, paper's per-tensor scales)", dict(compensate=False, **PAPER)),
    "paper": ("DF-MPC (paper)", PAPER),
    "paper-float": ("DF-MPC (paper), float format", dict(PAPER, format="float")),
    "closed-form": ("DF-MPC closed form, per-channel k-bit scales", dict(refine="none", **ALONE)),
    "bias": ("DF-MPC + BN bias correction", dict(refine="bias", **ALONE)),
    "stats-noise": ("DF-MPC + stats, white noise", dict(refine="stats", synthetic="noise", **ALONE)),
    "stats-pink": ("DF-MPC + stats, pink noise", dict(refine="stats", synthetic="pink", **ALONE)),
    "stats-distill": ("DF-MPC + stats, distilled", dict(refine="stats", synthetic="distill", **ALONE)),
    "refit-distill": ("DF-MPC + refit, distilled", dict(refine="refit", synthetic="distill", **ALONE)),
    "optimal-pink": ("DF-MPC, optimal ternary + stats, pink noise",
                     dict(ternary_threshold="optimal", refine="stats", synthetic="pink", **ALONE)),
    "twn-refit-distill": ("DF-MPC, TWN ternary (Eq. 4) + refit, distilled",
                          dict(ternary_threshold="twn", refine="refit", synthetic="distill", **ALONE)),
    "feedback-refit-distill": ("DF-MPC + error feedback + refit, distilled",
                               dict(refine="refit", synthetic="distill", protect="off", error_feedback="on")),
    "feedback-off": (f"DF-MPC + refit, distilled, --protect {PROTECT_DB:g}, --error-feedback off",
                     dict(refine="refit", synthetic="distill", error_feedback="off")),
    "protect-pink": (f"DF-MPC + stats, pink noise, --protect {PROTECT_DB:g}", dict(refine="stats", synthetic="pink")),
    "default": (f"DF-MPC + refit, distilled, --protect {PROTECT_DB:g} (default)",
                dict(refine="refit", synthetic="distill")),
    **{f"protect-{db}": (f"DF-MPC + refit, distilled, --protect {db}", dict(refine="refit", synthetic="distill", protect=db))
       for db in (3, 4, 8, 10)},
    "rounding-nearest-closed-form": ("DF-MPC closed form, per-channel k-bit scales, --kbit-rounding nearest",
                                     dict(refine="none", kbit_rounding="nearest", **ALONE)),
    "rounding-nearest": (f"DF-MPC + refit, distilled, --protect {PROTECT_DB:g}, --kbit-rounding nearest",
                         dict(refine="refit", synthetic="distill", kbit_rounding="nearest")),
    **{f"a8-{estimator}": (f"default + --activations 8, {estimator} ranges",
                           dict(refine="refit", synthetic="distill", activations="8", activation_range=estimator))
       for estimator in ("minmax", "percentile", "mse")},
}
SWEEPS = ("protect-", "a8-", "rounding-", "feedback-off")
"""Method keys that the README's table leaves out (``--methods`` runs them): the --protect threshold sweep,
the activation range estimators and plain rounding of k-bit weights."""
TERNARY_ONLY = ("optimal-pink", "twn-refit-distill")


def distilled_inputs(source: Path, samples: int = 64, seed: int = 0) -> tuple[np.ndarray, float]:
    """The tool's default distillation (in the model's input domain), run once per model and reused for
    every scheme; and its seconds."""
    from dfmpc_onnx.inputs import synthesis_shape
    from dfmpc_onnx.load import load_model
    from dfmpc_onnx.options import Options
    from dfmpc_onnx.synthetic import model_domain, synthesize
    start = time.perf_counter()
    skeleton, weights = load_model(source)
    options = Options(samples=samples, seed=seed)
    domain = model_domain(skeleton, weights, {}, options)
    inputs = synthesize(skeleton, weights, synthesis_shape(skeleton, {}), "distill", options, domain)
    return inputs, time.perf_counter() - start


def default_synthetic(source: Path) -> str:
    """What ``--synthetic auto`` becomes for the model at ``source`` in this installation."""
    from dfmpc_onnx.inputs import model_facts
    from dfmpc_onnx.options import Options, resolve
    return resolve(Options(), model_facts(onnx.load(str(source), load_external_data=False), {})).synthetic


def run(models: list[str], schemes: list[str], methods: list[str], datasets: list[str], workdir: Path,
        granularity: str = "auto") -> list[dict]:
    data = {name: load_cifar(name) for name in datasets}
    results = []
    for model in models:
        source = SHARED / "models" / f"{model}.onnx"
        row = dict(model=model, scheme="float", method="Float", bytes=source.stat().st_size, seconds=None,
                   top1={name: top1(source, *data[name]) for name in datasets})
        print(_line(row), flush=True)
        results.append(row)
        distilled, distill_seconds = None, 0.0
        if any(METHODS[key][1].get("synthetic") == "distill" for key in methods):
            distilled, distill_seconds = distilled_inputs(source)
            print(f"{model}: distilled inputs in {distill_seconds:.1f} s (counted in each distilled row's time)")
        for scheme in schemes:
            for key in methods:
                label, options = METHODS[key]
                if key in TERNARY_ONLY and not scheme.startswith("2/"):
                    continue
                extra, seconds = {}, 0.0
                if options.get("synthetic") == "distill":
                    extra, seconds = {"synthetic_inputs": distilled}, distill_seconds
                out = workdir / f"{model}-{len(results)}.onnx"
                start = time.perf_counter()
                report = dfmpc_onnx.quantize_file(source, out, scheme=scheme, check=False,
                                                  **{"granularity": granularity, **options, **extra})
                seconds += time.perf_counter() - start
                row = dict(model=model, scheme=scheme, method=label, bytes=out.stat().st_size,
                           seconds=round(seconds, 2), low_layers=report.count("low"),
                           high_layers=report.count("high"),
                           top1={name: top1(out, *data[name]) for name in datasets})
                print(_line(row), flush=True)
                results.append(row)
    return results


def markdown(results: list[dict], datasets: list[str]) -> str:
    head = " | ".join(f"top-1 {name} (%)" for name in datasets)
    lines = [f"| model | scheme | method | {head} | file size (bytes) | tool time (s) |",
             "|---|---|---|" + "---|" * len(datasets) + "---|---|"]
    for r in results:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        scores = " | ".join(f"{r['top1'][name]:.2f}" for name in datasets)
        lines.append(f"| {r['model']} | {r['scheme']} | {r['method']} | {scores} | {r['bytes']:,} | {seconds} |")
    return "\n".join(lines)


def _line(row: dict) -> str:
    scores = "  ".join(f"{name} {value:6.2f} %" for name, value in row["top1"].items())
    return f"{row['model']:18s} {row['scheme']:5s} {row['method']:38s} {scores}  {row['bytes']:>10,} bytes"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar10_resnet20", "cifar10_resnet56"])
    parser.add_argument("--schemes", nargs="+", default=["2/6", "3/6", "4/8"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=[key for key in METHODS if not key.startswith(SWEEPS)])
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["exact846", "jpeg10k"])
    parser.add_argument("--granularity", choices=("auto", "tensor", "channel"), default="auto",
                        help="quantizer scales of the rows not named after the paper (default auto, the tool's "
                             "default); the paper's rows always use its per-tensor scales")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out", help="folder for the table and JSON")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between its results markers")
    parser.add_argument("--key", default="accuracy", help="the README markers to write between (default accuracy)")
    args = parser.parse_args()
    missing = [name for name in args.data if not (SHARED / "data" / DATASETS[name]).exists()]
    if missing:
        print(f"skipped: {SHARED}/data lacks {', '.join(DATASETS[name] for name in missing)}", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.schemes, args.methods, args.data, Path(workdir), args.granularity)
    publish(markdown(results, args.data), results, args.out, args.key, args.readme)
    return 0


def default_cache() -> Path:
    """The folder of third-party models scored by the held-out benchmarks: $DFMPC_MODEL_CACHE, else
    ../cache/models beside the project."""
    return Path(os.environ.get("DFMPC_MODEL_CACHE", ROOT.parent / "cache" / "models"))


def model_parser(description: str, models: list[str], key: str) -> argparse.ArgumentParser:
    """The options of a benchmark over cached third-party models: --models, --cache, --out, --readme, --key."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    parser.add_argument("--cache", type=Path, default=default_cache(), help="folder of the cached models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out")
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--key", default=key, help="the README markers the table goes between")
    return parser


def publish(table: str, results: list[dict], out: Path, key: str, readme: bool) -> None:
    """Print the table, write OUT/KEY.md and OUT/KEY.json, and with ``readme`` put it in README.md."""
    (out / f"{key}.md").write_text(table + "\n")
    (out / f"{key}.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    if readme:
        command = f"python tools/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
        replace_between_markers(ROOT / "README.md", key, f"Generated by `{command.strip()}`:\n\n{table}")


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

